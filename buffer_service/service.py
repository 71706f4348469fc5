"""ReplayService: the fresh stream, the stratified tiers and the per-prompt VCRS statistics, over one Redis.

A plain class (no Ray inside; the driver wraps it with ray.remote). Arguments and results are plain picklable
objects. Every multi-key update is one Lua script, so concurrent writers and the learner never see a
half-written state. Meant for a single Redis instance (not Redis Cluster: scripts touch per-prompt keys).

Public API
- ReplayService(config: BufferConfig, client: redis.Redis | None = None)
    client None: connect(config.redis). Refuses a Redis without a password unless redis.throwaway_local.
- push_group(group: list[Trajectory] | bytes) -> dict
    A scored group (or its Arrow IPC bytes) enters the fresh stream. Idempotent by trajectory_id: trajectories
    already pushed are skipped (a retried push adds nothing), within the last dedup_window_groups pushes. Per-prompt statistics update for the new ones
    only: R(q) = mean of the last rbar_window rewards, the zero-reward streak, the hint trigger. A record that
    fails decoding or validation goes to the dead-letter stream with the reason.
    Returns {"entry_id": str | None, "accepted": int, "duplicates": int, "dead_lettered": bool}.
- read_fresh(consumer: str, max_groups: int = 1, block_ms: int | None = None,
             reclaim_idle_ms: int | None = None) -> list[tuple[str, list[Trajectory]]]
    Through the consumer group: first entries left pending longer than reclaim_idle_ms (a dead consumer's,
    XAUTOCLAIM), then new ones. Undecodable entries are dead-lettered and acknowledged.
- commit(entry_ids: list[str], trained: list[Trajectory]) -> dict
    After the learner's step: acknowledge the entries and insert their trajectories (carrying the learner's
    advantage and mean_logratio_old_ref) into the tiers, in one script. Only the first commit of an entry
    inserts (XACK answers 1 once), so a retried commit inserts nothing: exactly once into the tiers.
    Returns {"acked": int, "inserted": int, "evicted": int, "ignored": int}.
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
    prompt_id -> {"rbar": float | None, "streak": int, "hint_active": bool, "tier": str | None, "count": int}.
    tier is the prompt's tier now by the quantile rule. A hint is active while triggered and, with
    hint.lapse_when_not_hard, while the prompt is hard; leaving the hard tier clears it (persisted, evaluated
    when the prompt is pushed or its state is asked for).
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

import math
import re
import time

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

# Shared Lua helpers: Python's round (half to even) and the quantile rule over the R(q) sorted set.
_LUA_HELPERS = """
local function round_half_even(x)
  local f = math.floor(x)
  local d = x - f
  if d > 0.5 then return f + 1 elseif d < 0.5 then return f end
  if f % 2 == 0 then return f end
  return f + 1
end
local function quantile(zkey, p, n)
  local idx = round_half_even(p * (n - 1))
  local r = redis.call('ZRANGE', zkey, idx, idx, 'WITHSCORES')
  return tonumber(r[2])
end
local function tier_of(zkey, value, hq, mq)
  local n = redis.call('ZCARD', zkey)
  if n == 0 or value == nil then return 'hard' end
  if value <= quantile(zkey, hq, n) then return 'hard' end
  if value <= quantile(zkey, mq, n) then return 'medium' end
  return 'easy'
end
"""

# KEYS: seen, fresh, stats, rbar, streak, hinted, seen_order
# ARGV: prefix, blob, group_id, prompt_id, window, threshold, hint_enabled, max_rbar, lapse, hq, mq,
#       duplicates, n, dedup_window, then n pairs (trajectory_id, reward)
_PUSH = (
    _LUA_HELPERS
    + """
local n = tonumber(ARGV[13])
local tids = {}
for i = 1, n do
  local tid = ARGV[13 + 2 * i]
  if redis.call('SISMEMBER', KEYS[1], tid) == 1 then return false end
  tids[i] = tid
end
for i = 1, n do redis.call('SADD', KEYS[1], tids[i]) end
-- remember the ids of the last dedup_window pushes only (the seen set would otherwise grow for ever)
redis.call('RPUSH', KEYS[7], table.concat(tids, '\\n'))
while redis.call('LLEN', KEYS[7]) > tonumber(ARGV[14]) do
  for old in string.gmatch(redis.call('LPOP', KEYS[7]), '[^\\n]+') do redis.call('SREM', KEYS[1], old) end
end
local pid = ARGV[4]
local entry = redis.call('XADD', KEYS[2], '*', 'blob', ARGV[2], 'group_id', ARGV[3], 'prompt_id', pid,
                         'tids', table.concat(tids, '\\n'))
local pkey = ARGV[1] .. ':ps:' .. pid
local rkey = ARGV[1] .. ':rw:' .. pid
local streak = tonumber(redis.call('HGET', pkey, 'streak') or '0')
local hint = tonumber(redis.call('HGET', pkey, 'hint') or '0')
local threshold = tonumber(ARGV[6])
local reached = false
for i = 1, n do
  local reward = ARGV[14 + 2 * i]
  redis.call('LPUSH', rkey, reward)
  if tonumber(reward) == 0 then streak = streak + 1 else streak = 0 end
  if streak >= threshold then reached = true end
