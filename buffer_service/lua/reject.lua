-- Unusable input into the dead-letter stream, once per key.
-- KEYS: rejected, dead, stats. ARGV: key, source, reason, at, maxlen
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'source', ARGV[2], 'reason', ARGV[3], 'entry_id', ARGV[1],
           'at', ARGV[4], 'payload', '')
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
redis.call('HINCRBY', KEYS[3], 'rejected', 1)
return 1
