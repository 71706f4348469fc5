"""Inspect a replay buffer: `python -m buffer_service.inspect --url redis://127.0.0.1:6379/0 --password ...`.

Prints tier sizes and capacities, entry ages (policy versions and seconds), reward and advantage distributions
per tier, the fresh stream, the dead letters (the newest with their reasons), the counters and the prompts with the longest zero-reward streaks.
inspect_text(service) returns the same text (the cluster CLI calls it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from buffer_service.config import BufferConfig, RedisConfig
from buffer_service.redis_server import PASSWORD_ENV
from buffer_service.service import ReplayService
from buffer_service.tiers import TIERS


def _dist(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    a = np.asarray(values, dtype=np.float64)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return f"mean {a.mean():+.3f}  min {a.min():+.3f}  p10 {p10:+.3f}  p50 {p50:+.3f}  p90 {p90:+.3f}  max {a.max():+.3f}"


def inspect_text(service: ReplayService, top: int = 10, now: float | None = None) -> str:
    now = time.time() if now is None else now
    stats = service.stats()
    caps = service.tier_capacities()
    entries = service.entries()
    newest_version = max((e["policy_version"] for e in entries), default=0)
    lines = [f"replay buffer '{service.prefix}'", "", "tiers:"]
    for tier in TIERS:
        rows = [e for e in entries if e["tier"] == tier]
        lines.append(f"  {tier:<7} {len(rows):>6} / {caps[tier]:<6}")
        if not rows:
            continue
        ages_v = [newest_version - e["policy_version"] for e in rows]
        ages_s = [now - e["inserted_at"] for e in rows]
        lines.append(f"    age (versions behind newest) {_dist(ages_v)}")
        lines.append(f"    age (seconds)                {_dist(ages_s)}")
        lines.append(f"    reward                       {_dist([e['reward'] for e in rows])}")
        lines.append(f"    advantage                    {_dist([e['advantage'] for e in rows])}")
        lines.append(f"    priority score               {_dist([e['score'] for e in rows])}")
    lines += [
        "",
        f"fresh stream: {stats['fresh_length']} entries, {stats['fresh_pending']} pending (read, not committed)",
        f"dead letters: {stats['dead_letter_length']}",
        *[f"  {d['source']:<8} {d['entry_id'] or '-':<28} {d['reason'][:200]}" for d in service.dead_letters(top, newest=True)],
        f"prompts: {stats['prompts']}, hints active: {stats['hints_active']}",
        "",
        "counters: " + ", ".join(f"{k} {stats[k]}" for k in ReplayService.COUNTERS),
        "",
        f"top {top} prompts by zero-reward streak:",
    ]
    streaks = service.top_streaks(top)
    states = service.prompt_states([pid for pid, _ in streaks])
    for pid, streak in streaks:
        st = states[pid]
        rbar = "-" if st["rbar"] is None else f"{st['rbar']:.3f}"
        lines.append(
            f"  {pid:<32} streak {streak:>3}  R(q) {rbar}  tier {st['tier']}  hint {'on' if st['hint_active'] else 'off'}"
        )
    if not streaks:
        lines.append("  (none)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m buffer_service.inspect", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="redis://host:port/db (rediss:// for TLS)")
    parser.add_argument("--password", default=None, help=f"default: ${PASSWORD_ENV}")
    parser.add_argument("--prefix", default="avatar", help="key prefix of the run (buffer.redis.key_prefix)")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--tls-ca-certs", default=None)
    parser.add_argument("--throwaway-local", action="store_true", help="allow a Redis without a password")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    redis_cfg = RedisConfig(
        url=args.url,
        password=args.password or os.environ.get(PASSWORD_ENV),
        tls=args.tls,
        tls_ca_certs=args.tls_ca_certs,
        throwaway_local=args.throwaway_local,
        key_prefix=args.prefix,
    )
    try:
        service = ReplayService(BufferConfig(redis=redis_cfg))
    except (RuntimeError, ConnectionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(inspect_text(service, top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
