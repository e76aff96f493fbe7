"""``redis-queue://``: a Redis stream read through a consumer group, with SQS semantics.

How SQS maps onto a stream and its consumer group (ESM_SEMANTICS.md §13, "Redis"):

* receive = ``XREADGROUP ... >`` (new entries), plus ``XAUTOCLAIM`` of entries whose idle time
  passed the visibility timeout (redelivery). The group's pending entries list (PEL) is the
  in-flight set, an entry's idle time is its visibility clock, and its delivery counter is
  ApproximateReceiveCount (``XAUTOCLAIM`` increments it, like an SQS receive).
* delete = ``XACK``; with ``delete_on_ack=true``, ``XACK`` and ``XDEL`` in one MULTI/EXEC, so
  an entry is never deleted unacked. Both are packed by hiredis and sent on connections of our
  own (``RedisLink.raw``): redis-py's per-argument packing and pool cost more client CPU than
  the round trip for a hundred IDs.
* change_visibility = ``XCLAIM ... IDLE ms JUSTID`` of entries we still own: the idle clock is
  set so the entry becomes claimable ``timeout_s`` from now (0 releases it at once).
* dead_letter = one Lua script per batch: copy the entry (its fields as the server holds them,
  plus the reason) to the dead-letter stream, then ``XACK`` (+``XDEL``). A script runs
  atomically, so a crash can neither lose nor duplicate an entry; an entry no longer pending
  (someone else moved or acked it) is skipped.

Records are §7.1 SQS records (records.py) with ``eventSource`` "aws:sqs", so handlers written
for SQS, and their ``batchItemFailures``, work unchanged.

Throughput: concurrent receive() calls of one source are merged into one
``XREADGROUP COUNT sum`` whose entries are split among the callers (each gets at most what it
asked for; nothing is held back: entries read for a caller that was cancelled meanwhile are
released at once), and delete() calls that arrive while an ack is in flight go out together in
the next one (acks.py); acks queued when a read goes out are written with it, ahead of it, in
one round trip. The redelivery scan (XAUTOCLAIM) runs every visibility_timeout/4, just
before a read, not on every receive; it is not pipelined with the XREADGROUP because together
they could return more entries than the callers asked for.

Failures: every Redis error becomes a SourceError (retryable unless configuration must change).
The connection pool reconnects on the next call. A group that vanished (a restart without
persistence) is re-created at ``0`` on the next call that hits ``NOGROUP``, so entries added
after the loss are delivered, not skipped.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from poller.logs import JsonLog
from poller.sources.base import Depth, Message, SourceError
from poller.sources.redis_connection import (
    Credentials,
    RedisAddress,
    RedisLink,
    pack,
    version_of,
)
from poller.sources.redis_queue import scripts
from poller.sources.redis_queue.acks import GroupCommit
from poller.sources.redis_queue.reads import Receiver
from poller.sources.redis_queue.records import BODY_FIELD, RecordBuilder

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisQueue"]

T = TypeVar("T")

# The group when neither the URI nor the caller names one (only senders, which never read).
DEFAULT_GROUP: Final = "poller"
# IDs per XACK/XDEL command and per Lua call (Lua's unpack() has a C-stack limit near 8000).
ID_CHUNK: Final = 1000
SEND_CHUNK: Final = 1000  # XADDs per pipeline
# A consumer with nothing pending and idle this long is a leftover of a finished process.
STALE_CONSUMER_MS: Final = 24 * 3600 * 1000
MIN_SERVER_VERSION: Final = (6, 2)  # XAUTOCLAIM


def consumer_name() -> str:
    """hostname-pid-random: one PEL per source instance, unique across daemons and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


