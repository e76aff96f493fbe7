"""Reading Redis stream keys in order (XREAD from an entry id), and appending to them.

Entry ids are ``MS-SEQ`` and grow with time, so a key is an ordered shard whose checkpoint is
the last entry id settled, an entry's arrival time is its id's milliseconds, and AT_TIMESTAMP
starts at the first entry of that millisecond. Records have Kinesis's shape (§7.2):
``kinesis.data`` is the base64 of the entry's ``body`` field, ``partitionKey`` its ``pk`` field
(else the entry id), ``sequenceNumber`` the entry id, ``eventID`` ``KEY:ENTRYID``. Any other
field is not lost: it is in the record's ``fields`` object (values that are not UTF-8 in
``binaryFields``, base64), and an entry without a ``body`` field has empty ``data``.

A reader notices history trimmed away before it read it (MAXLEN, XTRIM, XDEL, or a key
deleted and re-created) every few seconds and reports it; reading then goes on at the first
entry still there, as Kinesis does when records expire. Redis keeps no count of what it
trimmed, so a gap counts as one lost record, and a position whose own entry and every one
before it were trimmed (nothing unread lost) is reported too, once.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import zlib
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from poller.events import KinesisRecordShape
from poller.logs import JsonLog
from poller.sources.base import (
    ReadResult,
    Shard,
    SourceError,
    StartAt,
    StreamRecord,
)
from poller.sources.redis_connection import (
    MAX_BLOCK_S,
    Credentials,
    RedisAddress,
    RedisLink,
    pack,
    version_of,
)

_encode = msgspec.json.Encoder().encode

BODY: Final = b"body"
PARTITION_KEY: Final = b"pk"
MIN_SERVER_VERSION: Final = (5, 0)  # streams
TRIM_CHECK_S: Final = 5.0
SEND_CHUNK: Final = 1000
MAX_SEQ: Final = 18446744073709551615  # the largest sequence part of an entry id
# A partition key the record template can take as it is: printable ASCII, no quote or backslash.
_NEEDS_ESCAPING: Final = re.compile(rb'[^\x20-\x7e]|["\\]')
# How many partition keys a reader keeps ready for the template (as JSON and as text): past
# this it forgets them all, so keys that never repeat hold little memory.
KNOWN_KEYS: Final = 4096


def _id(text: bytes | str) -> tuple[int, int]:
    raw = text.decode() if isinstance(text, bytes) else text
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


class RedisStream:
    """The keys of one redis-stream:// URI: a StreamSource for a mapping, a sender for
    `poller send`."""

    batch_info_key = "KinesisBatchInfo"
    idle_poll_s = 0.0  # reads block on the server

    def __init__(
        self,
        keys: tuple[str, ...],
        *,
        address: RedisAddress,
        login: Credentials,
        tls: bool,
        display_uri: str,
        region: str,
        invoke_identity_arn: str,
        log: JsonLog | None = None,
    ) -> None:
        self.keys = keys
        self.display_uri = display_uri
        self.stream_arn = display_uri
        self.log = log or JsonLog()
        self.shape = KinesisRecordShape(display_uri, region, invoke_identity_arn)
        self.link = RedisLink(
            address, tls=tls, login=login, display_uri=display_uri, what="redis-stream"
        )

    def __repr__(self) -> str:
        return f"RedisStream({self.display_uri!r})"

    async def call(self, operation: str, key: str, fn: Any) -> Any:
        return await self.link.call(operation, key, fn)

    async def start(self) -> None:
        """Check the server and that every key is a stream (or not there yet)."""

        async def go(client: aioredis.Redis) -> None:
            try:
                version = version_of(await client.info("server"))
            except NoPermissionError:
                version = ()
            if version and version < MIN_SERVER_VERSION:
                raise SourceError(
                    f"{self.display_uri}: Redis {'.'.join(map(str, version))} is too old; "
                    "redis-stream needs 5.0 or newer",
                    retryable=False,
                )
            for key in self.keys:
                kind = await client.type(key)
                if kind not in (b"stream", b"none"):
                    raise ResponseError(f"WRONGTYPE {key} holds a {kind.decode()}")

        await self.call("start", ",".join(self.keys), go)

    async def close(self) -> None:
        await self.link.close()

    async def shards(self) -> list[Shard]:
        return [Shard(key) for key in self.keys]

    async def open_reader(self, shard: Shard, start: StartAt) -> RedisShardReader:
        key = shard.id
        if start.kind == "after":
            after = start.sequence or "0-0"
        elif start.kind == "trim_horizon":
            after = "0-0"
        elif start.kind == "at_timestamp":
            ms = int((start.timestamp or 0) * 1000)
            after = f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0-0"
        else:  # latest: the newest entry now
            after = await self._last_id(key)
        reader = RedisShardReader(self, key, after)
        if start.kind == "after":
            reader.check_trim_now()
        return reader

    async def _last_id(self, key: str) -> str:
        async def go(client: aioredis.Redis) -> str:
            newest = await client.execute_command("XREVRANGE", key, "+", "-", "COUNT", 1)
            return newest[0][0].decode() if newest else "0-0"

        last: str = await self.call("open_reader", key, go)
        return last

    # -- StreamSender --------------------------------------------------------------------------
    async def send(self, bodies: list[str], *, partition_key: str | None = None) -> int:
        """XADD each body (with ``pk`` when given) to the key the partition key hashes to;
        without one, messages are spread over the keys."""
        per_key: dict[str, list[bytes]] = {}
        for index, body in enumerate(bodies):
            routing = partition_key if partition_key is not None else f"{time.time_ns()}-{index}"
            key = self.keys[zlib.crc32(routing.encode()) % len(self.keys)]
            fields: tuple[Any, ...] = (BODY, body)
            if partition_key is not None:
                fields += (PARTITION_KEY, partition_key)
            per_key.setdefault(key, []).append(pack((b"XADD", key, b"*", *fields)))
        sent = 0
        for key, commands in per_key.items():
            for start in range(0, len(commands), SEND_CHUNK):
                chunk = commands[start : start + SEND_CHUNK]
                packed = b"".join(chunk)

                async def go(_: aioredis.Redis, packed: bytes = packed, n: int = len(chunk)) -> int:
                    return len(await self.link.raw(packed, n))

                sent += await self.call("send", key, go)
        return sent


class RedisShardReader:
    """One key, read forward from an entry id."""

    def __init__(self, stream: RedisStream, key: str, after: str) -> None:
        self._stream = stream
        self._key = key
        self._key_b = key.encode()
        self._after = after
        self.start_point: str | None = after
        self._event_prefix = key + ":"
        self._template = stream.shape.shard_template(key)
        self._keys: dict[bytes, tuple[bytes, str]] = {}
        self._next_trim_check = time.monotonic() + TRIM_CHECK_S
        self._reported_until = _id(after)

    def check_trim_now(self) -> None:
        """Look for trimmed history at the next read (resuming from a checkpoint)."""
        self._next_trim_check = 0.0

    async def close(self) -> None:
        """Nothing of its own: the connections are the source's."""

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        lost = 0
        if time.monotonic() >= self._next_trim_check:
            lost = await self._trimmed()
            self._next_trim_check = time.monotonic() + TRIM_CHECK_S
        block_ms = int(min(wait_s, MAX_BLOCK_S) * 1000)
        head: tuple[Any, ...] = (b"XREAD", b"COUNT", limit)
        if block_ms >= 1:  # BLOCK 0 would mean forever
            head += (b"BLOCK", block_ms)
        packed = pack((*head, b"STREAMS", self._key_b, self._after))

        async def go(_: aioredis.Redis) -> Any:
            return (await self._stream.link.raw(packed, 1, block_ms))[0]

        reply = await self._stream.call("read", self._key, go)
        if not reply:
            return ReadResult([], lost=lost)
        entries = reply[0][1]
        records = self._records(entries)
        self._after = records[-1].sequence
        return ReadResult(records, lost=lost)

    def _records(self, entries: list[list[Any]]) -> list[StreamRecord]:
        """Records for XREAD's entries. The hot path: an entry of ``body`` (and ``pk``) goes
        straight to JSON through the shard's template, with everything it touches in locals, a
        partition key seen before taken from ``_keys`` and an arrival time shared by the entries
        of one millisecond worked out once; any other entry goes through ``_fields`` and the
        shape's general encoder."""
        template = self._template
        b64 = binascii.b2a_base64
        keys = self._keys
        records = []
        append = records.append
        last_ms = seconds = millis = b""
        arrival = 0.0
        for raw_id, fields in entries:
            count = len(fields)
            if count == 4 and fields[0] == BODY and fields[2] == PARTITION_KEY:
                body, raw_key = fields[1], fields[3]
            elif count == 2 and fields[0] == BODY:
                body, raw_key = fields[1], None
            elif count == 4 and fields[0] == PARTITION_KEY and fields[2] == BODY:
                body, raw_key = fields[3], fields[1]
            else:
                append(self._record(raw_id, fields))
                continue
            ms = raw_id.partition(b"-")[0]
            if ms != last_ms:
                if len(ms) < 4:
                    append(self._record(raw_id, fields))
                    continue
                last_ms, seconds, millis, arrival = ms, ms[:-3], ms[-3:], int(ms) / 1000
            sequence = raw_id.decode()
            if raw_key is None:
                quoted, partition_key = b'"' + raw_id + b'"', sequence
            else:
                known = keys.get(raw_key)
                if known is None:
                    if _NEEDS_ESCAPING.search(raw_key):
                        append(self._record(raw_id, fields))
                        continue
                    if len(keys) >= KNOWN_KEYS:
                        keys.clear()
                    known = keys[raw_key] = (b'"' + raw_key + b'"', raw_key.decode())
                quoted, partition_key = known
            encoded = template % (
                quoted,
                raw_id,
                b64(body, newline=False),
                seconds,
                millis,
                raw_id,
                b"",
            )
            append(StreamRecord(sequence, partition_key, arrival, encoded))
        return records

    def _record(self, raw_id: bytes, fields: list[bytes]) -> StreamRecord:
        entry_id = raw_id.decode("ascii")
        ms = int(raw_id.partition(b"-")[0])
        body, partition_key, extra = self._fields(fields)
        key = partition_key if partition_key is not None else entry_id
        encoded = self._stream.shape.encode(
            self._event_prefix + entry_id, key, entry_id, base64.b64encode(body), ms, extra
        )
        return StreamRecord(entry_id, key, ms / 1000, encoded)

    @staticmethod
    def _fields(fields: list[bytes]) -> tuple[bytes, str | None, bytes]:
        """Body, partition key and the other fields (as more record members) of an entry."""
        body = b""
        partition_key: str | None = None
        text: dict[str, str] = {}
        binary: dict[str, str] = {}
        for name, value in zip(fields[0::2], fields[1::2], strict=False):
            if name == BODY:
                body = value
                continue
            decoded = _text(value)
            if name == PARTITION_KEY and decoded is not None:
                partition_key = decoded
                continue
            shown = name.decode("utf-8", "backslashreplace")
            if decoded is None:
                binary[shown] = base64.b64encode(value).decode("ascii")
            else:
                text[shown] = decoded
        extra = b""
        if text:
            extra += b',"fields":' + _encode(text)
        if binary:
            extra += b',"binaryFields":' + _encode(binary)
        return body, partition_key, extra

    async def _trimmed(self) -> int:
        """1 when entries after our position were removed before we read them (the count is
        not known), else 0; a key deleted and re-created starts over at its beginning."""

        async def go(client: aioredis.Redis) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = await client.xinfo_stream(self._key)
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return None
                raise
            return info

        info = await self._stream.call("read", self._key, go)
        if info is None:
            return 0
        position = _id(self._after)
        last = _id(info["last-generated-id"])
        if last < position:
            self._stream.log.warning(
                "stream key was deleted and re-created: reading it from its start",
                source=self._stream.display_uri,
                shard=self._key,
                checkpoint=self._after,
            )
            self._after = "0-0"
            self._reported_until = (0, 0)
            return 1
        if info.get("entries-added") == info.get("length"):
            return 0  # Redis 7 counts every entry ever added: none was removed
        # Redis keeps no count of what it trimmed. Two signs of unread entries gone: the oldest
        # entry is newer than our position (trimmed past it: MAXLEN, XTRIM), or an entry newer
        # than our position was deleted (XDEL; Redis 7 records the newest deleted id).
        gap = (0, 0)
        first = info.get("first-entry")
        if first is not None:
            oldest = _id(first[0])
            if oldest > position and oldest != (position[0], position[1] + 1):
                gap = (oldest[0], oldest[1] - 1) if oldest[1] else (oldest[0] - 1, MAX_SEQ)
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None:
            gap = max(gap, _id(deleted))
        if gap > position and gap > self._reported_until:
            self._reported_until = gap
            return 1
        return 0
