"""The shared state store: Redis, for several daemons (a fleet) working from one registry.

Keys, all under ``key_prefix`` (default ``poller:``) so several deployments can share a server:

* ``{p}revision``: the registry revision, a counter. Every put/delete of a mapping bumps it in
  the same atomic step (a Lua script: the write needs values the MULTI could not read), so a
  daemon polling ``revision()`` never sees a change without the new revision or vice versa.
* ``{p}mappings``: hash uuid -> mapping JSON.
* ``{p}mapping_order``: sorted set uuid -> the revision that created it, so ``list_mappings``
  shows creation order (an update keeps its place) as the SQLite store does.
* ``{p}status:{uuid}``: hash key -> JSON value. A merge is one HSET/HDEL, so the runner and the
  supervisor writing different keys at once never lose each other's.
* ``{p}checkpoints:{uuid}``: hash shard -> JSON ``{"position", "window", "owner", "token"}``:
  the last settled sequence number, the open tumbling window's state, and the claim the
  checkpoint may be written under (a Lua script compares the token and writes in one step).
* Shard leases, the fleet's daemons and their shard reports: redis_leases.py.

Each registry change also PUBLISHes the new revision on ``{p}registry``: an optional nudge for
a daemon that would rather subscribe than poll.

URLs are redis-py's: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://`` (TLS),
``unix:///path/to/socket?db=N``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from poller.redaction import redact
from poller.state.base import Checkpoint, Claim, StaleClaimError, StateError
from poller.state.redis_leases import RedisLeases

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisStore"]

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

SOCKET_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5.0

# KEYS: mappings, order, revision. ARGV: uuid, json, channel. Returns the new revision.
_PUT_LUA: Final = """
local revision = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', revision, ARGV[1])
redis.call('PUBLISH', ARGV[3], revision)
return revision
"""

# KEYS: mappings, order, revision, then what belongs to the mapping (status, checkpoints,
# leases...). ARGV: uuid, channel.
# Returns 1 if the mapping existed (and is gone with what belonged to it), else 0.
_DELETE_LUA: Final = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
local revision = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], revision)
return 1
"""

# Take a shard: a new token, returned with the checkpoint (cjson keeps what it does not know).
# KEYS: checkpoints hash. ARGV: shard, owner. Returns the entry as JSON.
_CLAIM_LUA: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = raw and cjson.decode(raw) or {}
entry['token'] = (entry['token'] or 0) + 1
entry['owner'] = ARGV[2]
local text = cjson.encode(entry)
redis.call('HSET', KEYS[1], ARGV[1], text)
return text
"""

# Write a checkpoint if the token is still the shard's latest claim; 1 if written, else 0.
# KEYS: checkpoints hash. ARGV: shard, token, {"position", "window"} as JSON.
_CHECKPOINT_LUA: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry['token'] ~= tonumber(ARGV[2]) then return 0 end
local value = cjson.decode(ARGV[3])
entry['position'] = value['position']
entry['window'] = value['window']
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return 1
"""


