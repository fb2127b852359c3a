"""Key layout and server-side Lua scripts of the Redis adapter (see ``serve_queue.adapters.redis``).

Keys shared with kombu (every key carries ``global_keyprefix``):

- ``<queue>``, ``<queue>\\x06\\x163``, ``<queue>\\x06\\x166``, ``<queue>\\x06\\x169``: the
  priority lists (producers LPUSH, consumers take from the right).
- ``unacked`` (hash ``tag -> '[<envelope JSON>, "<exchange>", "<routing key>"]'``),
  ``unacked_index`` (zset ``tag -> unix time``), ``unacked_mutex``: kombu's ack emulation.

Keys of serve_queue only (Celery workers do not know them):

- ``serve_queue.staging.<queue>.<adapter id>``: where one adapter's blocking wait parks the item
  it moved, private so that no other consumer takes it while its owner is already running it.
- ``serve_queue.stagings``: zset of the staging lists in use, member ``<len(base)>:<base list
  key><staging key>``, score = the unix time its owner's registration expires (owners renew it
  while they live; a sweep puts the items of an expired one back on their list).
- ``serve_queue.delayed.<queue>``: zset of requeued-with-delay items, score = due time, member
  = 32 hex chars (uniqueness) + the priority step digit + the raw list item.
- ``serve_queue.unacked_raw`` / ``serve_queue.unacked_raw_index``: in-flight records of malformed
  items (kombu could not restore them), value = ``<len(list key)>:<list key><raw item>``.
"""

from __future__ import annotations

import json

__all__ = [
    "CLAIM",
    "DEPTH",
    "FETCH",
    "MOVE",
    "PRIORITY_STEPS",
    "RESTORE_STAGING",
    "RESTORE_STAGINGS",
    "SEP",
    "UNLOCK",
    "RedisKeys",
    "step_for",
]

#: kombu's default ``priority_steps`` and ``sep``; both sides must agree.
PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
SEP = "\x06\x16"


def step_for(priority: int) -> int:
    """The priority list a message of ``priority`` (0..9) belongs to: largest step <= it."""
    return max(s for s in PRIORITY_STEPS if s <= min(max(priority, 0), 9))


class RedisKeys:
    """Names of every key the adapter touches, with kombu's ``global_keyprefix`` applied."""

    __slots__ = (
        "dlq_format",
        "mutex",
        "prefix",
        "raw",
        "raw_index",
        "stagings",
        "unacked",
        "unacked_index",
    )

    def __init__(self, prefix: str, dlq_format: str) -> None:
        self.prefix = prefix
        self.dlq_format = dlq_format
        self.unacked = prefix + "unacked"
        self.unacked_index = prefix + "unacked_index"
        self.mutex = prefix + "unacked_mutex"
        self.raw = prefix + "serve_queue.unacked_raw"
        self.raw_index = prefix + "serve_queue.unacked_raw_index"
        self.stagings = prefix + "serve_queue.stagings"

    def list_key(self, queue: str, step: int = 0) -> str:
        return f"{self.prefix}{queue}{SEP}{step}" if step else self.prefix + queue

    def list_keys(self, queue: str) -> list[str]:
        return [self.list_key(queue, s) for s in PRIORITY_STEPS]

    def staging(self, queue: str, owner: str) -> str:
        return f"{self.prefix}serve_queue.staging.{queue}.{owner}"

    def staging_member(self, queue: str, owner: str) -> str:
        """The ``stagings`` member registering ``owner``'s staging list of ``queue``."""
        base = self.list_key(queue)
        return f"{len(base.encode())}:{base}{self.staging(queue, owner)}"

    def delayed(self, queue: str) -> str:
        return f"{self.prefix}serve_queue.delayed.{queue}"

    def dlq(self, queue: str) -> str:
        return self.prefix + self.dlq_format.format(queue=queue)

    def fetch_keys(self, queues: list[str]) -> list[str]:
        keys = [self.unacked, self.unacked_index, self.raw, self.raw_index]
        for q in queues:
            keys += [*self.list_keys(q), self.delayed(q)]
        return keys

    def depth_keys(self, queue: str) -> list[str]:
        lists = self.list_keys(queue)
        return [*lists, self.stagings, self.delayed(queue), self.unacked, self.raw]


