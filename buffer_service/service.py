"""ReplayService: the fresh stream, the stratified tiers and the per-prompt VCRS statistics, over one Redis.

A plain class (no Ray inside; the driver wraps it with ray.remote). Arguments and results are plain picklable
objects. Every multi-key update is one Lua script (buffer_service/lua/*.lua, registered at start, the shared
quantile and hint rules in helpers.lua), so concurrent writers and the learner never see a half-written state.
Meant for a single Redis instance (not Redis Cluster: scripts touch per-prompt keys).

Public API
- ReplayService(config: BufferConfig, client: redis.Redis | None = None)
    client None: connect(config.redis). Refuses a Redis without a password unless redis.throwaway_local.
- push_group(group: list[Trajectory] | bytes) -> dict
    A scored group (or its Arrow IPC bytes) enters the fresh stream. Idempotent by trajectory_id: trajectories
    already pushed are skipped (a retried push adds nothing), within the last dedup_window_groups pushes.
    Per-prompt statistics update for the new ones only: R(q) = mean of the last rbar_window total rewards
    (the VCRS baseline and the tier key), the task-reward mean (accuracy term, else judge, else total) over
    the same window, the zero-reward streak (whole all-zero groups, so independent of completion order), and
    the hint rule. A record that fails decoding or validation goes to the dead-letter stream with the reason.
    Returns {"entry_id": str | None, "accepted": int, "duplicates": int, "dead_lettered": bool}.
- read_fresh(consumer: str, max_groups: int = 1, block_ms: int | None = None,
             reclaim_idle_ms: int | None = None) -> list[tuple[str, list[Trajectory]]]
    Through the consumer group: first entries left pending longer than reclaim_idle_ms (a dead consumer's,
    XAUTOCLAIM), then new ones. Undecodable entries are dead-lettered and acknowledged.
- insert(entry_ids, trained, kl=None, into_tiers=True) -> dict
    Right after the learner's step: the trained trajectories (carrying the learner's advantage and
    mean_logratio_old_ref) enter the tiers, and their per-trajectory KL to the reference feeds the prompt's KL
    statistic; into_tiers False (replay off) feeds only the statistic. Once per stream entry (marked until
    acknowledged), and only for entries not yet acknowledged: the retraining of a redelivered entry after a
    crash inserts nothing. Returns {"inserted": int, "evicted": int, "ignored": int}.
- ack(entry_ids) -> int
    After the durable checkpoint that contains their training: acknowledge and delete the entries.
- commit(entry_ids, trained, kl=None) -> dict: insert, then ack; {"acked", "inserted", "evicted", "ignored"}.
- sample(n: int, strategy: str | None = None, rng_seed: int | None = None,
         current_version: int | None = None) -> list[ReplaySample]
    n draws with replacement; tier counts by the ratios (largest remainder, ties to the larger ratio); a tier
    holding fewer eligible entries than its count gives one draw per entry it holds and the rest are drawn
    from all eligible entries. priority: P ∝ exp((score - min) / T) with score = w_adv * advantage
    - w_kl * mean(old - ref logp); uniform; fifo: the oldest first, cycling. With max_age_versions set and
    current_version given, entries older than the bound are not eligible. Returns [] while the tiers hold
    fewer than min_size entries, or none is eligible.
    Each ReplaySample carries rbar = the prompt's current R(q) and the tier. Sampling removes nothing; a
    trajectory drawn twice is the same object twice (copy before mutating it).
- prompt_states(prompt_ids: list[str]) -> dict[str, dict]
    prompt_id -> {"rbar": float | None, "streak": int, "hint_active": bool, "tier": str | None, "count": int,
    "task_mean": float | None, "kl": float | None}. tier is the prompt's tier now by the quantile rule. The
    hint rule (buffer.hint: trigger paper, zero_total_streak or zero_task_streak) is evaluated when the
    prompt is pushed, when its KL statistic changes and when its state is asked for; a triggered hint stays
    on and, with hint.lapse_when_not_hard, is cleared once the prompt leaves the hard tier.
- stats() -> dict[str, int]: counters (pushed_groups, pushed_trajectories, duplicates, dead_lettered,
    rejected, read, reclaimed, acked, inserted, evicted, commit_ignored, sampled) and gauges (tier sizes, fresh_length,
    fresh_pending, dead_letter_length, prompts, hints_active).
- reject(key, source, reason) -> bool: unusable input (unreadable media, a bad manifest row) into the
    dead-letter stream with its reason, once per key; counted as rejected.
- tier_sizes() -> dict[str, int]; tier_capacities() -> dict[str, int]; dead_letters(count) -> list[dict];
  entries() -> list[dict] (the metadata of every tier entry); clear() deletes every key of this prefix.

Tier rule (AVATAR.md §3): a new entry's prompt R(q) is compared with the R(q) of every prompt seen so far:
at or below the hard_quantile (0.40) quantile -> hard, at or below medium_quantile (0.75) -> medium, else easy,
quantile = sorted_values[round(p * (n - 1))] with Python's round (half to even).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import redis

from buffer_service.config import BufferConfig
from buffer_service.records import ReplaySample, Trajectory
from buffer_service.redis_server import check_client, connect
from buffer_service.schema import (
    RecordError,
    SchemaError,
    decode_group,
    decode_trajectory,
    encode_group,
    encode_trajectory,
    validate_group,
)

TIERS = ("easy", "medium", "hard")
_ENTRY_ID = re.compile(r"^\d+-\d+$")
_LUA = Path(__file__).parent / "lua"


def _lua(name: str) -> str:
    """A script of buffer_service/lua/, with the shared helpers (quantile rule, hint rule) prepended."""
    return (_LUA / "helpers.lua").read_text() + "\n" + (_LUA / f"{name}.lua").read_text()


def task_reward(traj: Trajectory) -> float:
    """The task term of a scored completion (accuracy, else the judge's score, else the total): the per-prompt
    task-reward mean that the paper's hint trigger reads, kept apart from R(q) (the total-reward baseline)."""
    for term in ("accuracy", "judge"):
        value = traj.rewards.get(term)
        if value is not None:
            return float(value)
    return float(traj.reward)


def allocate(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """Split `total` by `ratios` into integers summing to total (largest remainder; ties to the larger ratio)."""
    raw = {k: total * ratios[k] for k in TIERS}
    counts = {k: math.floor(raw[k] + 1e-9) for k in TIERS}
    left = total - sum(counts.values())
    order = sorted(TIERS, key=lambda k: (-(raw[k] - counts[k]), -ratios[k]))
    for k in order[:left]:
        counts[k] += 1
    return counts


def priority_score(traj: Trajectory, adv_weight: float = 1.0, kl_weight: float = 0.1) -> float:
    """score = w_adv * advantage - w_kl * mean(old logp - ref logp); missing terms count as 0."""
    logratio = traj.mean_logratio_old_ref
    if logratio is None and traj.ref_logprobs:
        logratio = float(np.mean(np.subtract(traj.behaviour_logprobs, traj.ref_logprobs)))
    return adv_weight * (traj.advantage or 0.0) - kl_weight * (logratio or 0.0)


class ReplayService:
    """See the module docstring."""

    def __init__(self, config: BufferConfig | None = None, client: redis.Redis | None = None):
        self.config = config or BufferConfig()
        if client is None:
            client = connect(self.config.redis)
        else:
            check_client(client, self.config.redis.throwaway_local)
        self.r = client
        p = self.config.redis.key_prefix
        self.prefix = p
        self.k = {
            name: f"{p}:{name}"
            for name in (
                "fresh",
                "dead",
                "rejected",
                "seen",
                "seen_order",
                "stats",
                "rbar",
                "streak",
                "hinted",
                "blob",
                "seq",
                "tiers_version",
                "inserted",
            )
        }
        self._scripts = {name: self.r.register_script(_lua(name))
                         for name in ("push", "insert", "ack", "states", "reject")}
        self._snapshot: tuple[bytes | None, dict] | None = None
        try:
            # From id 0: groups pushed before the first reader are delivered too.
            self.r.xgroup_create(self.k["fresh"], self.config.consumer_group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- fresh stream -------------------------------------------------------------------------------------
    def push_group(self, group: list[Trajectory] | bytes) -> dict:
        result = {"entry_id": None, "accepted": 0, "duplicates": 0, "dead_lettered": False}
        payload = group if isinstance(group, (bytes, bytearray, memoryview)) else None
        try:
            if payload is not None:
                group = decode_group(bytes(payload))
            validate_group(group)
            blob = bytes(payload) if payload is not None else encode_group(group)
        except (SchemaError, RecordError) as exc:
            self._dead_letter("push", str(exc), payload if payload is not None else self._try_encode(group))
            result["dead_lettered"] = True
            return result
        for _ in range(10):  # optimistic: the script refuses if another writer pushed one of ours meanwhile
            seen = self.r.smismember(self.k["seen"], [t.trajectory_id for t in group])
            new = [t for t, s in zip(group, seen, strict=True) if not s]
            result["duplicates"] = len(group) - len(new)
            if not new:
                self.r.hincrby(self.k["stats"], "duplicates", len(group))
                return result
            args = [
                self._hint_settings(),
                blob if len(new) == len(group) else encode_group(new),
                new[0].group_id,
                new[0].prompt_id,
                result["duplicates"],
                len(new),
            ]
            for t in new:
                args += [t.trajectory_id, repr(float(t.reward)), repr(task_reward(t))]
            keys = [self.k[n] for n in ("seen", "fresh", "stats", "rbar", "streak", "hinted", "seen_order")]
            entry = self._scripts["push"](keys=keys, args=args)
            if entry is not None:
                result["entry_id"] = entry.decode()
                result["accepted"] = len(new)
                return result
        raise RuntimeError("push_group: trajectory ids kept colliding with concurrent pushes")

    def read_fresh(
        self,
        consumer: str,
        max_groups: int = 1,
        block_ms: int | None = None,
        reclaim_idle_ms: int | None = None,
    ) -> list[tuple[str, list[Trajectory]]]:
        idle = self.config.reclaim_idle_ms if reclaim_idle_ms is None else reclaim_idle_ms
        group_name, fresh = self.config.consumer_group, self.k["fresh"]
        _, claimed, _ = self.r.xautoclaim(fresh, group_name, consumer, idle, start_id="0-0", count=max_groups)
        messages = list(claimed)
        if claimed:
            self.r.hincrby(self.k["stats"], "reclaimed", len(claimed))
        left = max_groups - len(messages)
        if left > 0:
            block = block_ms if block_ms and block_ms > 0 else None
            reply = self.r.xreadgroup(group_name, consumer, {fresh: ">"}, count=left, block=block)
            for _, entries in reply or []:
                messages += entries
        out = []
        for entry_id, fields in messages:
            entry_id = entry_id.decode()
            try:
                if fields is None or b"blob" not in fields:
                    raise SchemaError("stream entry has no 'blob' field")
                group = decode_group(fields[b"blob"])
                validate_group(group)
            except (SchemaError, RecordError) as exc:
                self._dead_letter("fresh", str(exc), (fields or {}).get(b"blob", b""), entry_id)
                pipe = self.r.pipeline(transaction=True)
                pipe.xack(fresh, group_name, entry_id).xdel(fresh, entry_id)
                pipe.execute()
                continue
            out.append((entry_id, group))
        if out:
            self.r.hincrby(self.k["stats"], "read", len(out))
        return out

    def _hint_settings(self, **extra) -> str:
        """The settings every script reads (hint rule, quantiles, windows), as one JSON argument."""
        cfg, hint = self.config, self.config.hint
        return json.dumps({
            "prefix": self.prefix, "hq": cfg.hard_quantile, "mq": cfg.medium_quantile,
            "rbar_window": cfg.rbar_window, "kl_window": cfg.rbar_window, "dedup_window": cfg.dedup_window_groups,
            "enabled": hint.enabled, "trigger": hint.trigger, "zero_reward_streak": hint.zero_reward_streak,
            "streak_on": "total" if hint.trigger == "zero_total_streak" else "task", "max_rbar": hint.max_rbar,
            "task_reward_max": hint.task_reward_max, "kl_max": hint.kl_max,
            "min_completions": hint.min_completions, "lapse_when_not_hard": hint.lapse_when_not_hard, **extra,
        })

    @staticmethod
    def _check_entry_ids(entry_ids: list[str]) -> None:
        for eid in entry_ids:
            if not isinstance(eid, str) or not _ENTRY_ID.match(eid):
                raise ValueError(f"not a stream entry id: {eid!r}")

    def insert(self, entry_ids: list[str], trained: list[Trajectory], kl: dict[str, float] | None = None,
               into_tiers: bool = True) -> dict:
        """Right after a learner step: the trained fresh entries' trajectories (carrying the learner's advantage
        and mean_logratio_old_ref) enter the tiers (into_tiers False: replay is off, they do not), and
        their per-trajectory KL to the reference (`kl`, trajectory id -> mean k3 over the completion) feeds the
        prompt's KL statistic. Once per entry: an entry already inserted, or already acknowledged, adds
        nothing (a retrained redelivery after a crash). Returns {"inserted", "evicted", "ignored"}."""
        self._check_entry_ids(entry_ids)
        kl = kl or {}
        settings = self._hint_settings(caps=self.tier_capacities(), now=repr(time.time()), into_tiers=into_tiers)
        args = [settings, len(entry_ids), *entry_ids, len(trained)]
        cfg = self.config
        for t in trained:
            score = priority_score(t, cfg.score_adv_weight, cfg.score_kl_weight)
            if not math.isfinite(score):
                raise RecordError(f"{t.trajectory_id}: priority score is not finite ({score})")
            adv = "nan" if t.advantage is None else repr(float(t.advantage))
            value = kl.get(t.trajectory_id)
            args += [t.trajectory_id, t.prompt_id, repr(float(score)), int(t.policy_version), repr(float(t.reward)),
                     adv, "" if value is None or not math.isfinite(value) else repr(float(value)),
                     encode_trajectory(t) if into_tiers else b""]
        keys = [self.k[n] for n in ("fresh", "stats", "rbar", "blob", "seq", "tiers_version", "inserted", "hinted")]
        inserted, evicted, ignored = self._scripts["insert"](keys=keys, args=args)
        return {"inserted": inserted, "evicted": evicted, "ignored": ignored}

    def ack(self, entry_ids: list[str]) -> int:
        """With the durable checkpoint that contains their training: acknowledge and delete the entries (each
        once; a retried ack counts nothing). Returns how many were acknowledged now."""
        self._check_entry_ids(entry_ids)
        if not entry_ids:
            return 0
        keys = [self.k[n] for n in ("fresh", "stats", "inserted")]
        return int(self._scripts["ack"](keys=keys, args=[self.config.consumer_group, *entry_ids]))

    def commit(self, entry_ids: list[str], trained: list[Trajectory], kl: dict[str, float] | None = None) -> dict:
        """insert, then ack (for a consumer that checkpoints nothing in between)."""
        out = self.insert(entry_ids, trained, kl)
        return {"acked": self.ack(entry_ids), **out}

    # ---- tiers ----------------------------------------------------------------------------------------------
    def tier_capacities(self) -> dict[str, int]:
        return allocate(self.config.capacity, self.config.tier_ratios)

    def tier_sizes(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for t in TIERS:
            pipe.zcard(f"{self.prefix}:tier:{t}")
        return dict(zip(TIERS, pipe.execute(), strict=True))

    def _load_snapshot(self) -> dict:
        """The metadata of every tier entry, read atomically; cached until the tiers change."""
        version = self.r.get(self.k["tiers_version"])
        if self._snapshot is not None and self._snapshot[0] == version and version is not None:
            return self._snapshot[1]
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.k["tiers_version"])
        for t in TIERS:
            pipe.hgetall(f"{self.prefix}:meta:{t}")
        version, *metas = pipe.execute()
        snap = {}
        for tier, meta in zip(TIERS, metas, strict=True):
            rows = sorted((_parse_meta(tid, value) for tid, value in meta.items()), key=lambda m: m["seq"])
            snap[tier] = {
                "tid": [m["trajectory_id"] for m in rows],
                "seq": np.array([m["seq"] for m in rows], dtype=np.int64),
                "score": np.array([m["score"] for m in rows], dtype=np.float64),
                "version": np.array([m["policy_version"] for m in rows], dtype=np.int64),
                "rows": rows,
            }
        self._snapshot = (version, snap)
        return snap

    def entries(self) -> list[dict]:
        """Metadata of every entry in the tiers (oldest first per tier), with its tier."""
        snap = self._load_snapshot()
        return [dict(row, tier=tier) for tier in TIERS for row in snap[tier]["rows"]]

    def sample(
        self,
        n: int,
        strategy: str | None = None,
        rng_seed: int | None = None,
        current_version: int | None = None,
    ) -> list[ReplaySample]:
        strategy = strategy or self.config.sampling
        if strategy not in ("priority", "uniform", "fifo"):
            raise ValueError(f"sampling strategy must be priority, uniform or fifo, got {strategy!r}")
        if n <= 0:
            return []
        rng = np.random.default_rng(rng_seed)
        for _ in range(5):  # an eviction between choosing and fetching: choose again from a fresh snapshot
            snap = self._load_snapshot()
            pools = {t: self._eligible(snap[t], current_version) for t in TIERS}
            held = sum(len(snap[t]["tid"]) for t in TIERS)
            if held < self.config.min_size or not any(len(idx) for idx in pools.values()):
                return []
            chosen: list[tuple[str, str]] = []  # (trajectory_id, tier)
            short = 0
            for tier, count in allocate(n, self.config.tier_ratios).items():
                pool = pools[tier]
                take = min(count, len(pool))
                short += count - take
                for i in self._draw(snap[tier], pool, take, strategy, rng):
                    chosen.append((snap[tier]["tid"][i], tier))
            if short:
                union = [(t, i) for t in TIERS for i in pools[t]]
                merged = {
                    "score": np.array([snap[t]["score"][i] for t, i in union]),
                    "seq": np.array([snap[t]["seq"][i] for t, i in union]),
                }
                for j in self._draw(merged, np.arange(len(union)), short, strategy, rng):
                    tier, i = union[j]
                    chosen.append((snap[tier]["tid"][i], tier))
            samples = self._fetch(chosen, snap)
            if samples is not None:
                return samples
            self._snapshot = None
        raise RuntimeError("sample: the tiers kept changing under the sampler")

    def _eligible(self, tier_snap: dict, current_version: int | None) -> np.ndarray:
        idx = np.arange(len(tier_snap["tid"]))
        bound = self.config.max_age_versions
        if bound is not None and current_version is not None:
            idx = idx[current_version - tier_snap["version"] <= bound]
        return idx

    def _draw(self, tier_snap: dict, pool: np.ndarray, k: int, strategy: str, rng) -> list[int]:
        if k <= 0 or len(pool) == 0:
            return []
        if strategy == "fifo":
            order = pool[np.argsort(tier_snap["seq"][pool], kind="stable")]
            return [int(order[i % len(order)]) for i in range(k)]
        if strategy == "uniform":
            return [int(i) for i in rng.choice(pool, size=k, replace=True)]
        scores = tier_snap["score"][pool]
        weights = np.exp((scores - scores.min()) / self.config.priority_temperature)
        return [int(i) for i in rng.choice(pool, size=k, replace=True, p=weights / weights.sum())]

    def _fetch(self, chosen: list[tuple[str, str]], snap: dict) -> list[ReplaySample] | None:
        unique = list(dict.fromkeys(tid for tid, _ in chosen))
        blobs = self.r.hmget(self.k["blob"], unique)
        if any(b is None for b in blobs):
            return None
        trajs = {tid: decode_trajectory(b) for tid, b in zip(unique, blobs, strict=True)}
        pids = list(dict.fromkeys(t.prompt_id for t in trajs.values()))
        pipe = self.r.pipeline(transaction=False)
        pipe.zmscore(self.k["rbar"], pids)
        pipe.hincrby(self.k["stats"], "sampled", len(chosen))
        rbars = dict(zip(pids, pipe.execute()[0], strict=True))
        return [
            ReplaySample(trajectory=trajs[tid], rbar=float(rbars[trajs[tid].prompt_id]), tier=tier)
            for tid, tier in chosen
        ]

    # ---- prompts ----------------------------------------------------------------------------------------------
    def prompt_states(self, prompt_ids: list[str]) -> dict[str, dict]:
        if not prompt_ids:
            return {}
        rows = self._scripts["states"](keys=[self.k["rbar"], self.k["hinted"]],
                                       args=[self._hint_settings(), *prompt_ids])
        out = {}
        for pid, rbar, streak, hint, tier, count, task, kl in rows:
            out[pid.decode()] = {
                "rbar": float(rbar) if rbar else None,
                "streak": int(streak),
                "hint_active": bool(hint),
                "tier": tier.decode() if tier else None,
                "count": int(count),
                "task_mean": float(task) if task else None,
                "kl": float(kl) if kl else None,
            }
        return out

    def top_streaks(self, k: int = 10) -> list[tuple[str, int]]:
        rows = self.r.zrevrange(self.k["streak"], 0, k - 1, withscores=True)
        return [(pid.decode(), int(score)) for pid, score in rows]

    # ---- dead letters, stats --------------------------------------------------------------------------------
    def _try_encode(self, group) -> bytes:
        try:
            return encode_group(list(group))
        except Exception:  # an object that cannot even be encoded: keep the reason only
            return b""

    def _dead_letter(self, source: str, reason: str, payload: bytes, entry_id: str = "") -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(
            self.k["dead"],
            {
                "source": source,
                "reason": reason,
                "entry_id": entry_id,
                "at": repr(time.time()),
                "payload": payload,
            },
            maxlen=self.config.dead_letter_maxlen,
            approximate=True,
        )
        pipe.hincrby(self.k["stats"], "dead_lettered", 1)
        pipe.execute()

    def reject(self, key: str, source: str, reason: str) -> bool:
        """Input that cannot be used (a prompt whose media cannot be read, a malformed manifest row): its reason
        enters the dead-letter stream once per key (a resumed job that meets it again adds nothing), counted
        as `rejected`. Returns True the first time."""
        keys = [self.k["rejected"], self.k["dead"], self.k["stats"]]
        args = [key, source, reason, repr(time.time()), self.config.dead_letter_maxlen]
        return bool(self._scripts["reject"](keys=keys, args=args))

    def dead_letters(self, count: int = 100, newest: bool = False) -> list[dict]:
        """The first `count` dead letters, oldest first (newest: the last `count`, newest first)."""
        read = self.r.xrevrange if newest else self.r.xrange
        out = []
        for eid, fields in read(self.k["dead"], count=count):
            row = {k.decode(): v for k, v in fields.items()}
            for key in ("source", "reason", "entry_id", "at"):
                row[key] = row.get(key, b"").decode(errors="replace")
            row["id"] = eid.decode()
            out.append(row)
        return out

    COUNTERS = (
        "pushed_groups",
        "pushed_trajectories",
        "duplicates",
        "dead_lettered",
        "read",
        "reclaimed",
        "acked",
        "inserted",
        "evicted",
        "commit_ignored",
        "sampled",
        "rejected",
    )

    def stats(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k["stats"])
        pipe.xlen(self.k["fresh"])
        pipe.xpending(self.k["fresh"], self.config.consumer_group)
        pipe.xlen(self.k["dead"])
        pipe.zcard(self.k["rbar"])
        pipe.scard(self.k["hinted"])
        counters, fresh_len, pending, dead_len, prompts, hinted = pipe.execute()
        out = {name: 0 for name in self.COUNTERS}
        out.update({k.decode(): int(v) for k, v in counters.items()})
        out.update({f"tier_{t}": size for t, size in self.tier_sizes().items()})
        out.update(
            fresh_length=fresh_len,
            fresh_pending=pending["pending"],
            dead_letter_length=dead_len,
            prompts=prompts,
            hints_active=hinted,
        )
        return out

    def clear(self) -> int:
        """Delete every key of this service's prefix (a new run on a shared Redis). Returns the count, leaving
        out an empty fresh stream (every client creates it with its consumer group: it holds nothing)."""
        keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
        counted = sum(1 for k in keys if k.decode() != self.k["fresh"] or self.r.xlen(k))
        for i in range(0, len(keys), 500):
            self.r.delete(*keys[i : i + 500])
        self._snapshot = None
        self.r.xgroup_create(self.k["fresh"], self.config.consumer_group, id="0", mkstream=True)
        return counted


def _parse_meta(tid: bytes, value: bytes) -> dict:
    seq, score, version, inserted_at, reward, advantage, prompt_id = value.decode().split(" ", 6)
    return {
        "trajectory_id": tid.decode(),
        "seq": int(seq),
        "score": float(score),
        "policy_version": int(version),
        "inserted_at": float(inserted_at),
        "reward": float(reward),
        "advantage": float(advantage),
        "prompt_id": prompt_id,
    }
