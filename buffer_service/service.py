"""ReplayService: the fresh stream, the stratified tiers and the per-prompt VCRS statistics, over one Redis.

A plain class (no Ray inside; the driver wraps it with ray.remote). Arguments and results are plain picklable
objects. Every multi-key update is one Lua script (buffer_service/lua/*.lua, registered at start, the shared
quantile and hint rules in helpers.lua), so concurrent writers and the learner never see a half-written state.
Meant for a single Redis instance (not Redis Cluster: scripts touch per-prompt keys).

This class is the facade; each job lives in its own module: stream.py (the fresh stream), tiers.py (the tiers
and replay sampling), prompt_state.py (the per-prompt statistics and the scripts' settings), dead_letters.py
(the dead-letter stream), store.py (the Redis client, key names and scripts they share).

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
             reclaim_idle_ms: int | None = None, new_only: bool = False) -> list[tuple[str, list[Trajectory]]]
    Through the consumer group: first entries left pending longer than reclaim_idle_ms (a dead consumer's,
    XAUTOCLAIM), then new ones; new_only: new ones only (a consumer whose pending entries are its own and still
    accounted for: the learner after its first read). Undecodable entries are dead-lettered and acknowledged.
- take_back_fresh(consumer: str) -> list[tuple[str, list[Trajectory]]]
    Every entry pending in the consumer group, however recently read, claimed by `consumer` (a resumed
    learner's first read takes back what the previous run read and never acknowledged). Counted as reclaimed.
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

Tier rule (docs/method.md section 3): a new entry's prompt R(q) is compared with the R(q) of every prompt seen so far:
at or below the hard_quantile (0.40) quantile -> hard, at or below medium_quantile (0.75) -> medium, else easy,
quantile = sorted_values[round(p * (n - 1))] with Python's round (half to even).
"""

from __future__ import annotations

import redis

from buffer_service.config import BufferConfig
from buffer_service.dead_letters import DeadLetters
from buffer_service.prompt_state import PromptStates
from buffer_service.records import ReplaySample, Trajectory
from buffer_service.redis_server import check_client, connect
from buffer_service.store import Store
from buffer_service.stream import FreshStream
from buffer_service.tiers import Tiers
from common.metrics import ComponentEndpoint, Sample


class ReplayService:
    """See the module docstring. Every public method is one line into the part that does the job (Ray exposes
    only methods defined on the class, so the facade names each one)."""

    def __init__(self, config: BufferConfig | None = None, client: redis.Redis | None = None):
        self.config = config or BufferConfig()
        if client is None:
            client = connect(self.config.redis)
        else:
            check_client(client, self.config.redis.throwaway_local)
        store = Store(self.config, client)
        self.r, self.k, self.prefix = store.r, store.k, store.prefix  # for inspection and tests
        self._dead = DeadLetters(store)
        self._fresh = FreshStream(store, self._dead)
        self._tiers = Tiers(store)
        self._prompts = PromptStates(store)
        self._metrics = ComponentEndpoint("replay", lambda: replay_samples(self.stats()))

    # ---- fresh stream -------------------------------------------------------------------------------------
    def push_group(self, group: list[Trajectory] | bytes) -> dict:
        return self._fresh.push(group)

    def read_fresh(
        self,
        consumer: str,
        max_groups: int = 1,
        block_ms: int | None = None,
        reclaim_idle_ms: int | None = None,
        new_only: bool = False,
    ) -> list[tuple[str, list[Trajectory]]]:
        return self._fresh.read(consumer, max_groups, block_ms, reclaim_idle_ms, new_only)

    def take_back_fresh(self, consumer: str) -> list[tuple[str, list[Trajectory]]]:
        return self._fresh.take_back(consumer)

    # ---- tiers --------------------------------------------------------------------------------------------
    def insert(self, entry_ids: list[str], trained: list[Trajectory], kl: dict[str, float] | None = None,
               into_tiers: bool = True) -> dict:
        return self._tiers.insert(entry_ids, trained, kl, into_tiers)

    def ack(self, entry_ids: list[str]) -> int:
        return self._tiers.ack(entry_ids)

    def commit(self, entry_ids: list[str], trained: list[Trajectory], kl: dict[str, float] | None = None) -> dict:
        """insert, then ack (for a consumer that checkpoints nothing in between)."""
        out = self.insert(entry_ids, trained, kl)
        return {"acked": self.ack(entry_ids), **out}

    def tier_capacities(self) -> dict[str, int]:
        return self._tiers.capacities()

    def tier_sizes(self) -> dict[str, int]:
        return self._tiers.sizes()

    def entries(self) -> list[dict]:
        return self._tiers.entries()

    def sample(
        self,
        n: int,
        strategy: str | None = None,
        rng_seed: int | None = None,
        current_version: int | None = None,
    ) -> list[ReplaySample]:
        return self._tiers.sample(n, strategy, rng_seed, current_version)

    # ---- prompts ------------------------------------------------------------------------------------------
    def prompt_states(self, prompt_ids: list[str]) -> dict[str, dict]:
        return self._prompts.read(prompt_ids)

    def top_streaks(self, k: int = 10) -> list[tuple[str, int]]:
        return self._prompts.top_streaks(k)

    # ---- dead letters -------------------------------------------------------------------------------------
    def reject(self, key: str, source: str, reason: str) -> bool:
        return self._dead.reject(key, source, reason)

    def dead_letters(self, count: int = 100, newest: bool = False) -> list[dict]:
        return self._dead.read(count, newest)

    # ---- the whole service --------------------------------------------------------------------------------
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

    def metrics_endpoint(self) -> dict:
        """The service's /metrics (started on first call): read from Redis at each scrape, so they are the whole
        job's (every client's pushes and commits), whichever process serves them."""
        return self._metrics.where()

    def clear(self) -> int:
        """Delete every key of this service's prefix (a new run on a shared Redis). Returns the count, leaving
        out an empty fresh stream (every client creates it with its consumer group: it holds nothing)."""
        keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
        counted = sum(1 for k in keys if k.decode() != self.k["fresh"] or self.r.xlen(k))
        for i in range(0, len(keys), 500):
            self.r.delete(*keys[i : i + 500])
        self._tiers.forget_snapshot()
        self._fresh.create_group()
        return counted


def replay_samples(s: dict) -> list[Sample]:
    """The replay service's series from its stats(): the whole job's, read from Redis."""
    return [("avatar_fresh_stream_length", s["fresh_length"], {}), ("avatar_hints_active", s["hints_active"], {}),
            *[("avatar_buffer_tier_size", s[f"tier_{t}"], {"tier": t}) for t in ("easy", "medium", "hard")],
            *[("avatar_buffer_events_total", s[e], {"event": e}) for e in ReplayService.COUNTERS]]
