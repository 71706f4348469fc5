"""Replay service throughput and sample latency against a plain redis-py pipeline, and redis-benchmark for scale.

    python benchmarks/replay.py [--batches 64 256] [--group-size 4] [--rounds 20] [--samples 100]

Starts a private redis-server (AOF on, appendfsync everysec: the embedded default) in a temporary folder and
uses realistic records: 1,024 prompt tokens (text plus media placeholders), 512 completion tokens with
behaviour and reference log-probs, a few hundred characters of text. For each batch size (records per learner
step) it measures, on the same server and the same groups, round by round (the order of the two alternates):
  - the service: push (the batch's groups entering the fresh stream, one push_group each, as reward workers
    push) and insert, the full path (push + read_fresh through the consumer group + commit into the tiers),
    in records/s;
  - the plain pipeline (PlainPipeline below), the fair baseline: the same encoded records
    (buffer_service.schema), written to the same number of keys and stream entries as the service touches
    per group (under the prefix "plain" instead of the service's), with plain commands (no Lua, no checks,
    no statistics computed) in one redis-py pipeline per phase of a batch, and the groups read back through
    a consumer group and decoded; the ratio service / plain (goal: >= 0.5);
  - sample p50/p99 (ms) of sample(batch) with priority sampling, right after a commit (the learner's loop:
    the tier snapshot is re-read) and again without a change in between (snapshot cached), against fetching
    the same records (the distinct trajectory ids the sample drew) from the plain pipeline's copy in one HMGET
    and decoding them; the ratio of the p99s (goal: <= 1.5);
  - Redis commands per group of each (INFO commandstats, commands run inside scripts included).
Then redis-benchmark's pipelined SET (-P 16) on the same server, with 3-byte values and with values the size of
one encoded record, for scale. Prints a table, writes JSON to benchmarks/results/ and prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer_service.config import BufferConfig  # noqa: E402
from buffer_service.records import Trajectory  # noqa: E402
from buffer_service.redis_server import start_redis  # noqa: E402
from buffer_service.schema import decode_group, decode_trajectory, encode_group, encode_trajectory  # noqa: E402
from buffer_service.service import ReplayService  # noqa: E402
from buffer_service.tiers import TIERS  # noqa: E402

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


class PlainPipeline:
    """The fair baseline: what a plain redis-py client does to keep the same data under the same keys.

    Per group it writes the keys the service writes (push.lua, insert.lua, ack.lua), under its own prefix, with
    one plain command each and nothing computed in Redis: push: the group's record (encode_group) as one
    entry of a stream with a consumer group, with the same fields as the service's entry (blob, group_id,
    prompt_id, tids), the trajectory ids into the seen set and the seen-order list, the rewards into the
    prompt's two window lists (trimmed), the prompt's R(q) and streak sorted-set members, its state hash, the
    hinted set and the counters; read: XREADGROUP of the batch's groups and decode_group; commit: per
    trajectory its record (encode_trajectory, carrying the advantage) into the blob hash, a metadata string
    into the tier's hash and a member into the tier's sorted set (the tier from the prompt id: no quantiles),
    per group the insert mark set and removed, XACK and XDEL, then the counters and the tiers' version. Each
    phase of a batch is one pipeline (one round trip). No dedup check, no validation, no eviction (the run
    stays under the capacity), no hint rule, no atomicity: a floor for the work the service does."""

    def __init__(self, client, rbar_window: int = 20, prefix: str = "plain", group_name: str = "learners"):
        self.r, self.p, self.group_name, self.window = client, prefix, group_name, rbar_window
        self.seq = 0
        client.xgroup_create(f"{prefix}:fresh", group_name, id="0", mkstream=True)

    def push(self, groups: list[list[Trajectory]]) -> None:
        p, pipe = self.p, self.r.pipeline(transaction=False)
        for group in groups:
            blob, pid = encode_group(group), group[0].prompt_id
            tids = [t.trajectory_id for t in group]
            totals = [t.reward for t in group]
            mean = sum(totals) / len(totals)
            pipe.sadd(f"{p}:seen", *tids)
            pipe.rpush(f"{p}:seen_order", "\n".join(tids))
            pipe.xadd(f"{p}:fresh", {"blob": blob, "group_id": group[0].group_id, "prompt_id": pid,
                                     "tids": "\n".join(tids)})
            pipe.lpush(f"{p}:rw:{pid}", *totals).ltrim(f"{p}:rw:{pid}", 0, self.window - 1)
            pipe.lpush(f"{p}:tw:{pid}", *totals).ltrim(f"{p}:tw:{pid}", 0, self.window - 1)
            pipe.zadd(f"{p}:rbar", {pid: mean})
            pipe.zadd(f"{p}:streak", {pid: 0})
            pipe.hset(f"{p}:ps:{pid}", mapping={"streak": 0, "task": totals[0], "count": len(group), "hint": 0})
            if mean <= 0.25:  # a stand-in for the hint rule: the hinted set is written once per group
                pipe.sadd(f"{p}:hinted", pid)
            else:
                pipe.srem(f"{p}:hinted", pid)
            pipe.hincrby(f"{p}:stats", "pushed_trajectories", len(group))
        pipe.execute()

    def read(self, consumer: str, max_groups: int) -> list[tuple[str, list[Trajectory]]]:
        reply = self.r.xreadgroup(self.group_name, consumer, {f"{self.p}:fresh": ">"}, count=max_groups)
        return [(eid.decode(), decode_group(fields[b"blob"])) for _, entries in reply or [] for eid, fields in entries]

    def commit(self, entry_ids: list[str], trained: list[Trajectory]) -> None:
        p, pipe, now = self.p, self.r.pipeline(transaction=False), repr(time.time())
        for eid in entry_ids:
            pipe.sadd(f"{p}:inserted", eid)
        for t in trained:
            self.seq += 1
            tier = TIERS[zlib.crc32(t.prompt_id.encode()) % 3]
            pipe.zadd(f"{p}:tier:{tier}", {t.trajectory_id: self.seq})
            pipe.hset(f"{p}:meta:{tier}", t.trajectory_id, f"{self.seq} {t.advantage!r} {t.policy_version} {now} "
                      f"{t.reward!r} {t.advantage!r} {t.prompt_id}")
            pipe.hset(f"{p}:blob", t.trajectory_id, encode_trajectory(t))
        pipe.set(f"{p}:seq", self.seq)
        for eid in entry_ids:
            pipe.xack(f"{p}:fresh", self.group_name, eid).xdel(f"{p}:fresh", eid).srem(f"{p}:inserted", eid)
        pipe.hincrby(f"{p}:stats", "inserted", len(trained))
        pipe.incr(f"{p}:tiers_version")
        pipe.execute()

    def fetch(self, trajectory_ids: list[str]) -> list[Trajectory]:
        """The records of `trajectory_ids` (each distinct one fetched and decoded once), in that order."""
        unique = list(dict.fromkeys(trajectory_ids))
        records = {tid: decode_trajectory(b) for tid, b in zip(unique, self.r.hmget(f"{self.p}:blob", unique),
                                                                strict=True)}
        return [records[tid] for tid in trajectory_ids]


def redis_calls(client) -> int:
    """Commands the server has run so far, commands inside scripts included (the INFO asking is counted once
    it has run: the next reading includes it)."""
    return sum(v["calls"] for v in client.info("commandstats").values())


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
    svc: ReplayService, plain: PlainPipeline, rng, batch: int, group_size: int, rounds: int, samples: int,
    step0: int,
) -> dict:
    groups_per_batch = batch // group_size
    adv = np.random.default_rng(step0)  # the advantages the "learner" gives (the same for both paths)
    time_s = {"svc_push": 0.0, "svc_insert": 0.0, "plain_push": 0.0, "plain_insert": 0.0}
    calls = {"svc": 0, "plain": 0}
    records = 0
    step = step0

    def timed_round(push, read, commit, groups):
        """push the groups, read them back, commit them with the learner's advantages: (push s, total s, records)."""
        t0 = time.perf_counter()
        push(groups)
        t1 = time.perf_counter()
        got = read("bench", len(groups))
        trained = [t for _, group in got for t in group]
        for t in trained:
            t.advantage = advantages[t.trajectory_id]
        commit([e for e, _ in got], trained)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, len(trained)

    def service_round(groups):  # one push_group per group, as the reward workers push
        return timed_round(lambda gs: [svc.push_group(g) for g in gs],
                           lambda consumer, n: svc.read_fresh(consumer, max_groups=n), svc.commit, groups)

    def plain_round(groups):
        return timed_round(plain.push, plain.read, plain.commit, groups)

    for k in range(rounds):
        groups = [make_group(rng, step, g, group_size) for g in range(groups_per_batch)]
        advantages = {t.trajectory_id: float(adv.normal()) for group in groups for t in group}
        order = (("svc", service_round), ("plain", plain_round))
        for name, run in order if k % 2 == 0 else order[::-1]:  # alternate who goes first: load drifts
            before = redis_calls(svc.r)
            push_s, insert_s, n = run(groups)
            calls[name] += redis_calls(svc.r) - before - 1
            time_s[f"{name}_push"] += push_s
            time_s[f"{name}_insert"] += insert_s
            if n != batch:
                raise RuntimeError(f"{name} path: {n} records through a round of {batch}")
        records += batch
        step += 1
    # Sample latency in the learner's loop: a commit (a small group) then a sample of `batch`; the plain
    # pipeline fetches and decodes the records that sample drew (it holds the same ones).
    after_commit, cached, plain_fetch = [], [], []
    for i in range(samples):
        groups = [make_group(rng, step, 10_000 + i, group_size)]
        advantages = {t.trajectory_id: float(adv.normal()) for t in groups[0]}
        service_round(groups)
        plain_round(groups)
        t0 = time.perf_counter()
        drawn = svc.sample(batch, rng_seed=i)
        t1 = time.perf_counter()
        svc.sample(batch, rng_seed=i)
        t2 = time.perf_counter()
        fetched = plain.fetch([s.trajectory.trajectory_id for s in drawn])
        t3 = time.perf_counter()
        if len(fetched) != batch:
            raise RuntimeError(f"sample drew {len(drawn)} of {batch}")
        after_commit.append(t1 - t0)
        cached.append(t2 - t1)
        plain_fetch.append(t3 - t2)
    row = {
        "batch": batch,
        "records": records,
        "push_records_per_s": records / time_s["svc_push"],
        "insert_records_per_s": records / time_s["svc_insert"],
        "plain_push_records_per_s": records / time_s["plain_push"],
        "plain_insert_records_per_s": records / time_s["plain_insert"],
        "redis_commands_per_group": calls["svc"] / (rounds * groups_per_batch),
        "plain_redis_commands_per_group": calls["plain"] / (rounds * groups_per_batch),
        "sample_after_commit_p50_ms": percentile_ms(after_commit, 50),
        "sample_after_commit_p99_ms": percentile_ms(after_commit, 99),
        "sample_cached_p50_ms": percentile_ms(cached, 50),
        "sample_cached_p99_ms": percentile_ms(cached, 99),
        "plain_fetch_p50_ms": percentile_ms(plain_fetch, 50),
        "plain_fetch_p99_ms": percentile_ms(plain_fetch, 99),
        "tier_entries_at_sampling": sum(svc.tier_sizes().values()),
    }
    row["ratio_insert_to_plain"] = row["insert_records_per_s"] / row["plain_insert_records_per_s"]
    row["ratio_push_to_plain"] = row["push_records_per_s"] / row["plain_push_records_per_s"]
    row["ratio_sample_p99_after_commit_to_plain"] = row["sample_after_commit_p99_ms"] / row["plain_fetch_p99_ms"]
    row["ratio_sample_p99_cached_to_plain"] = row["sample_cached_p99_ms"] / row["plain_fetch_p99_ms"]
    return row


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
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as folder:
        server = start_redis(Path(folder) / "redis", appendfsync="everysec")
        try:
            svc = ReplayService(BufferConfig(redis=server.config(), capacity=args.capacity, min_size=0))
            plain = PlainPipeline(server.client(), svc.config.rbar_window)
            rows = []
            for k, batch in enumerate(args.batches):
                rows.append(
                    bench_batch(svc, plain, rng, batch, args.group_size, args.rounds, args.samples, 1000 * k)
                )
            set_small = redis_benchmark(server, 3, 200_000)
            set_record = redis_benchmark(server, record_bytes, 20_000)
            redis_version = server.client().info("server")["redis_version"]
            stats = svc.stats()
            keys = {prefix: sum(1 for _ in svc.r.scan_iter(match=f"{prefix}:*", count=1000))
                    for prefix in (svc.prefix, "plain")}
        finally:
            server.stop()
    load_after = os.getloadavg()

    print(
        f"records: {PROMPT_TOKENS} prompt + {COMPLETION_TOKENS} completion tokens with log-probs, "
        f"{record_bytes} bytes encoded; groups of {args.group_size}; redis {redis_version}, appendfsync everysec; "
        f"{args.rounds} rounds, {args.samples} samples per batch size; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after on {os.cpu_count()} CPUs"
    )
    print(f"keys held at the end: service {keys[svc.prefix]}, plain pipeline {keys['plain']}")
    header = (f"{'batch':>5} {'':<13} {'push rec/s':>10} {'insert rec/s':>12} {'cmds/group':>10} "
              f"{'sample p50 ms':>13} {'p99 ms':>7} {'cached p50':>10} {'p99':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['batch']:>5} {'service':<13} {r['push_records_per_s']:>10.0f} {r['insert_records_per_s']:>12.0f} "
            f"{r['redis_commands_per_group']:>10.1f} {r['sample_after_commit_p50_ms']:>13.2f} "
            f"{r['sample_after_commit_p99_ms']:>7.2f} {r['sample_cached_p50_ms']:>10.2f} {r['sample_cached_p99_ms']:>6.2f}"
        )
        print(
            f"{'':>5} {'plain pipe':<13} {r['plain_push_records_per_s']:>10.0f} "
            f"{r['plain_insert_records_per_s']:>12.0f} {r['plain_redis_commands_per_group']:>10.1f} "
            f"{r['plain_fetch_p50_ms']:>13.2f} {r['plain_fetch_p99_ms']:>7.2f} {'':>10} {'':>6}"
        )
        print(
            f"{'':>5} {'service/plain':<13} {r['ratio_push_to_plain']:>10.2f} {r['ratio_insert_to_plain']:>12.2f} "
            f"{'':>10} {r['sample_after_commit_p50_ms'] / r['plain_fetch_p50_ms']:>13.2f} "
            f"{r['ratio_sample_p99_after_commit_to_plain']:>7.2f} "
            f"{r['sample_cached_p50_ms'] / r['plain_fetch_p50_ms']:>10.2f} {r['ratio_sample_p99_cached_to_plain']:>6.2f}"
        )
    print("plain pipe: the same records, keys and stream entries per group in one redis-py pipeline per phase, "
          "no Lua; its sample columns fetch + decode the records the service's sample drew")
    print(
        f"redis-benchmark SET -P 16: {set_small:,.0f} req/s (3 B values), {set_record:,.0f} req/s ({record_bytes} B values)"
    )
    for r in rows:
        r["ratio_insert_to_set_3B"] = r["insert_records_per_s"] / set_small
        r["ratio_insert_to_set_record_size"] = r["insert_records_per_s"] / set_record
        r["goal_insert_ge_half_plain"] = r["ratio_insert_to_plain"] >= 0.5
        r["goal_sample_p99_le_1_5_plain"] = r["ratio_sample_p99_after_commit_to_plain"] <= 1.5
        print(
            f"batch {r['batch']}: insert {r['ratio_insert_to_plain']:.2f} x plain (goal >= 0.5: "
            f"{'met' if r['goal_insert_ge_half_plain'] else 'missed'}); sample p99 "
            f"{r['ratio_sample_p99_after_commit_to_plain']:.2f} x plain fetch+decode after a commit, "
            f"{r['ratio_sample_p99_cached_to_plain']:.2f} x cached (goal <= 1.5 after a commit: "
            f"{'met' if r['goal_sample_p99_le_1_5_plain'] else 'missed'}); inserts/s = "
            f"{r['ratio_insert_to_set_3B']:.4f} x SET (3 B), {r['ratio_insert_to_set_record_size']:.3f} x SET "
            f"({record_bytes} B)"
        )
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "redis_version": redis_version,
        "record_bytes": record_bytes,
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "group_size": args.group_size,
        "capacity": args.capacity,
        "rows": rows,
        "redis_benchmark_set_p16_3B": set_small,
        "redis_benchmark_set_p16_record_size": set_record,
        "keys_held": {"service": keys[svc.prefix], "plain": keys["plain"]},
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
