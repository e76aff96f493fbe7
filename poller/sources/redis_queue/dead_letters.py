"""A redis-queue dead-letter stream (``STREAM_KEY:dlq`` by default) as a target a person can
act on: peek with ``XRANGE`` (reads change nothing), redrive to a stream on the same server
with one Lua script per chunk (``scripts.REDRIVE_LUA``), so each entry is moved atomically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from poller.sources.base import SourceError, SourceSpec
from poller.sources.dead_letters import (
    DEAD_LETTER_FIELDS,
    DeadLetter,
    as_int,
    on_failure_details,
)
from poller.sources.redis_connection import Credentials, RedisLink
from poller.sources.redis_queue import scripts

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from poller.sources.redis_queue import RedisQueueSpec

# Entries per script call: one call blocks the server while it runs, so keep each short.
REDRIVE_CHUNK: Final = 200


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


class RedisDeadLetters:
    def __init__(self, spec: RedisQueueSpec, login: Credentials, tls: bool) -> None:
        self.spec = spec
        self.key = spec.stream_key
        self.shown = spec.display_uri
        self._link = RedisLink(
            spec.address, tls=tls, login=login, display_uri=spec.display_uri, what="redis-queue"
        )

    async def start(self) -> None:
        async def go(client: aioredis.Redis) -> None:
            kind = await client.type(self.key)
            if kind not in (b"stream", b"none"):
                raise SourceError(
                    f"{self.shown}: key {self.key!r} holds a {kind.decode()}, not a stream",
                    retryable=False,
                )

        await self._link.call("start", self.key, go)

    async def close(self) -> None:
        await self._link.close()

    async def peek(self, limit: int) -> list[DeadLetter]:
        async def go(client: aioredis.Redis) -> Any:
            return await client.xrange(self.key, count=limit)

        entries = await self._link.call("peek", self.key, go)
        return [self._letter(entry_id, fields) for entry_id, fields in entries]

    def _letter(self, entry_id: bytes, raw: dict[bytes, bytes]) -> DeadLetter:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        body = fields.get("body", "")
        reason, invokes = on_failure_details(body)
        ident = _text(entry_id)
        return DeadLetter(
            id=ident,
            body=body,
            reason=fields.get("DeadLetterReason", reason),
            receive_count=as_int(fields.get("DeadLetterReceiveCount", invokes)),
            source=fields.get("DeadLetterSourceQueue"),
            sent_ms=as_int(ident.partition("-")[0]),
            attributes={
                k: v for k, v in fields.items() if k != "body" and k not in DEAD_LETTER_FIELDS
            },
        )

    async def redrive(self, to: SourceSpec, limit: int | None) -> int:
        from poller.sources.redis_queue import SOURCE, RedisQueueSpec

        if to.kind is not SOURCE or not isinstance(to, RedisQueueSpec):
            raise SourceError(
                f"{self.shown} can be redriven only to a redis-queue:// stream on the same "
                f"server (one script moves each entry), not to {to.display_uri}",
                retryable=False,
            )
        here, there = self.spec.address, to.address
        if (here.host, here.port, here.db) != (there.host, there.port, there.db):
            raise SourceError(
                f"{to.display_uri} is on another Redis server or database than {self.shown}: "
                "a redrive moves each entry with one script on one server, so both streams "
                "must be on the same one",
                retryable=False,
            )
        if to.stream_key == self.key:
            raise SourceError(
                f"--to names the dead-letter stream itself ({self.shown})", retryable=False
            )
        script = self._link.client().register_script(scripts.REDRIVE_LUA)

        async def newest(client: aioredis.Redis) -> Any:
            return await client.xrevrange(self.key, count=1)

        # Only what is there now: entries dead-lettered again meanwhile stay for next time.
        last = await self._link.call("redrive", self.key, newest)
        if not last:
            return 0
        up_to = last[0][0]
        moved = 0
        while limit is None or moved < limit:
            chunk = REDRIVE_CHUNK if limit is None else min(REDRIVE_CHUNK, limit - moved)

            async def move(client: aioredis.Redis, chunk: int = chunk) -> Any:
                return await script(
                    keys=[self.key, to.stream_key], args=[up_to, chunk], client=client
                )

            count = int(await self._link.call("redrive", self.key, move))
            moved += count
            if count < chunk:
                break
        return moved
