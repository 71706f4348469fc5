"""Rollout throughput: tokens/s of the vLLM engine vs the transformers fallback on the same prompts and
model in one run, plus the weight-update latency of each. Prints a table and writes JSON.

    python benchmarks/rollout.py (or python -m benchmarks.rollout) [--model PATH] [--prompts 8] [--group 4] [--max-new-tokens 64]

Without --model the tiny Qwen2.5-Omni thinker is built and the synthetic audio-visual data generated (both
multimodal and text-only prompts are measured). Results go to benchmarks/results/rollout.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script, this folder comes first on sys.path and its learner.py would shadow the learner package.
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a local HF model folder (default: the tiny Omni thinker)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args()

    from actors.config import RolloutConfig
    from actors.engines import EngineInput, HFEngine, Sampling, VLLMEngine
    from data.config import SynthConfig
    from data.manifest import load_manifest
    from data.synth import generate
    from learner.weights.shared_file import SharedFileSender, file_update
    from policy.config import ProcessorConfig, TinyModelConfig
    from policy.model import load_policy
    from policy.processor import PromptProcessor
    from policy.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="avatar-bench-"))
    model_dir = (
        Path(args.model) if args.model else build_tiny_model(TinyModelConfig(kind="omni"), work / "omni")
    )
    samples, _ = load_manifest(
        generate(SynthConfig(num_items=args.prompts, stage=2, seconds=2.0, size=112), work / "d")
    )
    policy = load_policy(model_dir)
    proc = PromptProcessor(
        ProcessorConfig(max_frames=8, max_pixels=112 * 112), policy.tokenizer, policy.multimodal
    )
    sets = {"multimodal": [proc.build(s) for s in samples]} if policy.multimodal else {}
    sets["text"] = [proc.build(dataclasses.replace(s, video=None, audio=None)) for s in samples]
    sampling = Sampling(n=args.group, temperature=1.0, top_k=50, max_new_tokens=args.max_new_tokens, seed=0)
    # a new version to load: the same weights perturbed, published like the learner does
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = {("thinker." if policy.multimodal else "") + k: v for k, v in policy.model.state_dict().items()}
    published = SharedFileSender(work / "weights").publish(state, version=1)
    del policy

    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, max_model_len=4096)
    rows = []
    for name, make in (
        ("vllm", lambda: VLLMEngine(model_dir, cfg)),
        ("hf", lambda: HFEngine(model_dir, cfg)),
    ):
        start = time.perf_counter()
        engine = make()
        startup = time.perf_counter() - start
        for kind, built in sets.items():
            inputs = [EngineInput(b.prompt_token_ids, b.media) for b in built]
            engine.generate(inputs[:1], dataclasses.replace(sampling, n=1, max_new_tokens=4))  # warm-up
            start = time.perf_counter()
            results = engine.generate(inputs, sampling)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for r in results for c in r.completions)
            rows.append(
                dict(
                    engine=name,
                    prompts=kind,
                    completions=len(inputs) * args.group,
                    tokens=tokens,
                    seconds=round(seconds, 3),
                    tokens_per_s=round(tokens / seconds, 1),
                    startup_s=round(startup, 2),
                )
            )
        update = engine.load_weights(
            file_update(published["location"], published["version"], published["checksum"], model_dir))
        for row in rows:
            if row["engine"] == name:
                row["weight_update_s"] = round(update, 3)
        engine.shutdown()

    print(
        f"model: {model_dir}  prompts: {args.prompts}  G: {args.group}  max_new_tokens: {args.max_new_tokens}"
    )
    print(
        f"{'engine':8} {'prompts':11} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'start s':>8} {'update s':>9}"
    )
    for r in rows:
        print(
            f"{r['engine']:8} {r['prompts']:11} {r['tokens']:>7} {r['seconds']:>8} {r['tokens_per_s']:>8} "
            f"{r['startup_s']:>8} {r['weight_update_s']:>9}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                model=str(model_dir),
                device="cuda" if torch.cuda.is_available() else "cpu",
                rows=rows,
                args=vars(args),
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