def quoted(queue: str) -> str:
    """The queue name as a JSON string, the way kombu writes it in ``unacked`` values."""
    return json.dumps(queue)


# Move up to ARGV[1] items into flight. Delayed items that are due go to the front of their list
# first; then priority-major over the queues (0 first: Redis priority is inverted). KEYS = the 4
# record keys, then per queue its 4 priority lists and its delayed zset. A well-formed item is
# recorded like kombu does (unacked + unacked_index, exchange "" and the queue as routing key so
# kombu's restore puts it back on this queue); a malformed one under a generated tag in the raw
# hash. Returns {codes, tags, item...}: codes = comma-separated pairs "meta,len(tag)" (meta =
# queue index * 100 + step * 10 + 1 if malformed), tags = every tag concatenated; one reply
# element per item keeps the client's parsing cheap.
FETCH = """
local limit = tonumber(ARGV[1])
local now = ARGV[2]
local nq = (#KEYS - 4) / 5
local slot_of = {['0'] = 1, ['3'] = 2, ['6'] = 3, ['9'] = 4}
local steps = {0, 3, 6, 9}
for q = 1, nq do
  local dkey = KEYS[4 + (q - 1) * 5 + 5]
  local due = redis.call('ZRANGE', dkey, '-inf', now, 'BYSCORE', 'LIMIT', 0, 500)
  for i = #due, 1, -1 do
    local slot = slot_of[string.sub(due[i], 33, 33)] or 1
    redis.call('RPUSH', KEYS[4 + (q - 1) * 5 + slot], string.sub(due[i], 34))
  end
  if #due > 0 then redis.call('ZREM', dkey, unpack(due)) end
end
local out, codes, tags, index, got, seq = {'', ''}, {}, {}, {}, 0, 0
local function record(q, slot, item)
  seq = seq + 1
  local ok, env = pcall(cjson.decode, item)
  local tag = nil
  if ok and type(env) == 'table' and type(env['properties']) == 'table' then
    local t = env['properties']['delivery_tag']
    if type(t) == 'string' and t ~= '' then tag = t end
  end
  local kind = 0
  if tag then
    local value = '[' .. item .. ', "", ' .. ARGV[3 + q] .. ']'
    if redis.call('HSETNX', KEYS[1], tag, value) == 0 then
      tag = ARGV[3] .. seq
      redis.call('HSET', KEYS[1], tag, value)
    end
    index[#index + 1] = now
    index[#index + 1] = tag
  else
    kind = 1
    tag = ARGV[3] .. seq
    local key = KEYS[4 + (q - 1) * 5 + slot]
    redis.call('HSET', KEYS[3], tag, #key .. ':' .. key .. item)
    redis.call('ZADD', KEYS[4], now, tag)
  end
  codes[#codes + 1] = (q - 1) * 100 + steps[slot] * 10 + kind
  codes[#codes + 1] = #tag
  tags[#tags + 1] = tag
  out[#out + 1] = item
end
for slot = 1, 4 do
  for q = 1, nq do
    if got < limit then
      local items = redis.call('RPOP', KEYS[4 + (q - 1) * 5 + slot], limit - got)
      if items then
        got = got + #items
        for _, item in ipairs(items) do record(q, slot, item) end
      end
    end
  end
end
for i = 1, #index, 1000 do
  redis.call('ZADD', KEYS[2], unpack(index, i, math.min(i + 999, #index)))
end
out[1] = table.concat(codes, ',')
out[2] = table.concat(tags)
return out
"""

