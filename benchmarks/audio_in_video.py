"""Does the interleaved audio-in-video layout matter here? The same tiny Qwen2.5-Omni thinker, trained with the
same steps, seeds and data order, once with each prompt's own audio track interleaved with its video
(processor.use_audio_in_video: true, time-aligned positions) and once with the audio as a separate item after the
video, then scored on held-out synthetic questions that need the alignment (data/synth.py, stage 2: "how many
beeps sound while the X is on screen", "which colour was showing when the high tone played").

Training is supervised on the answer tokens (AdamW, every tower trained); held-out accuracy picks the answer
with the highest log-likelihood among the candidates (the options' letters; 0-6 beeps). Prints a table and
writes JSON.

    python -m benchmarks.audio_in_video [--train 48] [--eval 32] [--steps 60] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import completion_logprobs, token_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import ensure_tiny_model

log = logging.getLogger(__name__)
ARMS = {"interleaved": True, "separate": False}


def candidates(sample) -> list[str]:
    if sample.options:
        return [o.split(".")[0] for o in sample.options]
    return [str(n) for n in range(7)]


def train_and_score(model_dir: Path, proc: PromptProcessor, prompts: dict, train, held_out, steps: int,
                    batch: int, lr: float, seed: int) -> dict:
    """Held-out accuracy per question kind after `steps` steps of answer-token training from model_dir."""
    policy = load_policy(model_dir)
    model = policy.model.train()
    pad = policy.tokenizer.pad_token_id
    torch.manual_seed(seed)
    order = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        for sample in order.sample(train, batch):
            prompt = prompts[sample.id]
            target = proc.target_ids(sample.answer)
            ids = torch.tensor([prompt.prompt_token_ids + target])
            logp = token_logprobs(model, ids, torch.ones_like(ids), prompt.media)
            (-logp[0, len(prompt.prompt_token_ids):].sum() / batch).backward()
        opt.step()
    model.eval()
    right: dict[str, list[int]] = {}
    with torch.no_grad():
        for sample in held_out:
            prompt, options = prompts[sample.id], candidates(sample)
            scores = completion_logprobs(model, prompt.prompt_token_ids, [proc.target_ids(c) for c in options],
                                         pad, prompt.media)
            best = options[max(range(len(options)), key=lambda i: float(scores[i].sum()))]
            right.setdefault(sample.problem_type, []).append(int(best == sample.answer))
    return {kind: sum(v) / len(v) for kind, v in right.items()} | {
        "all": sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/audio_in_video.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = Path(tempfile.mkdtemp(prefix="avatar-aiv-"))
    # every item an mp4 with its own AAC track, so that the interleaved arm interleaves them all
    synth = dict(stage=2, seconds=4.0, fps=8, size=56, separate_audio_fraction=0.0)
    train, _ = load_manifest(generate(SynthConfig(num_items=args.train, seed=0, **synth), work / "train"))
    held_out, _ = load_manifest(generate(SynthConfig(num_items=args.eval, seed=1000, **synth), work / "eval"))
    results = []
    for seed in args.seeds:
        model_dir = ensure_tiny_model(TinyModelConfig(kind="omni", seed=seed), work / "models")
        tok = load_policy(model_dir).tokenizer
        for arm, interleave in ARMS.items():
            proc = PromptProcessor(ProcessorConfig(max_frames=8, max_pixels=56 * 56, max_audio_seconds=4.0,
                                                   use_audio_in_video=interleave), tok, model_path=model_dir)
            prompts = {s.id: proc.build(s) for s in train + held_out}
            start = time.perf_counter()
            acc = train_and_score(model_dir, proc, prompts, train, held_out, args.steps, args.batch, args.lr, seed)
            results.append({"arm": arm, "seed": seed, "accuracy": acc, "seconds": time.perf_counter() - start})
            log.info("seed %d %s: %s", seed, arm, acc)

    kinds = sorted({k for r in results for k in r["accuracy"]})
    print(f"\nheld-out accuracy after {args.steps} steps ({args.train} train / {args.eval} held-out items, "
          f"seeds {args.seeds})")
    print(f"{'arm':<12}" + "".join(f"{k:>18}" for k in kinds))
    summary = {}
    for arm in ARMS:
        rows = [r["accuracy"] for r in results if r["arm"] == arm]
        summary[arm] = {k: {"mean": statistics.mean(r[k] for r in rows),
                            "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0} for k in kinds}
        print(f"{arm:<12}" + "".join(f"{summary[arm][k]['mean']:>11.3f} ± {summary[arm][k]['sd']:.3f}" for k in kinds))
    chance = {"multiple_choice": "1/2-1/4 by difficulty", "numerical": "1/7 if uniform"}
    print(f"chance: {chance}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
