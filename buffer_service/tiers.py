"""The stratified tiers (easy, medium, hard) and replay sampling from them.

Trained fresh entries enter the tiers right after the learner's step (insert.lua: once per stream entry, the
tier by the prompt's R(q) quantile, the oldest entry evicted past the tier's capacity) and are acknowledged with
the durable checkpoint that contains their training (ack.lua). The sampler draws from a snapshot of the tiers'
metadata (one consistent read, cached while the tiers do not change, then brought up to date from what the
inserts changed) and fetches the drawn records' bytes."""

from __future__ import annotations

import math
import re
import time

import numpy as np

from buffer_service.prompt_state import script_settings
from buffer_service.records import ReplaySample, Trajectory
from buffer_service.schema import RecordError, decode_trajectory, encode_trajectory
from buffer_service.store import Store

TIERS = ("easy", "medium", "hard")
_ENTRY_ID = re.compile(r"^\d+-\d+$")


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


def _check_entry_ids(entry_ids: list[str]) -> None:
    for eid in entry_ids:
        if not isinstance(eid, str) or not _ENTRY_ID.match(eid):
            raise ValueError(f"not a stream entry id: {eid!r}")


class Tiers:
    def __init__(self, store: Store):
        self.store = store
        # (tiers_version, the tiers' metadata, the seq counter) as of one consistent read
        self._snapshot: tuple[bytes | None, dict, int] | None = None

    def forget_snapshot(self) -> None:
        self._snapshot = None

    # ---- entering and leaving ------------------------------------------------------------------------------
    def insert(self, entry_ids: list[str], trained: list[Trajectory], kl: dict[str, float] | None = None,
               into_tiers: bool = True) -> dict:
        """Right after a learner step: the trained fresh entries' trajectories (carrying the learner's advantage
        and mean_logratio_old_ref) enter the tiers (into_tiers False: replay is off, they do not), and
        their per-trajectory KL to the reference (`kl`, trajectory id -> mean k3 over the completion) feeds the
        prompt's KL statistic. Once per entry: an entry already inserted, or already acknowledged, adds
        nothing (a retrained redelivery after a crash). Returns {"inserted", "evicted", "ignored"}."""
        _check_entry_ids(entry_ids)
        kl = kl or {}
        cfg = self.store.config
        settings = script_settings(cfg, caps=self.capacities(), now=repr(time.time()), into_tiers=into_tiers)
        args = [settings, len(entry_ids), *entry_ids, len(trained)]
        for t in trained:
            score = priority_score(t, cfg.score_adv_weight, cfg.score_kl_weight)
            if not math.isfinite(score):
                raise RecordError(f"{t.trajectory_id}: priority score is not finite ({score})")
            adv = "nan" if t.advantage is None else repr(float(t.advantage))
            value = kl.get(t.trajectory_id)
            args += [t.trajectory_id, t.prompt_id, repr(float(score)), int(t.policy_version), repr(float(t.reward)),
                     adv, "" if value is None or not math.isfinite(value) else repr(float(value)),
                     encode_trajectory(t) if into_tiers else b""]
        keys = self.store.keys("fresh", "stats", "rbar", "blob", "seq", "tiers_version", "inserted", "hinted")
        inserted, evicted, ignored = self.store.scripts["insert"](keys=keys, args=args)
        return {"inserted": inserted, "evicted": evicted, "ignored": ignored}

    def ack(self, entry_ids: list[str]) -> int:
        """With the durable checkpoint that contains their training: acknowledge and delete the entries (each
        once; a retried ack counts nothing). Returns how many were acknowledged now."""
        _check_entry_ids(entry_ids)
        if not entry_ids:
            return 0
        keys = self.store.keys("fresh", "stats", "inserted")
        return int(self.store.scripts["ack"](keys=keys, args=[self.store.config.consumer_group, *entry_ids]))

    # ---- sizes and contents --------------------------------------------------------------------------------
    def capacities(self) -> dict[str, int]:
        return allocate(self.store.config.capacity, self.store.config.tier_ratios)

    def sizes(self) -> dict[str, int]:
        pipe = self.store.r.pipeline(transaction=False)
        for t in TIERS:
            pipe.zcard(f"{self.store.prefix}:tier:{t}")
        return dict(zip(TIERS, pipe.execute(), strict=True))

    def _load_snapshot(self) -> dict:
        """The metadata of every tier entry as it was at one tiers_version; cached until the tiers change, then
        brought up to date from what changed (_refresh), or read whole (one MULTI) when that is not enough."""
        r, k, cached = self.store.r, self.store.k, self._snapshot
        version = r.get(k["tiers_version"])
        if cached is not None and cached[0] == version and version is not None:
            return cached[1]
        if cached is not None and version is not None:
            refreshed = self._refresh(cached[1], cached[2])
            if refreshed is not None:
                self._snapshot = refreshed
                return refreshed[1]
        pipe = r.pipeline(transaction=True)
        pipe.get(k["tiers_version"])
        pipe.get(k["seq"])
        for t in TIERS:
            pipe.hgetall(f"{self.store.prefix}:meta:{t}")
        version, seq, *metas = pipe.execute()
        snap = {tier: _tier_snapshot(meta) for tier, meta in zip(TIERS, metas, strict=True)}
        self._snapshot = (version, snap, int(seq or 0))
        return snap

    def _refresh(self, snap: dict, last_seq: int) -> tuple[bytes, dict, int] | None:
        """`snap` (read when the seq counter was last_seq) brought up to the tiers' current version by reading
        only what changed, or None when that cannot be done safely (the caller reads everything). The tiers
        change only by insert.lua: entries enter with a seq above every earlier one (the seq counter) and leave
        oldest first (ZPOPMIN), so a tier now holds its snapshot's entries from its lowest seq on, plus its
        members above last_seq. Checked: the counter went forward (not cleared), the lowest member is the
        snapshot's entry of that seq, no member re-entered its own tier, the counts add up, and each new
        member's metadata carries its seq (not evicted or inserted again between the two reads)."""
        r, prefix = self.store.r, self.store.prefix
        pipe = r.pipeline(transaction=True)
        pipe.get(self.store.k["tiers_version"])
        pipe.get(self.store.k["seq"])
        for t in TIERS:
            pipe.zcard(f"{prefix}:tier:{t}")
            pipe.zrange(f"{prefix}:tier:{t}", 0, 0, withscores=True, score_cast_func=int)
            pipe.zrangebyscore(f"{prefix}:tier:{t}", f"({last_seq}", "+inf", withscores=True, score_cast_func=int)
        now, seq, *replies = pipe.execute()
        if now is None or seq is None or int(seq) <= last_seq:
            return None
        plan = {}  # tier -> (index of the first kept entry, [(new member, its seq)])
        for i, tier in enumerate(TIERS):
            count, lowest, new = replies[3 * i : 3 * i + 3]
            old = snap[tier]
            start = len(old["tid"])  # keep nothing unless the lowest member is one of the snapshot's
            if lowest and lowest[0][1] <= last_seq:
                start = int(np.searchsorted(old["seq"], lowest[0][1]))
                if start == len(old["tid"]) or old["seq"][start] != lowest[0][1] or \
                        old["tid"][start] != lowest[0][0].decode():
                    return None
            if new and not {m.decode() for m, _ in new}.isdisjoint(old["tid"][start:]):
                return None  # an entry re-entered its own tier (only past the dedup window): read everything
            if len(old["tid"]) - start + len(new) != count:
                return None
            plan[tier] = (start, new)
        grown = [t for t in TIERS if plan[t][1]]
        pipe = r.pipeline(transaction=False)
        for tier in grown:
            pipe.hmget(f"{prefix}:meta:{tier}", [m for m, _ in plan[tier][1]])
        values = dict(zip(grown, pipe.execute(), strict=True)) if grown else {}
        out = {}
        for tier in TIERS:
            start, new = plan[tier]
            meta = {}
            for (member, member_seq), value in zip(new, values.get(tier, []), strict=True):
                if value is None or int(value.split(b" ", 1)[0]) != member_seq:
                    return None  # evicted or inserted again since the first read: read everything
                meta[member] = value
            out[tier] = _join(snap[tier], start, _tier_snapshot(meta))
        return now, out, int(seq)

    def entries(self) -> list[dict]:
        """Metadata of every entry in the tiers (oldest first per tier), with its tier."""
        snap = self._load_snapshot()
        return [dict(_parse_meta(tid, value), tier=tier) for tier in TIERS for tid, value in snap[tier]["raw"]]

    # ---- sampling ------------------------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        strategy: str | None = None,
        rng_seed: int | None = None,
        current_version: int | None = None,
    ) -> list[ReplaySample]:
        cfg = self.store.config
        strategy = strategy or cfg.sampling
        if strategy not in ("priority", "uniform", "fifo"):
            raise ValueError(f"sampling strategy must be priority, uniform or fifo, got {strategy!r}")
        if n <= 0:
            return []
        rng = np.random.default_rng(rng_seed)
        for _ in range(5):  # an eviction between choosing and fetching: choose again from a fresh snapshot
            snap = self._load_snapshot()
            pools = {t: self._eligible(snap[t], current_version) for t in TIERS}
            held = sum(len(snap[t]["tid"]) for t in TIERS)
            if held < cfg.min_size or not any(len(idx) for idx in pools.values()):
                return []
            chosen: list[tuple[str, str]] = []  # (trajectory_id, tier)
            short = 0
            for tier, count in allocate(n, cfg.tier_ratios).items():
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
            samples = self._fetch(chosen)
            if samples is not None:
                return samples
            self._snapshot = None
        raise RuntimeError("sample: the tiers kept changing under the sampler")

    def _eligible(self, tier_snap: dict, current_version: int | None) -> np.ndarray:
        idx = np.arange(len(tier_snap["tid"]))
        bound = self.store.config.max_age_versions
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
        weights = np.exp((scores - scores.min()) / self.store.config.priority_temperature)
        return [int(i) for i in rng.choice(pool, size=k, replace=True, p=weights / weights.sum())]

    def _fetch(self, chosen: list[tuple[str, str]]) -> list[ReplaySample] | None:
        """The drawn records with their prompts' R(q) now; None when one was evicted since the snapshot."""
        r, k = self.store.r, self.store.k
        unique = list(dict.fromkeys(tid for tid, _ in chosen))
        blobs = r.hmget(k["blob"], unique)
        if any(b is None for b in blobs):
            return None
        trajs = {tid: decode_trajectory(b) for tid, b in zip(unique, blobs, strict=True)}
        pids = list(dict.fromkeys(t.prompt_id for t in trajs.values()))
        pipe = r.pipeline(transaction=False)
        pipe.zmscore(k["rbar"], pids)
        pipe.hincrby(k["stats"], "sampled", len(chosen))
        rbars = dict(zip(pids, pipe.execute()[0], strict=True))
        return [
            ReplaySample(trajectory=trajs[tid], rbar=float(rbars[trajs[tid].prompt_id]), tier=tier)
            for tid, tier in chosen
        ]


