"""Shard leases, fleet membership and shard reports in the Redis state store.

Keys, under the store's prefix ``{p}``, per mapping ``{u}``:

* ``{p}leases:{u}``: hash shard -> JSON ``{"owner", "counter", "taken", "expires",
  "handoff"}``. The counter is bumped by every take and renew; ``taken`` is its value at the
  take: the fencing token the holder renews and writes checkpoints under, so a take by anyone
  (even the same daemon again) fences every earlier holder. ``expires`` is in milliseconds on
  the Redis server's clock (``TIME``), so the daemons' clocks never matter. ``handoff`` names
  a peer that asked for the shard.
* ``{p}checkpoints:{u}``: the checkpoints, as on one node (redis.py); in a fleet a checkpoint
  is written by a script that checks the lease beside it in the same step: owner, counter and
  expiry, so a daemon that was paused or cut off past its lease can never move it.
* ``{p}lease_members:{u}``: sorted set daemon -> expiry (ms): the daemons running the mapping,
  which the balancing divides its shards among.
* ``{p}lease_reports:{u}``: hash daemon -> JSON list of the shards it processes, with their
  state and iterator age (what `poller mappings get` and `poller fleet` show).
* ``{p}members``: sorted set daemon -> expiry (ms), and ``{p}member_info``: hash daemon ->
  JSON (host, pid, start time, HTTP address): every daemon of the fleet, for `poller fleet`.

Every change another daemon should act on at once (a lease released or asked for, a daemon
leaving) is PUBLISHed on ``{p}leases:{u}``; daemons also look every third of a lease.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from poller.state.base import Checkpoint, StaleClaimError, StateError
from poller.state.leases import Lease, Member, Pass, View

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

    from poller.state.redis import RedisStore

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# The server's clock in milliseconds (scripts are replicated as their effects, so TIME is safe).
_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Renew the leases held here, heartbeat the mapping's membership, read every lease.
# KEYS: leases, lease_members, lease_reports. ARGV: owner, duration_ms, member (1/0), then
# shard, token pairs. Returns {now, {new counter or 0 per pair}, {live members}, {hgetall}}.
_PASS_LUA: Final = (
    _NOW
    + """
local owner, duration = ARGV[1], tonumber(ARGV[2])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('HDEL', KEYS[3], gone)
end
if ARGV[3] == '1' then redis.call('ZADD', KEYS[2], now + duration, owner) end
local renewed = {}
for i = 4, #ARGV, 2 do
  local result = 0
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local lease = cjson.decode(raw)
    if lease.owner == owner and lease.taken == tonumber(ARGV[i + 1]) and lease.expires > now then
      lease.counter = lease.counter + 1
      lease.expires = now + duration
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(lease))
      result = lease.counter
    end
  end
  renewed[#renewed + 1] = result
end
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
return {now, renewed, members, redis.call('HGETALL', KEYS[1])}
"""
)

# Take a lease that is free, expired or already ours. KEYS: leases. ARGV: shard, owner,
# duration_ms. Returns the new token (the counter, bumped), or 0 when a live peer holds it.
_TAKE_LUA: Final = (
    _NOW
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local lease = raw and cjson.decode(raw) or {counter = 0}
if lease.owner and lease.owner ~= ARGV[2] and lease.expires > now then return 0 end
lease.owner = ARGV[2]
lease.counter = lease.counter + 1
lease.taken = lease.counter
lease.expires = now + tonumber(ARGV[3])
lease.handoff = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(lease))
return lease.counter
"""
)

