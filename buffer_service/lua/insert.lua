-- After a learner step: its trained fresh entries feed the per-prompt KL statistic and (with replay on) the
-- stratified tiers, once per stream entry: an entry is marked when first inserted and the mark lasts until the
-- entry is acknowledged, so the retraining of a redelivered entry after a crash inserts nothing again. Only
-- entries still in the stream (not yet acknowledged) are taken.
-- KEYS: fresh, stats, rbar, blob, seq, tiers_version, inserted, hinted
-- ARGV: H (JSON: hint settings, prefix, caps, now, into_tiers, kl_window), n_entries, entry ids...,
--       n_traj, then per trajectory: tid, prompt_id, score, version, reward, advantage, kl, blob
local H = cjson.decode(ARGV[1])
local ne = tonumber(ARGV[2])
local allowed = {}
for i = 1, ne do
  local eid = ARGV[2 + i]
  if redis.call('SISMEMBER', KEYS[7], eid) == 0 then
    local e = redis.call('XRANGE', KEYS[1], eid, eid)
    if #e == 1 then
      redis.call('SADD', KEYS[7], eid)
      local f = e[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'tids' then
          for tid in string.gmatch(f[j + 1], '[^\n]+') do allowed[tid] = true end
        end
      end
    end
  end
end
local base = 3 + ne
local nt = tonumber(ARGV[base])
local inserted, evicted, ignored = 0, 0, 0
local touched = {}
for i = 0, nt - 1 do
  local o = base + 8 * i
  local tid, pid = ARGV[o + 1], ARGV[o + 2]
  if allowed[tid] then
    allowed[tid] = nil
    if ARGV[o + 7] ~= '' then
      local kl = push_window_mean(H.prefix .. ':kw:' .. pid, ARGV[o + 7], H.kl_window)
      redis.call('HSET', H.prefix .. ':ps:' .. pid, 'kl', kl)
      touched[pid] = true
    end
    if H.into_tiers then
      local tier = tier_of(KEYS[3], tonumber(redis.call('ZSCORE', KEYS[3], pid)), H.hq, H.mq)
      local seq = redis.call('INCR', KEYS[5])
      local zkey = H.prefix .. ':tier:' .. tier
      local mkey = H.prefix .. ':meta:' .. tier
      redis.call('ZADD', zkey, seq, tid)
      redis.call('HSET', mkey, tid, seq .. ' ' .. ARGV[o + 3] .. ' ' .. ARGV[o + 4] .. ' ' .. H.now .. ' '
                 .. ARGV[o + 5] .. ' ' .. ARGV[o + 6] .. ' ' .. pid)
      redis.call('HSET', KEYS[4], tid, ARGV[o + 8])
      inserted = inserted + 1
      while redis.call('ZCARD', zkey) > H.caps[tier] do
        local old = redis.call('ZPOPMIN', zkey)
        redis.call('HDEL', mkey, old[1])
        redis.call('HDEL', KEYS[4], old[1])
        evicted = evicted + 1
      end
    end
  else
    ignored = ignored + 1
  end
end
for pid, _ in pairs(touched) do update_hint(H, KEYS[3], KEYS[8], pid) end
redis.call('HINCRBY', KEYS[2], 'inserted', inserted)
redis.call('HINCRBY', KEYS[2], 'evicted', evicted)
redis.call('HINCRBY', KEYS[2], 'commit_ignored', ignored)
if inserted > 0 then redis.call('INCR', KEYS[6]) end
return {inserted, evicted, ignored}
