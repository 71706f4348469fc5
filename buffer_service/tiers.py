"""The stratified tiers (easy, medium, hard) and replay sampling from them.

Trained fresh entries enter the tiers right after the learner's step (insert.lua: once per stream entry, the
tier by the prompt's R(q) quantile, the oldest entry evicted past the tier's capacity) and are acknowledged with
the durable checkpoint that contains their training (ack.lua). The sampler reads the tiers' metadata in one
snapshot, cached until an insert changes the tiers, and fetches the drawn records' bytes."""

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
        self._snapshot: tuple[bytes | None, dict] | None = None  # (tiers_version, the tiers' metadata)

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
        """The metadata of every tier entry, read atomically; cached until the tiers change."""
        r, k = self.store.r, self.store.k
        version = r.get(k["tiers_version"])
        if self._snapshot is not None and self._snapshot[0] == version and version is not None:
            return self._snapshot[1]
        pipe = r.pipeline(transaction=True)
        pipe.get(k["tiers_version"])
        for t in TIERS:
            pipe.hgetall(f"{self.store.prefix}:meta:{t}")
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
