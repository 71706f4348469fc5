"""Learner step time and tokens/s with TAS-weighted (parabola) vs uniform token weights on the same batch.

    python -m benchmarks.learner [--steps 6] [--seq 128] [--group 8] [--kind text]

Each variant has its own tiny-model Learner (ZeRO 1, fp32, CPU); both train on identical batches, their steps
interleaved; the first step is a warm-up and is not timed. Also times the loss function alone, where TAS's cost lives. Prints a table and
writes benchmarks/results/learner.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from buffer_service.records import Trajectory
from learner.config import LearnerConfig, ObjectiveConfig
from learner.learner import Learner
from learner.objective import avatar_loss
from policy.config import TinyModelConfig
from policy.tiny import ensure_tiny_model


def batch(learner, seq, group, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        prompt = torch.randint(0, 500, (32,), generator=g).tolist()
        comps = [torch.randint(0, 500, (seq,), generator=g).tolist() for _ in range(group)]
        probes = [Trajectory(f"{k}/{i}", f"g{k}", f"p{k}", prompt, c, [0.0] * seq, 0) for i, c in enumerate(comps)]
        lps = learner.completion_logprobs(probes)
        rewards = torch.rand(group, generator=g).round().tolist()
        out.append([Trajectory(f"{k}/{i}", f"g{k}", f"p{k}", prompt, c, lp.tolist(), 0, reward=r)
                    for i, (c, lp, r) in enumerate(zip(comps, lps, rewards))])
    return out


def loss_only(shape, b, t, reps=200):
    torch.manual_seed(0)
    logp = torch.randn(b, t, requires_grad=True)
    old, ref, mask = logp.detach() + 0.01, logp.detach() - 0.01, torch.ones(b, t)
    rewards, gi = torch.rand(b), torch.arange(b) // 8
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = avatar_loss(logp, old, ref, mask, rewards, gi, torch.zeros(b, dtype=torch.bool), torch.zeros(b),
                          tas_shape=shape)
        out.loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--kind", default="text", choices=["text", "omni"])
    ap.add_argument("--out", default="benchmarks/results/learner.json")
    args = ap.parse_args()

    model = ensure_tiny_model(TinyModelConfig(kind=args.kind), Path(tempfile.gettempdir()) / "avatar_bench_models")
    learners, batches = {}, None
    for shape in ("uniform", "parabola"):
        cfg = LearnerConfig(zero_stage=1, lr=1e-4, warmup_ratio=0.0, micro_batch_size=8,
                            objective=ObjectiveConfig(tas_shape=shape))
        learners[shape] = Learner(cfg, model, total_steps=args.steps + 1)
        batches = batches or batch(learners[shape], args.seq, args.group, args.groups)
        learners[shape].train_step(batches)  # warm-up
    times = {shape: [] for shape in learners}
    tokens = 0
    for _ in range(args.steps):  # interleaved, so load from other processes hits both variants alike
        for shape, learner in learners.items():
            out = learner.train_step(batches)
            times[shape].append(out["seconds"])
            tokens = out["tokens"]
    rows = {}
    for shape, learner in learners.items():
        learner.close()
        step = statistics.median(times[shape])
        b = args.group * args.groups
        rows[shape] = {"step_s": step, "tokens_per_s": tokens / step, "tokens": tokens, "step_times": times[shape],
                       "loss_only_ms": 1e3 * loss_only(shape, b, args.seq)}
    ratio = rows["parabola"]["step_s"] / rows["uniform"]["step_s"]
    loss_ratio = rows["parabola"]["loss_only_ms"] / rows["uniform"]["loss_only_ms"]
    print(f"{'weights':<10} {'step s (median)':>16} {'tokens/s':>10} {'loss fwd+bwd ms':>16}")
    for shape, r in rows.items():
        print(f"{shape:<10} {r['step_s']:>16.4f} {r['tokens_per_s']:>10.1f} {r['loss_only_ms']:>16.3f}")
    print(f"TAS overhead: step x{ratio:.3f}, loss alone x{loss_ratio:.3f}  "
          f"({args.groups} groups x {args.group} completions x {args.seq} tokens, {args.kind} tiny model, "
          f"{torch.get_num_threads()} threads)")
    result = {"config": vars(args), "rows": rows, "step_overhead_ratio": ratio, "loss_overhead_ratio": loss_ratio,
              "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
