-- Shared by every script (prepended when the scripts are registered): Python's round (half to even), the
-- quantile rule over the R(q) sorted set, list means, and the hint rule, evaluated in one place for pushes,
-- post-step statistics and state reads.
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

-- push `value` onto the list `key`, keep the newest `window`, return their mean
local function push_window_mean(key, value, window)
  redis.call('LPUSH', key, value)
  redis.call('LTRIM', key, 0, window - 1)
  local total, values = 0, redis.call('LRANGE', key, 0, -1)
  for _, v in ipairs(values) do total = total + tonumber(v) end
  return total / #values
end

-- The hint rule (docs/method.md section 4). H: the hint settings as JSON-decoded by the caller. Triggers:
--   paper: the prompt is in the hard tier, has at least min_completions scored completions, its task-reward
--          mean is at most task_reward_max and its KL to the reference at most kl_max (unknown KL: the policy
--          has not been trained on it yet, so it is still the reference: 0);
--   zero_total_streak / zero_task_streak: the zero-reward streak (whole all-zero groups) reached the threshold.
-- Optional for every trigger: R(q) below max_rbar. A triggered hint stays on; with lapse_when_not_hard it is
-- cleared once the prompt leaves the hard tier. Returns {hint, tier}; persists the hint flag.
local function update_hint(H, rbar_key, hinted_key, pid)
  local pkey = H.prefix .. ':ps:' .. pid
  local rbar = redis.call('ZSCORE', rbar_key, pid)
  if not rbar then return {0, false} end
  rbar = tonumber(rbar)
  local tier = tier_of(rbar_key, rbar, H.hq, H.mq)
  local h = redis.call('HMGET', pkey, 'streak', 'hint', 'count', 'task', 'kl')
  local hint = tonumber(h[2] or '0')
  if H.enabled then
    local fire
    if H.trigger == 'paper' then
      fire = tier == 'hard' and tonumber(h[3] or '0') >= H.min_completions
        and h[4] and tonumber(h[4]) <= H.task_reward_max and tonumber(h[5] or '0') <= H.kl_max
    else
      fire = tonumber(h[1] or '0') >= H.zero_reward_streak
    end
    if fire and (H.max_rbar == cjson.null or rbar < H.max_rbar) then hint = 1 end
  end
  if hint == 1 and H.lapse_when_not_hard and tier ~= 'hard' then hint = 0 end
  redis.call('HSET', pkey, 'hint', hint)
  if hint == 1 then redis.call('SADD', hinted_key, pid) else redis.call('SREM', hinted_key, pid) end
  return {hint, tier}
end
