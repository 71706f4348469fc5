"""Rollout throughput: tokens/s of the vLLM engine vs the transformers fallback on the same prompts and
model in one run, plus the weight-update latency of each; then stragglers on the vLLM engine. Prints tables
and writes JSON.

    python benchmarks/rollout.py (or python -m benchmarks.rollout) [--model PATH] [--prompts 8] [--group 4]
        [--max-new-tokens 64] [--engines vllm,hf] [--straggler-requests 48] [--in-flight 8] [--tail-max 256]

Without --model the tiny Qwen2.5-Omni thinker is built and the synthetic audio-visual data generated (both
multimodal and text-only prompts are measured). Results go to benchmarks/results/rollout.json.

Stragglers: --straggler-requests prompts (G completions each), each with its own max_tokens drawn from a
long-tailed (Pareto) distribution between 4 and --tail-max (the tiny model hardly ever ends a completion
itself, so each runs to its cap), with --in-flight prompts in the engine at a time, two ways on the same engine:
"batch per call" (the rollout worker before the async engine: a call's prompts go in together and the next call
starts when the slowest is done) and "continuous" (a new prompt enters as soon as one finishes: what the worker
does now). Same requests and seeds, so the same tokens; tokens/s of each."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
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
    ap.add_argument("--engines", default="vllm,hf")
    ap.add_argument("--straggler-requests", type=int, default=48, help="0: no straggler measurement")
    ap.add_argument("--in-flight", type=int, default=8, help="prompts in the engine at a time (stragglers)")
    ap.add_argument("--tail-max", type=int, default=256, help="the longest max_tokens drawn (stragglers)")
    ap.add_argument("--repeats", type=int, default=2, help="straggler runs of each schedule, alternating")
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args()

    from actors.config import RolloutConfig
    from actors.engines import EngineInput, HFEngine, Sampling, VLLMEngine
    from data.config import SynthConfig
    from data.manifest import load_manifest
    from data.synth import generate
    from learner.config import LearnerConfig
    from learner.weights.shared_file import SharedFileSender
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
    published = SharedFileSender(work / "weights", timeout_s=LearnerConfig().publish_timeout_s).publish(state, version=1)
    del policy

    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, max_model_len=4096)
    rows, straggler_rows = [], []
    makers = {"vllm": lambda: VLLMEngine(model_dir, cfg), "hf": lambda: HFEngine(model_dir, cfg)}
    for name in args.engines.split(","):
        make = makers[name]
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
        if name == "vllm" and args.straggler_requests:
            kind = "multimodal" if "multimodal" in sets else "text"
            inputs = [EngineInput(b.prompt_token_ids, b.media) for b in sets[kind]]
            straggler_rows = stragglers(engine, inputs, sampling, args)
        update = engine.load_weights(published["location"], published["version"], published["checksum"])
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
    if straggler_rows:
        print(f"\nstragglers: {args.straggler_requests} prompts x G {args.group}, max_tokens Pareto(1.2) in "
              f"[4, {args.tail_max}], {args.in_flight} prompts in the engine at a time, same requests and seeds")
        print(f"{'schedule':16} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'speed-up':>9}  tok/s of each run")
        base = straggler_rows[0]["tokens_per_s"]
        for r in straggler_rows:
            r["speedup"] = round(r["tokens_per_s"] / base, 2)
            print(f"{r['schedule']:16} {r['tokens']:>7} {r['seconds']:>8} {r['tokens_per_s']:>8} {r['speedup']:>8}x"
                  f"  {r['each_tokens_per_s']}")
        steps = straggler_steps(straggler_rows[0]["lengths"], args.in_flight)
        print(f"decode steps if a step cost the same at any batch size: batch per call {steps['batch per call']}, "
              f"continuous {steps['continuous']} ({steps['ratio']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                model=str(model_dir),
                device="cuda" if torch.cuda.is_available() else "cpu",
                rows=rows,
                stragglers=straggler_rows,
                args=vars(args),
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


def straggler_lengths(n: int, tail_max: int, seed: int = 0) -> list[int]:
    """Per-request max_tokens, long-tailed: 8 x Pareto(1.2), clipped to [4, tail_max]."""
    rng = random.Random(seed)
    return [min(tail_max, max(4, int(8 * rng.paretovariate(1.2)))) for _ in range(n)]


def straggler_steps(lengths: list[int], in_flight: int) -> dict:
    """The engine steps each schedule needs if every step costs the same (the GPU-like case): a call lasts its
    longest request; continuously, each freed slot takes the next request."""
    import heapq

    batch = sum(max(lengths[at : at + in_flight]) for at in range(0, len(lengths), in_flight))
    slots = [0] * in_flight
    for n in lengths:
        heapq.heappush(slots, heapq.heappop(slots) + n)
    return {"batch per call": batch, "continuous": max(slots), "ratio": batch / max(slots)}


def stragglers(engine, inputs: list, sampling, args) -> list[dict]:
    """The same long-tailed requests, batch per call vs continuous, at args.in_flight prompts in the engine."""
    from concurrent.futures import FIRST_COMPLETED, wait

    lengths = straggler_lengths(args.straggler_requests, args.tail_max)
    requests = [(inputs[i % len(inputs)], dataclasses.replace(sampling, max_new_tokens=m, seed=i))
                for i, m in enumerate(lengths)]

    def batch_per_call():
        results = []
        for at in range(0, len(requests), args.in_flight):
            futures = [engine.submit(p, s) for p, s in requests[at : at + args.in_flight]]
            results += [f.result() for f in futures]  # the next call starts when the slowest is done
        return results

    def continuous():
        queue, running, results = list(requests), set(), []
        while queue or running:
            while queue and len(running) < args.in_flight:
                running.add(engine.submit(*queue.pop(0)))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            results += [f.result() for f in done]
        return results

    runs: dict[str, list[tuple[int, float]]] = {"batch per call": [], "continuous": []}
    for _ in range(args.repeats):  # alternating, so that a change in the machine's load hits both alike
        for name, run in (("batch per call", batch_per_call), ("continuous", continuous)):
            start = time.perf_counter()
            results = run()
            seconds = time.perf_counter() - start
            runs[name].append((sum(len(c.token_ids) for r in results for c in r.completions), seconds))
    rows = []
    for name, measured in runs.items():
        tokens, seconds = sum(t for t, _ in measured), sum(s for _, s in measured)
        rows.append(dict(schedule=name, tokens=tokens, seconds=round(seconds, 3),
                         tokens_per_s=round(tokens / seconds, 1),
                         each_tokens_per_s=[round(t / s, 1) for t, s in measured], lengths=lengths))
    return rows


if __name__ == "__main__":
    main()