class RedisQueue:
    """A Redis stream + consumer group: a QueueSource (mapping runner) and a QueueSender."""

    native_redrive = False
    fifo = False
    # One XREADGROUP can return many entries; past this a call's latency grows for little gain.
    max_receive_batch = 1000

    def __init__(
        self,
        stream_key: str,
        *,
        address: RedisAddress,
        login: Credentials,
        tls: bool = False,
        group: str = DEFAULT_GROUP,
        visibility_timeout_s: float,
        max_receive_count: int | None,
        dead_letter: str | None = None,
        start_id: str = "$",
        delete_on_ack: bool = False,
        display_uri: str,
        region: str = "local",
        consumer: str | None = None,
        reader: bool = True,
        log: JsonLog | None = None,
    ) -> None:
        if start_id not in ("0", "$"):
            raise SourceError(
                f"redis-queue start must be 0 or $, not {start_id!r}", retryable=False
            )
        self.stream_key = stream_key
        self.group = group
        self.visibility_timeout_s = float(visibility_timeout_s)
        self.max_receive_count = max_receive_count
        self.dead_letter_key = dead_letter or f"{stream_key}:dlq"
        self.start_id = start_id
        self.delete_on_ack = delete_on_ack
        self.display_uri = display_uri
        self.consumer = consumer or consumer_name()
        # False for a sender (`poller send`): it must not create (or retire from) a group that
        # no mapping reads.
        self.reader = reader
        self.log = log or JsonLog()
        self._link = RedisLink(
            address, tls=tls, login=login, display_uri=display_uri, what="redis-queue"
        )
        self._link.on_connect(self._prepare)
        self._records = RecordBuilder(display_uri, region)
        self._key = stream_key.encode()
        self._group_b = group.encode()
        self._consumer_b = self.consumer.encode()
        self._visibility_ms = int(self.visibility_timeout_s * 1000)
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False
        self._receiver = Receiver(self)
        self._acks = GroupCommit(self._ack, self._receiver.read_coming)

    def __repr__(self) -> str:
        return f"RedisQueue({self.display_uri!r}, group={self.group!r}, consumer={self.consumer!r})"

    # -- connection --------------------------------------------------------------------------
    def _prepare(self, client: aioredis.Redis) -> None:
        # XRANGE replies are read as hiredis gives them (no dict per entry).
        client.set_response_callback("XRANGE", _raw_reply)
        self._scripts = {
            "claim": client.register_script(scripts.CLAIM_LUA),
            "extend": client.register_script(scripts.EXTEND_LUA),
            "dead_letter": client.register_script(scripts.DEAD_LETTER_LUA),
            "retire": client.register_script(scripts.RETIRE_LUA),
            "reap": client.register_script(scripts.REAP_LUA),
        }

    def _script(self, name: str) -> AsyncScript:
        self._link.client()
        return self._scripts[name]

    async def _call(self, operation: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``fn(client)``; re-create a vanished group and retry once; map errors."""

        async def go(client: aioredis.Redis) -> T:
            try:
                return await fn(client)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            # The group (or the whole stream) is gone: Redis restarted without persistence,
            # or someone destroyed it. Start it at 0: whatever the stream holds now was added
            # since, and must be delivered.
            self.log.warning(
                "consumer group missing; re-creating it at 0",
                source=self.display_uri,
                group=self.group,
            )
            await self._create_group(client, "0")
            return await fn(client)

        return await self._link.call(operation, self.stream_key, go)

    async def _create_group(self, client: aioredis.Redis, start_id: str) -> bool:
        """XGROUP CREATE ... MKSTREAM; False when it already existed."""
        try:
            await client.execute_command(
                "XGROUP", "CREATE", self._key, self._group_b, start_id, "MKSTREAM"
            )
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    # -- QueueSource ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check the server, create the group (MKSTREAM) at the start id if missing.
        A sender only checks that the key is a stream (or absent)."""

        async def go(client: aioredis.Redis) -> None:
            try:
                version = version_of(await client.info("server"))
            except NoPermissionError:
                version = ()  # a user limited to stream commands: let those speak
            if version and version < MIN_SERVER_VERSION:
                raise SourceError(
                    f"{self.display_uri}: Redis {'.'.join(map(str, version))} is too old; "
                    "redis-queue needs 6.2 or newer (XAUTOCLAIM)",
                    retryable=False,
                )
            if not self.reader:
                kind = await client.type(self._key)
                if kind not in (b"stream", b"none"):
                    raise ResponseError("WRONGTYPE the key holds a " + kind.decode())
                return
            await self._create_group(client, self.start_id)
            with contextlib.suppress(ResponseError):
                # Housekeeping only: a server without XINFO CONSUMERS fields still works.
                await self._scripts["reap"](
                    keys=[self._key],
                    args=[self._group_b, STALE_CONSUMER_MS, self._consumer_b],
                    client=client,
                )

        await self._call("start", go)

    async def close(self) -> None:
        """Stop pending reads, flush acks, retire our consumer if it owns nothing."""
        if self._closed:
            return
        await self._receiver.close()
        # After the reads: a cancelled read gives back the acks it carried.
        await self._acks.settle(5)

        async def retire(client: aioredis.Redis) -> None:
            if self.reader:
                await self._scripts["retire"](
                    keys=[self._key], args=[self._group_b, self._consumer_b], client=client
                )

        self._closed = True
        await self._link.close(retire)

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages: redelivered (expired) entries first, then new ones; waits up
        to wait_s for the first. Concurrent calls share round trips (reads.py)."""
        return await self._receiver.receive(max_messages, wait_s)

    async def delete(self, messages: list[Message]) -> None:
        """XACK (+XDEL), group-committed (acks.py)."""
        if messages:
            await self._acks.ack([m.receipt for m in messages])

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        """Make our entries claimable ``timeout_s`` from now (the heartbeat, or 0 to release).

        The PEL keeps only the time of the last delivery, so a timeout above the queue's
        visibility timeout counts as the visibility timeout.
        """
        if not messages:
            return
        idle_ms = max(0, self._visibility_ms - int(max(timeout_s, 0.0) * 1000))
        await self._extend([m.receipt for m in messages], idle_ms)
        if timeout_s <= 0:
            # Released: pick them up at the next receive rather than a claim interval later.
            self._receiver.next_claim = 0.0

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Copy each entry with the reason to the dead-letter stream and ack it, atomically."""
        if not messages:
            return
        ids = [m.receipt for m in messages]
        script = self._script("dead_letter")
        head = [self._group_b, reason, self.stream_key, "1" if self.delete_on_ack else "0"]
        for chunk in _chunks(ids, ID_CHUNK):

            async def go(client: aioredis.Redis, chunk: Sequence[str] = chunk) -> Any:
                return await script(
                    keys=[self._key, self.dead_letter_key], args=[*head, *chunk], client=client
                )

            await self._call("dead_letter", go)

    async def depth(self) -> Depth:
        """visible = the group's lag (entries not yet delivered), in_flight = its PEL size."""

        async def go(client: aioredis.Redis) -> Depth:
            try:
                groups = await client.xinfo_groups(self._key)
            except ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                groups = []
            for group in groups:
                name = group.get("name")
                if name in (self._group_b, self.group):
                    return await self._depth_of(client, group)
            # Stream or group gone (a restart): re-create so new entries are seen, then 0.
            raise ResponseError("NOGROUP group missing")

        return await self._call("depth", go)

    async def _depth_of(self, client: aioredis.Redis, group: dict[str, Any]) -> Depth:
        pending = int(group.get("pending") or 0)
        lag = group.get("lag")
        if lag is not None:
            return Depth(visible=int(lag), in_flight=pending)
        # Redis < 7, or deletions past the group's position make the lag unknown: count what
        # follows the last delivered ID, up to a cap (an estimate is all scaling needs).
        last = group.get("last-delivered-id") or b"0-0"
        last = last.decode() if isinstance(last, bytes) else str(last)
        cap = 1000
        after = await client.execute_command("XRANGE", self._key, f"({last}", "+", "COUNT", cap)
        visible = len(after or [])
        if visible >= cap:
            total = int(await client.xlen(self._key))
            visible = max(cap, total - pending)
        return Depth(visible=visible, in_flight=pending)

    # -- QueueSender -----------------------------------------------------------------------
    async def send(
        self,
        bodies: list[str],
        *,
        delay_s: int = 0,
        group: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> int:
        """XADD {"body": ..., **attributes} for each body, pipelined; returns how many.

        ``group`` is ignored (a stream has no message groups); a delay is refused (streams
        cannot hide an entry until later).
        """
        if delay_s:
            raise SourceError(
                f"{self.display_uri}: redis-queue cannot delay messages (a stream has no "
                "delivery delay); send without --delay-seconds",
                retryable=False,
            )
        extra: list[Any] = []
        for name, value in (attributes or {}).items():
            if name == "body":
                raise SourceError(
                    f"{self.display_uri}: 'body' is the message body field and cannot be an "
                    "attribute name",
                    retryable=False,
                )
            extra.extend((name, value))
        sent = 0
        for chunk in _chunks(bodies, SEND_CHUNK):
            packed = b"".join(
                pack((b"XADD", self._key, b"*", BODY_FIELD, body, *extra)) for body in chunk
            )

            async def go(_: aioredis.Redis, packed: bytes = packed, n: int = len(chunk)) -> int:
                return len(await self._link.raw(packed, n))

            sent += await self._call("send", go)
        return sent

    async def _extend(self, ids: list[str], idle_ms: int) -> None:
        script = self._script("extend")
        for chunk in _chunks(ids, ID_CHUNK):

            async def go(client: aioredis.Redis, chunk: Sequence[str] = chunk) -> Any:
                return await script(
                    keys=[self._key],
                    args=[self._group_b, self._consumer_b, idle_ms, *chunk],
                    client=client,
                )

            await self._call("change_visibility", go)

    async def _ack(self, ids: list[str]) -> None:
        """XACK (with XDEL in the same MULTI/EXEC when delete_on_ack), every chunk in one
        write."""
        data, replies = self._pack_ack(ids)

        async def go(_: aioredis.Redis) -> Any:
            return await self._link.raw(data, replies)

        await self._call("delete", go)

    def _pack_ack(self, ids: list[str]) -> tuple[bytes, int]:
        """The commands that acknowledge ``ids``, packed, and how many replies they get."""
        key, group = self._key, self._group_b
        packed: list[bytes] = []
        replies = 0
        for chunk in _chunks(ids, ID_CHUNK):
            if self.delete_on_ack:
                packed += [
                    pack((b"MULTI",)),
                    pack((b"XACK", key, group, *chunk)),
                    pack((b"XDEL", key, *chunk)),
                    pack((b"EXEC",)),
                ]
                replies += 4
            else:
                packed.append(pack((b"XACK", key, group, *chunk)))
                replies += 1
        return b"".join(packed), replies
