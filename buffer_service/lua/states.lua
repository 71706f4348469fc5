-- The per-prompt state the driver decides hints from; the hint rule is evaluated now (quantiles move).
-- KEYS: rbar, hinted. ARGV: H (JSON), prompt ids...
local H = cjson.decode(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local pid = ARGV[i]
  local rbar = redis.call('ZSCORE', KEYS[1], pid)
  if not rbar then
    table.insert(out, {pid, '', 0, 0, '', 0, '', ''})
  else
    local hint_tier = update_hint(H, KEYS[1], KEYS[2], pid)
    local h = redis.call('HMGET', H.prefix .. ':ps:' .. pid, 'streak', 'count', 'task', 'kl')
    table.insert(out, {pid, rbar, tonumber(h[1] or '0'), hint_tier[1], hint_tier[2], tonumber(h[2] or '0'),
                       h[3] or '', h[4] or ''})
  end
end
return out
