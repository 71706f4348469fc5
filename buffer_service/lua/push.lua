-- A scored group enters the fresh stream, idempotent by trajectory id; the prompt's statistics update.
-- KEYS: seen, fresh, stats, rbar, streak, hinted, seen_order
-- ARGV: H (JSON: hint settings, prefix, rbar_window, dedup_window, streak_on), blob, group_id, prompt_id,
--       duplicates, n, then n triples (trajectory_id, total reward, task reward)
local H = cjson.decode(ARGV[1])
local n = tonumber(ARGV[6])
local tids = {}
for i = 1, n do
  local tid = ARGV[4 + 3 * i]
  if redis.call('SISMEMBER', KEYS[1], tid) == 1 then return false end
  tids[i] = tid
end
for i = 1, n do redis.call('SADD', KEYS[1], tids[i]) end
-- remember the ids of the last dedup_window pushes only (the seen set would otherwise grow for ever)
redis.call('RPUSH', KEYS[7], table.concat(tids, '\n'))
while redis.call('LLEN', KEYS[7]) > H.dedup_window do
  for old in string.gmatch(redis.call('LPOP', KEYS[7]), '[^\n]+') do redis.call('SREM', KEYS[1], old) end
end
local pid = ARGV[4]
local entry = redis.call('XADD', KEYS[2], '*', 'blob', ARGV[2], 'group_id', ARGV[3], 'prompt_id', pid,
                         'tids', table.concat(tids, '\n'))
local pkey = H.prefix .. ':ps:' .. pid
local rbar, task
local all_zero = true
for i = 1, n do
  local total, task_reward = ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  rbar = push_window_mean(H.prefix .. ':rw:' .. pid, total, H.rbar_window)
  task = push_window_mean(H.prefix .. ':tw:' .. pid, task_reward, H.rbar_window)
  local streak_value = (H.streak_on == 'total') and total or task_reward
  if tonumber(streak_value) ~= 0 then all_zero = false end
end
-- the streak counts whole groups, so it does not depend on the order of a group's completions
local streak = tonumber(redis.call('HGET', pkey, 'streak') or '0')
if all_zero then streak = streak + n else streak = 0 end
redis.call('ZADD', KEYS[4], rbar, pid)
redis.call('ZADD', KEYS[5], streak, pid)
redis.call('HSET', pkey, 'streak', streak, 'task', task)
redis.call('HINCRBY', pkey, 'count', n)
update_hint(H, KEYS[4], KEYS[6], pid)
redis.call('HINCRBY', KEYS[3], 'pushed_groups', 1)
redis.call('HINCRBY', KEYS[3], 'pushed_trajectories', n)
redis.call('HINCRBY', KEYS[3], 'duplicates', tonumber(ARGV[5]))
return entry