end
redis.call('LTRIM', rkey, 0, tonumber(ARGV[5]) - 1)
local rewards = redis.call('LRANGE', rkey, 0, -1)
local total = 0
for _, r in ipairs(rewards) do total = total + tonumber(r) end
local rbar = total / #rewards
redis.call('ZADD', KEYS[4], rbar, pid)
redis.call('ZADD', KEYS[5], streak, pid)
if ARGV[7] == '1' and reached and (ARGV[8] == '' or rbar < tonumber(ARGV[8])) then hint = 1 end
if hint == 1 and ARGV[9] == '1' and tier_of(KEYS[4], rbar, tonumber(ARGV[10]), tonumber(ARGV[11])) ~= 'hard' then
  hint = 0
end
redis.call('HSET', pkey, 'streak', streak, 'hint', hint)
redis.call('HINCRBY', pkey, 'count', n)
if hint == 1 then redis.call('SADD', KEYS[6], pid) else redis.call('SREM', KEYS[6], pid) end
redis.call('HINCRBY', KEYS[3], 'pushed_groups', 1)
redis.call('HINCRBY', KEYS[3], 'pushed_trajectories', n)
redis.call('HINCRBY', KEYS[3], 'duplicates', tonumber(ARGV[12]))
return entry
"""
)

# KEYS: fresh, stats, rbar, blob, seq, tiers_version
# ARGV: prefix, group, cap_easy, cap_medium, cap_hard, hq, mq, now, n_entries, entry ids...,
#       n_traj, then per trajectory: tid, prompt_id, score, version, reward, advantage, blob
_COMMIT = (
    _LUA_HELPERS
    + """