def _tier_snapshot(meta: dict[bytes, bytes]) -> dict:
    """One tier's metadata (trajectory id -> "seq score version inserted_at reward advantage prompt_id") as the
    sampler's arrays, oldest (lowest seq) first. Whole columns at a time: the learner re-reads the snapshot after
    every commit and a per-entry parse was most of a sample's cost at 10,000 entries. The full rows (entries())
    are parsed on demand from "raw"."""
    tids, values = list(meta), list(meta.values())
    fields = [value.split(b" ", 6) for value in values]
    if set(map(len, fields)) - {7}:
        bad = next(value for value, f in zip(values, fields, strict=True) if len(f) != 7)
        raise ValueError(f"tier metadata {bad!r} has not 7 fields")
    seqs, scores, versions = list(zip(*fields, strict=True))[:3] if fields else ((), (), ())
    seq = np.array(list(map(int, seqs)), dtype=np.int64)
    order = np.argsort(seq, kind="stable")
    index = order.tolist()
    return {
        "tid": [tids[i].decode() for i in index],
        "seq": seq[order],
        "score": np.array(list(map(float, scores)), dtype=np.float64)[order],
        "version": np.array(list(map(int, versions)), dtype=np.int64)[order],
        "raw": [(tids[i], values[i]) for i in index],
    }


def _join(old: dict, start: int, new: dict) -> dict:
    """A tier's snapshot: `old`'s entries from index `start` on, then `new`'s (all of a higher seq)."""
    return {
        "tid": old["tid"][start:] + new["tid"],
        "seq": np.concatenate([old["seq"][start:], new["seq"]]),
        "score": np.concatenate([old["score"][start:], new["score"]]),
        "version": np.concatenate([old["version"][start:], new["version"]]),
        "raw": old["raw"][start:] + new["raw"],
    }


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