# Ask the live holder of a lease to hand it over. KEYS: leases. ARGV: shard, holder, asker,
# channel. Returns 1 if asked, 0 if the lease changed since it was read.
_ASK_LUA: Final = (
    _NOW
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local lease = cjson.decode(raw)
if lease.owner ~= ARGV[2] or lease.expires <= now or lease.handoff then return 0 end
lease.handoff = ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(lease))
redis.call('PUBLISH', ARGV[4], 'ask')
return 1
"""
)

# Let a lease go: to the peer that asked for it if that peer is still running the mapping
# (it adopts it without a gap), else free. KEYS: leases, lease_members. ARGV: shard, owner,
# token, duration_ms, channel. Returns the peer it went to, '' if freed, 0 if not ours.
_RELEASE_LUA: Final = (
    _NOW
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local lease = cjson.decode(raw)
if lease.owner ~= ARGV[2] or lease.taken ~= tonumber(ARGV[3]) then return 0 end
local heir = lease.handoff
if heir and not (tonumber(redis.call('ZSCORE', KEYS[2], heir) or '0') > now) then heir = nil end
lease.counter = lease.counter + 1
lease.handoff = nil
if heir then
  lease.owner = heir
  lease.taken = lease.counter
  lease.expires = now + tonumber(ARGV[4])
else
  lease.owner = nil
  lease.expires = 0
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(lease))
redis.call('PUBLISH', ARGV[5], 'release')
return heir or ''
"""
)

