"""The Redis store's Lua scripts: each change (and each read of manifest + tensors) is one atomic script.

Keys under the namespace P (see prefix_store/redis.py):
    P:blob:<sha>   tensors;  P:alias  name -> sha;  P:current  name -> manifest JSON;
    P:v:<name>     sha -> manifest JSON;  P:order:<name>  zset sha by created;  P:refs  sha -> kept (name, sha) count
Every change publishes {"name", "version"} (version absent after a delete) on P:events.
Scripts return {status, value}: ok | conflict (value: the current version or '') | notfound | noversion | noblob.
"""

_COMMON = """
local p, name = ARGV[1], ARGV[2]
local alias, current, vkey, okey = p..':alias', p..':current', p..':v:'..name, p..':order:'..name
local function drop(v)  -- forget version v of name; delete its blob when no kept version points to it
  redis.call('HDEL', vkey, v)
  redis.call('ZREM', okey, v)
  if redis.call('HINCRBY', p..':refs', v, -1) <= 0 then
    redis.call('HDEL', p..':refs', v)
    redis.call('DEL', p..':blob:'..v)
  end
end
local function conflict(cur, expected)
  if expected == '' then return false end
  if expected == '*' then return not cur end
  return cur ~= expected
end
"""

# ARGV: prefix, name, sha, manifest_json, expected ('' none, '*' exists), keep, created ('' = server time)
PUT = _COMMON + """
local sha, keep = ARGV[3], tonumber(ARGV[6])
local cur = redis.call('HGET', alias, name)
if conflict(cur, ARGV[5]) then return {'conflict', cur or ''} end
local blob = p..':blob:'..sha
if redis.call('EXISTS', blob) == 0 then return {'noblob', sha} end
local man = redis.call('HGET', vkey, sha)
if not man then  -- a new version of this name (versions are immutable: an existing one is kept as it was)
  man = ARGV[4]
  local created = tonumber(ARGV[7])
  if not created then
    local t = redis.call('TIME')
    created = tonumber(t[1]) + tonumber(t[2]) / 1e6
  end
  redis.call('HSET', vkey, sha, man)
  redis.call('ZADD', okey, created, sha)
  redis.call('HINCRBY', p..':refs', sha, 1)
end
redis.call('PERSIST', blob)
redis.call('HSET', alias, name, sha)
redis.call('HSET', current, name, man)
local n = redis.call('ZCARD', okey)
if n > keep then
  for _, v in ipairs(redis.call('ZRANGE', okey, 0, n - keep - 1)) do
    if v ~= sha then drop(v) end
  end
end
redis.call('PUBLISH', p..':events', cjson.encode({name = name, version = sha}))
return {'ok', man}
"""

# ARGV: prefix, name, version (full sha), expected
SET_VERSION = _COMMON + """
local sha = ARGV[3]
local cur = redis.call('HGET', alias, name)
if not cur then return {'notfound', ''} end
if conflict(cur, ARGV[4]) then return {'conflict', cur} end
local man = redis.call('HGET', vkey, sha)
if not man then return {'noversion', sha} end
if redis.call('EXISTS', p..':blob:'..sha) == 0 then return {'noblob', sha} end
redis.call('HSET', alias, name, sha)
redis.call('HSET', current, name, man)
redis.call('PUBLISH', p..':events', cjson.encode({name = name, version = sha}))
return {'ok', man}
"""

# ARGV: prefix, name, expected
DELETE = _COMMON + """
local cur = redis.call('HGET', alias, name)
if not cur then return {'notfound', ''} end
if conflict(cur, ARGV[3]) then return {'conflict', cur} end
for _, v in ipairs(redis.call('HKEYS', vkey)) do drop(v) end
redis.call('DEL', vkey, okey)
redis.call('HDEL', alias, name)
redis.call('HDEL', current, name)
redis.call('PUBLISH', p..':events', cjson.encode({name = name}))
return {'ok', cur}
"""

# ARGV: prefix, name, version ('' = current). Returns {status, manifest, tensors | false} in one atomic read.
GET = _COMMON + """
local sha, man = ARGV[3], nil
if sha == '' then
  sha = redis.call('HGET', alias, name)
  if not sha then return {'notfound', ''} end
  man = redis.call('HGET', current, name)
  if not man then return {'notfound', ''} end
else
  man = redis.call('HGET', vkey, sha)
  if not man then return {'noversion', sha} end
end
local blob = redis.call('GET', p..':blob:'..sha)
if not blob then return {'noblob', sha} end
return {'ok', man, blob}
"""
