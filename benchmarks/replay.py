"""Replay service throughput: inserts/s and sample latency, next to redis-benchmark on the same server.

    python benchmarks/replay.py [--batches 64 256] [--group-size 4] [--rounds 20] [--samples 100]

Starts a private redis-server (AOF on, appendfsync everysec: the embedded default) in a temporary folder and
uses realistic records: 1,024 prompt tokens (text plus media placeholders), 512 completion tokens with
behaviour and reference log-probs, a few hundred characters of text. For each batch size (records per learner
step) it measures
  - push: the batch's groups entering the fresh stream (records/s),
  - insert: push + read through the consumer group + commit into the tiers, the full path (records/s),
  - sample p50/p99 (ms) of sample(batch) with priority sampling, right after a commit (the learner's loop:
    the tier snapshot is re-read) and again without a change in between (snapshot cached).
Then redis-benchmark's pipelined SET (-P 16) on the same server, with 3-byte values and with values the size of
one encoded record, and the ratio of our full-path insert rate to each. Prints a table, writes JSON to
benchmarks/results/ and prints its path.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer_service.config import BufferConfig  # noqa: E402
from buffer_service.records import Trajectory  # noqa: E402
from buffer_service.redis_server import start_redis  # noqa: E402
from buffer_service.schema import encode_trajectory  # noqa: E402
from buffer_service.service import ReplayService  # noqa: E402

PROMPT_TOKENS = 1024
COMPLETION_TOKENS = 512


def make_group(rng: np.random.Generator, step: int, g: int, size: int) -> list[Trajectory]:
    prompt_id = f"prompt-{rng.integers(0, 500)}"
    prompt = rng.integers(0, 151_000, PROMPT_TOKENS).tolist()
    group = []
    for i in range(size):
        behaviour = (-rng.exponential(1.0, COMPLETION_TOKENS)).tolist()
        group.append(
            Trajectory(
                trajectory_id=f"s{step}-g{g}-{i}",
                group_id=f"s{step}-g{g}",
                prompt_id=prompt_id,
                prompt_token_ids=prompt,
                completion_token_ids=rng.integers(0, 151_000, COMPLETION_TOKENS).tolist(),
                behaviour_logprobs=behaviour,
                ref_logprobs=(np.array(behaviour) - rng.normal(0, 0.05, COMPLETION_TOKENS)).tolist(),
                policy_version=step,
                completion_text="<think>1. The drum starts at 0:02. 2. Two people clap. </think><answer>B</answer>"
                * 4,
                rewards={"format": 1.0, "acc": float(rng.random() < 0.5)},
                reward=float(rng.random()),
                created_at=time.time(),
                scored_at=time.time(),
            )
        )
    return group


def redis_benchmark(server, value_size: int, requests: int) -> float:
    """redis-benchmark's pipelined SET rate (requests/s) on `server`."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-a", server.password]
    cmd += ["-t", "set", "-P", "16", "-n", str(requests), "-d", str(value_size), "-q", "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "SET":
            return float(cells[1])
    raise RuntimeError(f"no SET line in redis-benchmark output:\n{out}")


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def bench_batch(
    svc: ReplayService, rng, batch: int, group_size: int, rounds: int, samples: int, step0: int
) -> dict:
    groups_per_batch = batch // group_size
    push_s = insert_s = 0.0
    records = 0
    step = step0
    for _ in range(rounds):
        groups = [make_group(rng, step, g, group_size) for g in range(groups_per_batch)]
        t0 = time.perf_counter()
        for group in groups:
            svc.push_group(group)
        t1 = time.perf_counter()
        got = svc.read_fresh("bench", max_groups=groups_per_batch)
        trained = []
        for _, group in got:
            for t in group:
                t.advantage = float(rng.normal())
                trained.append(t)
        svc.commit([e for e, _ in got], trained)
        t2 = time.perf_counter()
        push_s += t1 - t0
        insert_s += t2 - t0
        records += len(trained)
        step += 1
    # Sample latency in the learner's loop: a commit (a small group) then a sample of `batch`.
    after_commit, cached = [], []
    for i in range(samples):
        svc.push_group(make_group(rng, step, 10_000 + i, group_size))
        got = svc.read_fresh("bench", max_groups=1)
        svc.commit([e for e, _ in got], [t for _, g in got for t in g])
        t0 = time.perf_counter()
        svc.sample(batch, rng_seed=i)
        t1 = time.perf_counter()
        svc.sample(batch, rng_seed=i)
        t2 = time.perf_counter()
        after_commit.append(t1 - t0)
        cached.append(t2 - t1)
    return {
        "batch": batch,
        "records": records,
        "push_records_per_s": records / push_s,
        "insert_records_per_s": records / insert_s,
        "sample_after_commit_p50_ms": percentile_ms(after_commit, 50),
        "sample_after_commit_p99_ms": percentile_ms(after_commit, 99),
        "sample_cached_p50_ms": percentile_ms(cached, 50),
        "sample_cached_p99_ms": percentile_ms(cached, 99),
        "tier_entries_at_sampling": sum(svc.tier_sizes().values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--group-size", type=int, default=4, help="G_on completions per prompt")
    parser.add_argument("--rounds", type=int, default=20, help="insert batches per batch size")
    parser.add_argument("--samples", type=int, default=100, help="sample calls per batch size")
    parser.add_argument("--capacity", type=int, default=10_000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    record_bytes = len(encode_trajectory(make_group(rng, 0, 0, 1)[0]))
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as folder:
        server = start_redis(Path(folder) / "redis", appendfsync="everysec")
        try:
            svc = ReplayService(BufferConfig(redis=server.config(), capacity=args.capacity, min_size=0))
            rows = []
            for k, batch in enumerate(args.batches):
                rows.append(
                    bench_batch(svc, rng, batch, args.group_size, args.rounds, args.samples, 1000 * k)
                )
            set_small = redis_benchmark(server, 3, 200_000)
            set_record = redis_benchmark(server, record_bytes, 20_000)
            redis_version = server.client().info("server")["redis_version"]
            stats = svc.stats()
        finally:
            server.stop()

    print(
        f"records: {PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion tokens with log-probs, "
        f"{record_bytes} bytes encoded; groups of {args.group_size}; redis {redis_version}, appendfsync everysec"
    )
    header = f"{'batch':>6} {'push rec/s':>11} {'insert rec/s':>13} {'sample p50 ms':>14} {'p99 ms':>8} {'cached p50':>11} {'p99':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['batch']:>6} {r['push_records_per_s']:>11.0f} {r['insert_records_per_s']:>13.0f} "
            f"{r['sample_after_commit_p50_ms']:>14.2f} {r['sample_after_commit_p99_ms']:>8.2f} "
            f"{r['sample_cached_p50_ms']:>11.2f} {r['sample_cached_p99_ms']:>7.2f}"
        )
    print(
        f"redis-benchmark SET -P 16: {set_small:,.0f} req/s (3 B values), {set_record:,.0f} req/s ({record_bytes} B values)"
    )
    for r in rows:
        r["ratio_insert_to_set_3B"] = r["insert_records_per_s"] / set_small
        r["ratio_insert_to_set_record_size"] = r["insert_records_per_s"] / set_record
        print(
            f"ratio, batch {r['batch']}: our inserts/s = {r['ratio_insert_to_set_3B']:.4f} x SET (3 B), "
            f"{r['ratio_insert_to_set_record_size']:.3f} x SET ({record_bytes} B)"
        )
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "redis_version": redis_version,
        "record_bytes": record_bytes,
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "group_size": args.group_size,
        "capacity": args.capacity,
        "rows": rows,
        "redis_benchmark_set_p16_3B": set_small,
        "redis_benchmark_set_p16_record_size": set_record,
        "service_stats": stats,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"replay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