# Record one item a blocking wait parked in its owner's private staging list as in flight, if
# it is still there (a sweep may have put it back after the owner's registration expired).
# KEYS = unacked, unacked_index, raw, raw_index, staging list, base list; ARGV = tag, item,
# now, the queue quoted, "1" if malformed. Returns 1 if recorded, 0 if the item was gone.
CLAIM = """
if redis.call('LREM', KEYS[5], -1, ARGV[2]) == 0 then return 0 end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[3], ARGV[1], #KEYS[6] .. ':' .. KEYS[6] .. ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], '[' .. ARGV[2] .. ', "", ' .. ARGV[4] .. ']')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1
"""

# Take one in-flight record out of KEYS[1]/KEYS[2] and put ARGV[3] somewhere, atomically, only
# if the record still exists (so a settle racing a restore happens once). ARGV[2] = mode: 'L'
# LPUSH / 'R' RPUSH onto KEYS[3], 'Z' ZADD KEYS[3] score ARGV[4], 'N' nothing. ARGV[5] = ''
# or a sweep ceiling: then skip records renewed past it and drop index entries left orphaned.
MOVE = """
local tag, mode = ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], tag)
  if score and tonumber(score) > tonumber(ARGV[5]) then return 0 end
end
if redis.call('HDEL', KEYS[1], tag) == 0 then
  if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], tag) end
  return 0
end
redis.call('ZREM', KEYS[2], tag)
if mode == 'L' then redis.call('LPUSH', KEYS[3], ARGV[3])
elseif mode == 'R' then redis.call('RPUSH', KEYS[3], ARGV[3])
elseif mode == 'Z' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3]) end
return 1
"""

# KEYS = pairs (staging, base list): put staged items back at the front of their list, oldest
# last so that it is the next one taken.
RESTORE_STAGING = """
local moved = 0
for i = 1, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT') do moved = moved + 1 end
end
return moved
"""

# KEYS[1] = the stagings zset: the staging lists whose registration expired before ARGV[1] go
# back to the front of their base lists (as RESTORE_STAGING) and leave the registry.
RESTORE_STAGINGS = """
local moved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, 100)) do
  local c = string.find(m, ':', 1, true)
  local n = c and tonumber(string.sub(m, 1, c - 1))
  if n then
    local base, staging = string.sub(m, c + 1, c + n), string.sub(m, c + n + 1)
    while redis.call('LMOVE', staging, base, 'LEFT', 'RIGHT') do moved = moved + 1 end
  end
  redis.call('ZREM', KEYS[1], m)
end
return moved
"""

# KEYS = 4 priority lists, the stagings zset, delayed, unacked, raw hash. ARGV = the two
# suffixes an unacked value of this queue ends with (kombu's ', "q"]' and a compact ',"q"]').
DEPTH = """
local ready = 0
for i = 1, 4 do ready = ready + redis.call('LLEN', KEYS[i]) end
local prefix = #KEYS[1] .. ':' .. KEYS[1]
for _, m in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then
    ready = ready + redis.call('LLEN', string.sub(m, #prefix + 1))
  end
end
local delayed = redis.call('ZCARD', KEYS[6])
local reserved = 0
local a, b = ARGV[1], ARGV[2]
for _, v in ipairs(redis.call('HVALS', KEYS[7])) do
  if string.sub(v, -#a) == a or string.sub(v, -#b) == b then reserved = reserved + 1 end
end
for _, v in ipairs(redis.call('HVALS', KEYS[8])) do
  local c = string.find(v, ':', 1, true)
  if c then
    local key = string.sub(v, c + 1, c + tonumber(string.sub(v, 1, c - 1)))
    for i = 1, 4 do
      if key == KEYS[i] then reserved = reserved + 1 end
    end
  end
end
return {ready, reserved, delayed}
"""

# Release kombu's unacked_mutex only if we still hold it.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