# Write a checkpoint under a live lease. KEYS: leases, checkpoints. ARGV: shard, owner,
# token, {"position", "window"} as JSON. Returns '' if written, else why it was refused.
_CHECKPOINT_LUA: Final = (
    _NOW
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'nobody holds its lease' end
local lease = cjson.decode(raw)
if lease.owner ~= ARGV[2] then
  local holder = lease.owner or 'nobody'
  return 'its lease moved to ' .. holder .. ' (counter ' .. lease.counter .. ')'
end
if lease.taken ~= tonumber(ARGV[3]) then
  return 'its lease was taken again (token ' .. lease.taken .. ', not ' .. ARGV[3] .. ')'
end
if lease.expires <= now then
  return 'its lease expired ' .. (now - lease.expires) .. ' ms ago'
end
local old = redis.call('HGET', KEYS[2], ARGV[1])
local entry = old and cjson.decode(old) or {}
local value = cjson.decode(ARGV[4])
entry.position = value.position
entry.window = value.window
entry.owner = ARGV[2]
entry.token = lease.taken
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
return ''
"""
)

# Leave a mapping: no longer counted in its balancing. KEYS: lease_members, lease_reports.
# ARGV: owner, channel, drop report (1/0).
_LEAVE_LUA: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] == '1' then redis.call('HDEL', KEYS[2], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], 'leave')
return 1
"""

# Heartbeat the fleet membership. KEYS: members, member_info. ARGV: owner, duration_ms, info.
_HEARTBEAT_LUA: Final = (
    _NOW
    + """
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return now
"""
)

_SCRIPTS: Final = {
    "pass": _PASS_LUA,
    "take": _TAKE_LUA,
    "ask": _ASK_LUA,
    "release": _RELEASE_LUA,
    "checkpoint": _CHECKPOINT_LUA,
    "leave": _LEAVE_LUA,
    "heartbeat": _HEARTBEAT_LUA,
}


def _lease(shard: str, raw: bytes) -> Lease:
    entry = _decode(raw)
    return Lease(
        shard,
        entry.get("owner"),
        int(entry.get("counter") or 0),
        int(entry.get("taken") or 0),
        int(entry.get("expires") or 0),
        entry.get("handoff"),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLeases:
    """The lease table of every ordered mapping, in a RedisStore (see the module docstring)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._scripts: dict[str, AsyncScript] = {}
        self._client: aioredis.Redis | None = None

    def _key(self, kind: str, uuid: str) -> str:
        return f"{self.store.key_prefix}{kind}:{uuid}"

    def keys_of(self, uuid: str) -> list[str]:
        """The mapping's lease keys (deleted with it)."""
        return [self._key(k, uuid) for k in ("leases", "lease_members", "lease_reports")]

    def channel(self, uuid: str) -> str:
        return self._key("leases", uuid)

    @property
    def _members_key(self) -> str:
        return f"{self.store.key_prefix}members"

    @property
    def _info_key(self) -> str:
        return f"{self.store.key_prefix}member_info"

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async def go(client: aioredis.Redis) -> Any:
            if client is not self._client:
                # A new connection pool (the store reconnected): register on it.
                self._scripts = {k: client.register_script(v) for k, v in _SCRIPTS.items()}
                self._client = client
            return await self._scripts[name](keys=list(keys), args=list(args), client=client)

        return await self.store._run(go)

    # -- a mapping's leases ------------------------------------------------------------------
    async def lease_pass(
        self, uuid: str, owner: str, duration_ms: int, held: dict[str, int], *, member: bool
    ) -> Pass:
        """Renew ``held`` (shard -> token), heartbeat as a member of the mapping (unless
        leaving), and read every lease and live member."""
        args: list[Any] = [owner, duration_ms, "1" if member else "0"]
        shards = list(held)
        for shard in shards:
            args += [shard, held[shard]]
        keys = [
            self._key("leases", uuid),
            self._key("lease_members", uuid),
            self._key("lease_reports", uuid),
        ]
        now, renewed, members, flat = await self._script("pass", keys, args)
        leases = {
            _text(flat[i]): _lease(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)
        }
        view = View(int(now), frozenset(_text(m) for m in members), leases)
        return Pass(view, {s: int(c) for s, c in zip(shards, renewed, strict=True)})

    async def take(self, uuid: str, shard: str, owner: str, duration_ms: int) -> int:
        """Take a free, expired or own lease: its new token, 0 if a live peer holds it."""
        keys = [self._key("leases", uuid)]
        return int(await self._script("take", keys, [shard, owner, duration_ms]))

    async def ask(self, uuid: str, shard: str, holder: str, asker: str) -> bool:
        """Ask the holder to hand the shard over; False if the lease changed meanwhile."""
        keys = [self._key("leases", uuid)]
        args = [shard, holder, asker, self.channel(uuid)]
        return bool(await self._script("ask", keys, args))

    async def release(
        self, uuid: str, shard: str, owner: str, token: int, duration_ms: int
    ) -> str | None:
        """Let the lease go: the peer it went to (one that asked for it), '' if it is free,
        None if it was not ours any more."""
        keys = [self._key("leases", uuid), self._key("lease_members", uuid)]
        args = [shard, owner, token, duration_ms, self.channel(uuid)]
        heir = await self._script("release", keys, args)
        return None if heir == 0 else _text(heir)

    async def write_checkpoint(
        self, uuid: str, shard: str, owner: str, token: int, checkpoint: Checkpoint
    ) -> None:
        """Write the checkpoint if the lease is still ours, taken under ``token`` and not
        expired; else raise StaleClaimError saying why."""
        value = _encode({"position": checkpoint.position, "window": checkpoint.window})
        keys = [self._key("leases", uuid), self.store._checkpoints_key(uuid)]
        why = _text(await self._script("checkpoint", keys, [shard, owner, token, value]))
        if why:
            raise StaleClaimError(f"checkpoint of shard {shard!r} of mapping {uuid} refused: {why}")

    async def read_checkpoint(self, uuid: str, shard: str) -> Checkpoint:
        key = self.store._checkpoints_key(uuid)
        raw = await self.store._run(lambda c: c.hget(key, shard))
        if raw is None:
            return Checkpoint()
        entry = _decode(raw)
        return Checkpoint(entry.get("position"), entry.get("window"))

    async def leave(self, uuid: str, owner: str, *, drop_report: bool) -> None:
        """No longer counted among the mapping's daemons (its peers take over its share)."""
        keys = [self._key("lease_members", uuid), self._key("lease_reports", uuid)]
        args = [owner, self.channel(uuid), "1" if drop_report else "0"]
        await self._script("leave", keys, args)

    async def report(self, uuid: str, owner: str, shards: list[dict[str, Any]]) -> None:
        key = self._key("lease_reports", uuid)
        text = _encode(shards)
        await self.store._run(lambda c: c.hset(key, owner, text))

    async def leases(self, uuid: str) -> dict[str, Lease]:
        raw = await self.store._run(lambda c: c.hgetall(self._key("leases", uuid)))
        return {_text(s): _lease(_text(s), v) for s, v in raw.items()}

    async def reports(self, uuid: str) -> dict[str, list[dict[str, Any]]]:
        """daemon -> the shards it reported, for daemons still running the mapping."""

        async def go(client: aioredis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.hgetall(self._key("lease_reports", uuid))
            pipe.zrangebyscore(self._key("lease_members", uuid), "-inf", "+inf", withscores=True)
            pipe.time()
            return list(await pipe.execute())

        raw, members, (seconds, micros) = await self.store._run(go)
        now = seconds * 1000 + micros // 1000
        live = {_text(m) for m, expires in members if expires > now}
        return {
            _text(owner): _decode(value) for owner, value in raw.items() if _text(owner) in live
        }

    async def shard_reports(self, uuid: str) -> list[dict[str, Any]]:
        """Each shard's report from the daemon holding its lease (a finished shard's from
        whoever finished it)."""
        leases = await self.leases(uuid)
        out: dict[str, dict[str, Any]] = {}
        for owner, shards in (await self.reports(uuid)).items():
            for report in shards:
                shard = report.get("shardId")
                lease = leases.get(shard) if isinstance(shard, str) else None
                if report.get("state") == "finished" or (lease and lease.owner == owner):
                    out[shard] = report  # type: ignore[index]
        return [out[s] for s in sorted(out)]

    # -- the fleet's daemons ------------------------------------------------------------------
    async def heartbeat(self, owner: str, duration_ms: int, info: dict[str, Any]) -> None:
        keys = [self._members_key, self._info_key]
        await self._script("heartbeat", keys, [owner, duration_ms, _encode(info)])

    async def leave_fleet(self, owner: str) -> None:
        async def go(client: aioredis.Redis) -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.zrem(self._members_key, owner)
            pipe.hdel(self._info_key, owner)
            return await pipe.execute()

        await self.store._run(go)

    async def members(self) -> tuple[int, list[Member]]:
        """The server's time (ms) and the live daemons of the fleet."""

        async def go(client: aioredis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.zrangebyscore(self._members_key, "-inf", "+inf", withscores=True)
            pipe.hgetall(self._info_key)
            pipe.time()
            return list(await pipe.execute())

        scored, info, (seconds, micros) = await self.store._run(go)
        now = seconds * 1000 + micros // 1000
        by_owner = {_text(k): _decode(v) for k, v in info.items()}
        return now, [
            Member(_text(m), int(expires), by_owner.get(_text(m), {}))
            for m, expires in scored
            if expires > now
        ]

    # -- nudges --------------------------------------------------------------------------
    async def subscribe(self, uuid: str) -> Nudges:
        nudges = Nudges(self.store, self.channel(uuid))
        await nudges.open()
        return nudges


class Nudges:
    """Messages on a mapping's lease channel: something changed, look now."""

    def __init__(self, store: RedisStore, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._pubsub: PubSub | None = None

    async def open(self) -> None:
        async def go(client: aioredis.Redis) -> None:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
            except BaseException:
                await pubsub.aclose()
                raise
            self._pubsub = pubsub

        await self.store._run(go)

    async def wait(self, timeout_s: float) -> bool:
        """True if a nudge came within timeout_s. Raises StateError when the connection
        broke (open again to resubscribe)."""
        pubsub = self._pubsub
        if pubsub is None:
            raise StateError(f"not subscribed to {self.channel}")
        deadline = time.monotonic() + timeout_s
        message = None
        try:
            # An ignored message (the subscription's confirmation) also reads as None.
            while message is None and (left := deadline - time.monotonic()) > 0:
                message = await pubsub.get_message(timeout=left)
        except (RedisError, OSError) as exc:
            await self.close()
            raise StateError(f"Redis state store {self.store.where}: {exc}") from exc
        if message is None:
            return False
        # Several daemons nudging at once: one look covers them all.
        while await pubsub.get_message(timeout=0) is not None:
            pass
        return True

    async def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