local prefix = ARGV[1]
local caps = {easy = tonumber(ARGV[3]), medium = tonumber(ARGV[4]), hard = tonumber(ARGV[5])}
local hq, mq = tonumber(ARGV[6]), tonumber(ARGV[7])
local ne = tonumber(ARGV[9])
local allowed = {}
local acked = 0
for i = 1, ne do
  local eid = ARGV[9 + i]
  if redis.call('XACK', KEYS[1], ARGV[2], eid) == 1 then
    acked = acked + 1
    local e = redis.call('XRANGE', KEYS[1], eid, eid)
    if #e == 1 then
      local f = e[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'tids' then
          for tid in string.gmatch(f[j + 1], '[^\\n]+') do allowed[tid] = true end
        end
      end
    end
    redis.call('XDEL', KEYS[1], eid)
  end
end
local base = 10 + ne
local nt = tonumber(ARGV[base])
local inserted, evicted, ignored = 0, 0, 0
for i = 0, nt - 1 do
  local o = base + 7 * i
  local tid, pid = ARGV[o + 1], ARGV[o + 2]
  if allowed[tid] then
    allowed[tid] = nil
    local tier = tier_of(KEYS[3], tonumber(redis.call('ZSCORE', KEYS[3], pid)), hq, mq)
    local seq = redis.call('INCR', KEYS[5])
    local zkey = prefix .. ':tier:' .. tier
    local mkey = prefix .. ':meta:' .. tier
    redis.call('ZADD', zkey, seq, tid)
    redis.call('HSET', mkey, tid, seq .. ' ' .. ARGV[o + 3] .. ' ' .. ARGV[o + 4] .. ' ' .. ARGV[8] .. ' '
               .. ARGV[o + 5] .. ' ' .. ARGV[o + 6] .. ' ' .. pid)
    redis.call('HSET', KEYS[4], tid, ARGV[o + 7])
    inserted = inserted + 1
    while redis.call('ZCARD', zkey) > caps[tier] do
      local old = redis.call('ZPOPMIN', zkey)
      redis.call('HDEL', mkey, old[1])
      redis.call('HDEL', KEYS[4], old[1])
      evicted = evicted + 1
    end
  else
    ignored = ignored + 1
  end
end
redis.call('HINCRBY', KEYS[2], 'acked', acked)
redis.call('HINCRBY', KEYS[2], 'inserted', inserted)
redis.call('HINCRBY', KEYS[2], 'evicted', evicted)
redis.call('HINCRBY', KEYS[2], 'commit_ignored', ignored)
if inserted > 0 then redis.call('INCR', KEYS[6]) end
return {acked, inserted, evicted, ignored}
"""
)

# KEYS: rbar, hinted. ARGV: prefix, hq, mq, lapse, prompt ids...
_STATES = (
    _LUA_HELPERS
    + """
local out = {}
for i = 5, #ARGV do
  local pid = ARGV[i]
  local pkey = ARGV[1] .. ':ps:' .. pid
  local rbar = redis.call('ZSCORE', KEYS[1], pid)
  if not rbar then
    table.insert(out, {pid, '', 0, 0, '', 0})
  else
    local tier = tier_of(KEYS[1], tonumber(rbar), tonumber(ARGV[2]), tonumber(ARGV[3]))
    local h = redis.call('HMGET', pkey, 'streak', 'hint', 'count')
    local hint = tonumber(h[2] or '0')
    if hint == 1 and ARGV[4] == '1' and tier ~= 'hard' then
      hint = 0
      redis.call('HSET', pkey, 'hint', 0)
      redis.call('SREM', KEYS[2], pid)
    end
    table.insert(out, {pid, rbar, tonumber(h[1] or '0'), hint, tier, tonumber(h[3] or '0')})
  end
end
return out
"""
)

# KEYS: rejected, dead, stats. ARGV: key, source, reason, at, maxlen
_REJECT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'source', ARGV[2], 'reason', ARGV[3], 'entry_id', ARGV[1],
           'at', ARGV[4], 'payload', '')
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
redis.call('HINCRBY', KEYS[3], 'rejected', 1)
return 1
"""


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
            )
        }
        self._push = self.r.register_script(_PUSH)
        self._commit = self.r.register_script(_COMMIT)
        self._states = self.r.register_script(_STATES)
        self._reject = self.r.register_script(_REJECT)
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
        cfg = self.config
        for _ in range(10):  # optimistic: the script refuses if another writer pushed one of ours meanwhile
            seen = self.r.smismember(self.k["seen"], [t.trajectory_id for t in group])
            new = [t for t, s in zip(group, seen, strict=True) if not s]
            result["duplicates"] = len(group) - len(new)
            if not new:
                self.r.hincrby(self.k["stats"], "duplicates", len(group))
                return result
            args = [
                self.prefix,
                blob if len(new) == len(group) else encode_group(new),
                new[0].group_id,
                new[0].prompt_id,
                cfg.rbar_window,
                cfg.hint.zero_reward_streak,
                int(cfg.hint.enabled),
                "" if cfg.hint.max_rbar is None else repr(float(cfg.hint.max_rbar)),
                int(cfg.hint.lapse_when_not_hard),
                repr(cfg.hard_quantile),
                repr(cfg.medium_quantile),
                result["duplicates"],
                len(new),
                cfg.dedup_window_groups,
            ]
            for t in new:
                args += [t.trajectory_id, repr(float(t.reward))]
            keys = [self.k[n] for n in ("seen", "fresh", "stats", "rbar", "streak", "hinted", "seen_order")]
            entry = self._push(keys=keys, args=args)
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

    def commit(self, entry_ids: list[str], trained: list[Trajectory]) -> dict:
        for eid in entry_ids:
            if not isinstance(eid, str) or not _ENTRY_ID.match(eid):
                raise ValueError(f"not a stream entry id: {eid!r}")
        cfg = self.config
        caps = self.tier_capacities()
        args = [
            self.prefix,
            cfg.consumer_group,
            caps["easy"],
            caps["medium"],
            caps["hard"],
            repr(cfg.hard_quantile),
            repr(cfg.medium_quantile),
            repr(time.time()),
            len(entry_ids),
            *entry_ids,
            len(trained),
        ]
        for t in trained:
            score = priority_score(t, cfg.score_adv_weight, cfg.score_kl_weight)
            if not math.isfinite(score):
                raise RecordError(f"{t.trajectory_id}: priority score is not finite ({score})")
            adv = "nan" if t.advantage is None else repr(float(t.advantage))
            args += [
                t.trajectory_id,
                t.prompt_id,
                repr(float(score)),
                int(t.policy_version),
                repr(float(t.reward)),
                adv,
                encode_trajectory(t),
            ]
        keys = [self.k[n] for n in ("fresh", "stats", "rbar", "blob", "seq", "tiers_version")]
        acked, inserted, evicted, ignored = self._commit(keys=keys, args=args)
        return {"acked": acked, "inserted": inserted, "evicted": evicted, "ignored": ignored}

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
        cfg = self.config
        rows = self._states(
            keys=[self.k["rbar"], self.k["hinted"]],
            args=[
                self.prefix,
                repr(cfg.hard_quantile),
                repr(cfg.medium_quantile),
                int(cfg.hint.lapse_when_not_hard),
                *prompt_ids,
            ],
        )
        out = {}
        for pid, rbar, streak, hint, tier, count in rows:
            out[pid.decode()] = {
                "rbar": float(rbar) if rbar else None,
                "streak": int(streak),
                "hint_active": bool(hint),
                "tier": tier.decode() if tier else None,
                "count": int(count),
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
        return bool(self._reject(keys=keys, args=args))

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
        """Delete every key of this service's prefix (a new run on a shared Redis). Returns the count."""
        keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            self.r.delete(*keys[i : i + 500])
        self._snapshot = None
        self.r.xgroup_create(self.k["fresh"], self.config.consumer_group, id="0", mkstream=True)
        return len(keys)


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
