-- With a durable checkpoint: acknowledge the fresh entries it contains and delete them (with their insert mark).
-- KEYS: fresh, stats, inserted. ARGV: consumer group, entry ids...
local acked = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then acked = acked + 1 end
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('SREM', KEYS[3], ARGV[i])
end
redis.call('HINCRBY', KEYS[2], 'acked', acked)
return acked