class RedisStore:
    """StateStore on a Redis server (see the module docstring for the keys)."""

    def __init__(self, url: str, *, key_prefix: str = "poller:") -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._redis: aioredis.Redis | None = None
        self._put: AsyncScript | None = None
        self._delete: AsyncScript | None = None
        self._scripts: dict[str, AsyncScript] = {}
        p = key_prefix
        self._revision_key = f"{p}revision"
        self._mappings_key = f"{p}mappings"
        self._order_key = f"{p}mapping_order"
        self.channel = f"{p}registry"
        self.leases = RedisLeases(self)

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, key_prefix={self.key_prefix!r})"

    @property
    def where(self) -> str:
        """The URL without its password, for messages people read."""
        return redact(self.url)

    def _status_key(self, uuid: str) -> str:
        return f"{self.key_prefix}status:{uuid}"

    def _checkpoints_key(self, uuid: str) -> str:
        return f"{self.key_prefix}checkpoints:{uuid}"

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and check the server answers. Nothing needs creating: keys appear on first
        write. Raises StateError naming the (redacted) URL, with a hint."""
        client = self._client()
        try:
            await client.ping()
        except RedisError as exc:
            await self.close()
            raise self._open_error(exc) from exc
        except OSError as exc:
            await self.close()
            raise self._open_error(exc) from exc

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            # Closing connections to a server that is gone: nothing to do about it.
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._client().ping())
        except (RedisError, OSError, StateError):
            return False

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            try:
                client = aioredis.Redis.from_url(
                    self.url,
                    decode_responses=False,
                    protocol=2,  # the reply shapes every Redis-compatible server gives
                    socket_timeout=SOCKET_TIMEOUT_S,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    # One immediate retry: a pooled connection that died with a server
                    # restart reconnects; a server that is down fails fast (redis-py's
                    # default backs off for seconds, which would stall `mappings list`).
                    retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                )
            except ValueError as exc:
                raise StateError(
                    f"invalid [state] url {self.where}: {exc}. Use "
                    "redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or "
                    "unix:///path/to/redis.sock"
                ) from exc
            self._put = client.register_script(_PUT_LUA)
            self._delete = client.register_script(_DELETE_LUA)
            self._scripts = {
                "claim": client.register_script(_CLAIM_LUA),
                "checkpoint": client.register_script(_CHECKPOINT_LUA),
            }
            self._redis = client
        return self._redis

    def _open_error(self, exc: BaseException) -> StateError:
        if isinstance(exc, AuthenticationError) or (
            isinstance(exc, ResponseError)
            and str(exc).startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
        ):
            return StateError(
                f"the Redis state store at {self.where} refused the credentials ({exc}). "
                "Fix the user/password in [state] url (redis://USER:PASSWORD@HOST:PORT/DB)."
            )
        return StateError(
            f"cannot reach the Redis state store at {self.where} ({exc}). Start Redis there, "
            "or point [state] url at a reachable server (or at sqlite:///PATH for one node)."
        )

    async def _run(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        try:
            return await fn(self._client())
        except StateError:
            raise
        except (RedisError, OSError) as exc:
            raise StateError(f"Redis state store {self.where}: {exc}") from exc

    # -- mapping registry ------------------------------------------------------------------
    async def revision(self) -> int:
        raw = await self._run(lambda c: c.get(self._revision_key))
        return int(raw) if raw is not None else 0

    async def list_mappings(self) -> list[dict[str, Any]]:
        async def go(client: aioredis.Redis) -> list[Any]:
            # One round trip, read at one instant.
            pipe = client.pipeline(transaction=True)
            pipe.zrange(self._order_key, 0, -1)
            pipe.hgetall(self._mappings_key)
            return list(await pipe.execute())

        order, by_uuid = await self._run(go)
        mappings = [_decode(by_uuid.pop(uuid)) for uuid in order if uuid in by_uuid]
        # Anything without an order entry (written by hand, say) goes last, in uuid order.
        mappings.extend(_decode(by_uuid[uuid]) for uuid in sorted(by_uuid))
        return mappings

    async def get_mapping(self, uuid: str) -> dict[str, Any] | None:
        raw = await self._run(lambda c: c.hget(self._mappings_key, uuid))
        return None if raw is None else _decode(raw)

    async def put_mapping(self, mapping: dict[str, Any]) -> None:
        uuid = mapping.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise StateError(f"put_mapping: the mapping has no 'uuid' string: {mapping!r}")
        text = _encode(mapping)

        async def go(client: aioredis.Redis) -> Any:
            assert self._put is not None
            return await self._put(
                keys=[self._mappings_key, self._order_key, self._revision_key],
                args=[uuid, text, self.channel],
                client=client,
            )

        await self._run(go)

    async def delete_mapping(self, uuid: str) -> bool:
        async def go(client: aioredis.Redis) -> Any:
            assert self._delete is not None
            return await self._delete(
                keys=[
                    self._mappings_key,
                    self._order_key,
                    self._revision_key,
                    self._status_key(uuid),
                    self._checkpoints_key(uuid),
                    *self.leases.keys_of(uuid),
                ],
                args=[uuid, self.channel],
                client=client,
            )

        return bool(await self._run(go))

    # -- runtime status --------------------------------------------------------------------
    async def set_status(self, uuid: str, status: dict[str, Any]) -> None:
        """Merge ``status`` into the stored status; a key set to None is removed. Does not
        bump the revision (status is not configuration)."""
        put = {key: _encode(value) for key, value in status.items() if value is not None}
        drop = [key for key, value in status.items() if value is None]
        if not put and not drop:
            return
        key = self._status_key(uuid)

        async def go(client: aioredis.Redis) -> Any:
            pipe = client.pipeline(transaction=True)
            if put:
                pipe.hset(key, mapping=put)
            if drop:
                pipe.hdel(key, *drop)
            return await pipe.execute()

        await self._run(go)

    async def get_status(self, uuid: str) -> dict[str, Any]:
        raw = await self._run(lambda c: c.hgetall(self._status_key(uuid)))
        return {key.decode(): _decode(value) for key, value in raw.items()}

    # -- stream checkpoints --------------------------------------------------------------
    def _scripts_or_connect(self) -> dict[str, AsyncScript]:
        self._client()
        return self._scripts

    async def claim_shard(self, mapping_uuid: str, shard: str, owner: str) -> Claim:
        key = self._checkpoints_key(mapping_uuid)
        script = self._scripts_or_connect()["claim"]
        raw = await self._run(lambda c: script(keys=[key], args=[shard, owner], client=c))
        entry = _decode(raw)
        return Claim(entry["token"], Checkpoint(entry.get("position"), entry.get("window")))

    async def set_checkpoint(
        self, mapping_uuid: str, shard: str, token: int, checkpoint: Checkpoint
    ) -> None:
        key = self._checkpoints_key(mapping_uuid)
        value = _encode({"position": checkpoint.position, "window": checkpoint.window})
        script = self._scripts_or_connect()["checkpoint"]
        written = await self._run(
            lambda c: script(keys=[key], args=[shard, token, value], client=c)
        )
        if not written:
            raise StaleClaimError(
                f"checkpoint of shard {shard!r} of mapping {mapping_uuid} refused: the shard was "
                f"claimed again after claim {token}"
            )

    async def list_checkpoints(self, mapping_uuid: str) -> dict[str, Checkpoint]:
        raw = await self._run(lambda c: c.hgetall(self._checkpoints_key(mapping_uuid)))
        out = {}
        for shard, value in sorted(raw.items()):
            entry = _decode(value)
            out[shard.decode()] = Checkpoint(entry.get("position"), entry.get("window"))
        return out
