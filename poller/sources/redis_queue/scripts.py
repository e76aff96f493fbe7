"""The Lua scripts of the redis-queue source. Each touches only the keys it is given, so it also
works where keys are checked (a cluster proxy, an ACL on key patterns)."""

from __future__ import annotations

from typing import Final

# XAUTOCLAIM up to COUNT entries idle past the visibility timeout, with each entry's delivery
# counter (XAUTOCLAIM's reply lacks it; reading it here saves a round trip and a race).
# KEYS: stream. ARGV: group, consumer, min_idle_ms, cursor, count, rounds.
# Returns {next_cursor, {{id, fields}...}, {delivery_count...}}.
CLAIM_LUA: Final = """
local cursor = ARGV[4]
local want = tonumber(ARGV[5])
local entries, counts, n = {}, {}, 0
for _ = 1, tonumber(ARGV[6]) do
  local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor,
                           'COUNT', want - n)
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do
    -- Redis 6.2 answers nil for an entry deleted while pending: nothing to deliver.
    if type(entry) == 'table' and type(entry[2]) == 'table' then
      local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
      n = n + 1
      entries[n] = entry
      counts[n] = p[1] and p[1][4] or 1
    end
  end
  if n >= want or cursor == '0-0' then break end
end
return {cursor, entries, counts}
"""

# Set the idle clock of the entries this consumer still owns (an entry re-claimed by another
# consumer after our visibility lapsed is theirs now: never take it back).
# KEYS: stream. ARGV: group, consumer, idle_ms, id...  Returns how many were touched.
EXTEND_LUA: Final = """
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if p[1] then args[#args + 1] = ARGV[i] end
end
local n = #args - 4
if n == 0 then return 0 end
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return n
"""

# Move pending entries to the dead-letter stream: copy (fields + reason), XACK, XDEL. Entries
# no longer pending were settled by someone else and are skipped, so a retry is harmless.
# KEYS: stream, dead-letter stream. ARGV: group, reason, source name, delete ('1'/'0'), id...
# Returns how many were moved.
DEAD_LETTER_LUA: Final = """
local added = {DeadLetterReason = true, DeadLetterSourceQueue = true,
               DeadLetterSourceId = true, DeadLetterReceiveCount = true}
local moved = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if e[1] then
      local args = {KEYS[2], '*'}
      local fields = e[1][2]
      for j = 1, #fields, 2 do
        if not added[fields[j]] then
          args[#args + 1] = fields[j]
          args[#args + 1] = fields[j + 1]
        end
      end
      args[#args + 1] = 'DeadLetterReason'
      args[#args + 1] = ARGV[2]
      args[#args + 1] = 'DeadLetterSourceQueue'
      args[#args + 1] = ARGV[3]
      args[#args + 1] = 'DeadLetterSourceId'
      args[#args + 1] = id
      args[#args + 1] = 'DeadLetterReceiveCount'
      args[#args + 1] = tostring(p[1][4])
      redis.call('XADD', unpack(args))
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    if ARGV[4] == '1' then redis.call('XDEL', KEYS[1], id) end
    moved = moved + 1
  end
end
return moved
"""

# XACK + XDEL (delete_on_ack), atomically: an entry is never deleted without being acked.
# KEYS: stream. ARGV: group, id...  Returns how many were acked.
ACK_DELETE_LUA: Final = """
local ids = {unpack(ARGV, 2)}
if #ids == 0 then return 0 end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return acked
"""

# Remove this consumer from the group if it owns nothing (DELCONSUMER drops a consumer's
# pending entries with it, which would lose them). KEYS: stream. ARGV: group, consumer.
RETIRE_LUA: Final = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if p[1] then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# Drop consumers left by processes that ended without retiring (crashes): nothing pending,
# idle for long. KEYS: stream. ARGV: group, min_idle_ms, our consumer. Returns how many.
REAP_LUA: Final = """
local reaped = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    reaped = reaped + 1
  end
end
return reaped
"""

# Move dead letters back to a stream, oldest first: each entry is copied with its fields less
# the ones dead-lettering added, then deleted from the dead-letter stream, inside one script,
# so a crash can neither lose nor duplicate one. Only entries up to a given id move (what was
# there when the redrive began).
# KEYS: dead-letter stream, target stream. ARGV: last id, count. Returns how many moved.
REDRIVE_LUA: Final = """
local dead = {DeadLetterReason = true, DeadLetterSourceQueue = true,
              DeadLetterSourceId = true, DeadLetterReceiveCount = true}
local entries = redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', tonumber(ARGV[2]))
for _, e in ipairs(entries) do
  local args = {KEYS[2], '*'}
  local fields = e[2]
  for j = 1, #fields, 2 do
    if not dead[fields[j]] then
      args[#args + 1] = fields[j]
      args[#args + 1] = fields[j + 1]
    end
  end
  if #args == 2 then
    args[3] = 'body'
    args[4] = ''
  end
  redis.call('XADD', unpack(args))
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
"""
