"""``redis-queue://``: a Redis stream read through a consumer group, with SQS semantics.

How SQS maps onto a stream and its consumer group (ESM_SEMANTICS.md §13, "Redis"):

* receive = ``XREADGROUP ... >`` (new entries), plus ``XAUTOCLAIM`` of entries whose idle time
  passed the visibility timeout (redelivery). The group's pending entries list (PEL) is the
  in-flight set, an entry's idle time is its visibility clock, and its delivery counter is
  ApproximateReceiveCount (``XAUTOCLAIM`` increments it, like an SQS receive).
* delete = ``XACK``, written to the connection as a command we pack ourselves: redis-py packs
  every command argument in Python, which for a hundred IDs costs more client CPU than the
  round trip. With ``delete_on_ack=true``, ``XACK`` + ``XDEL`` through a tiny Lua script that
  takes the IDs as one space-separated argument (so the two stay atomic).
* change_visibility = ``XCLAIM ... IDLE ms JUSTID`` of entries we still own: the idle clock is
  set so the entry becomes claimable ``timeout_s`` from now (0 releases it at once).
* dead_letter = one Lua script per batch: copy the entry (its fields as the server holds them,
  plus the reason) to the dead-letter stream, then ``XACK`` (+``XDEL``). A script runs
  atomically, so a crash can neither lose nor duplicate an entry; an entry no longer pending
  (someone else moved or acked it) is skipped.

Records are §7.1 SQS records with ``eventSource`` "poller:redis-queue", so a handler's
``batchItemFailures`` works unchanged. Values travel as bytes (``decode_responses=False``): a
body that is not UTF-8 (or an entry without a ``body`` field) is still delivered, encoded, with
the ``poller.bodyEncoding`` message attribute saying how.

Throughput: the client is redis.asyncio over hiredis with the reply parsers for the hot
commands bypassed (we read hiredis' lists directly), and records for plain entries are built
in one tight loop. Concurrent receive() calls of one source are merged into one
``XREADGROUP COUNT sum`` whose entries are split among the callers (each gets at most what it
asked for; nothing is held back: entries read for a caller that was cancelled meanwhile are
released at once), and delete() calls that arrive while an ack is in flight go out together in
the next one (group commit). The redelivery scan (XAUTOCLAIM) runs every visibility_timeout/4,
just before a read, not on every receive; it is not pipelined with the XREADGROUP because
together they could return more entries than the callers asked for.

Failures: every Redis error becomes a SourceError (retryable unless configuration must change).
The connection pool reconnects on the next call. A group that vanished (a restart without
persistence) is re-created at ``0`` on the next call that hits ``NOGROUP``, so entries added
after the loss are delivered, not skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from poller.events import (
    SqsRecordShape,
    binary_attribute,
    json_string,
    md5,
    md5_of_message_attributes,
    string_attribute,
)
from poller.sources.base import Depth, Message, SourceError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from poller.config import Config
    from poller.mappings import EventSource

__all__ = [
    "BODY_ENCODING_ATTRIBUTE",
    "DEAD_LETTER_REASON_FIELD",
    "EVENT_SOURCE",
    "RedisQueue",
]

T = TypeVar("T")

log = logging.getLogger(__name__)
_encode_json = msgspec.json.Encoder().encode

EVENT_SOURCE: Final = "poller:redis-queue"
BODY_FIELD: Final = b"body"
# Set on records whose body is not the entry's UTF-8 ``body`` field as stored.
BODY_ENCODING_ATTRIBUTE: Final = "poller.bodyEncoding"
ENCODING_BASE64: Final = "base64"  # body = base64 of the raw (non-UTF-8) ``body`` value
ENCODING_FIELDS_JSON: Final = "fields-json"  # no ``body`` field: body = the field map as JSON
# Fields the dead-letter script adds to the copy (the names local:// queues use).
DEAD_LETTER_REASON_FIELD: Final = "DeadLetterReason"
DEAD_LETTER_SOURCE_FIELD: Final = "DeadLetterSourceQueue"
DEAD_LETTER_ID_FIELD: Final = "DeadLetterSourceId"
DEAD_LETTER_COUNT_FIELD: Final = "DeadLetterReceiveCount"

DEFAULT_PORT: Final = 6379
# The group when neither the URI nor the caller names one (only senders, which never read).
DEFAULT_GROUP: Final = "poller"
# One XREADGROUP blocks at most this long; the socket timeout must outlast it.
MAX_BLOCK_S: Final = 20.0
SOCKET_TIMEOUT_S: Final = MAX_BLOCK_S + 10.0
CONNECT_TIMEOUT_S: Final = 5.0
# Redelivery scans run every visibility_timeout/4, within these bounds: often enough that an
# expired entry waits about a quarter of its timeout more, rarely enough to cost nothing.
CLAIM_INTERVAL_MIN_S: Final = 0.05
CLAIM_INTERVAL_MAX_S: Final = 30.0
# XAUTOCLAIM scans up to 10 x COUNT PEL entries per call; the script repeats it this often
# before giving up until the next turn, so a large PEL is covered in few round trips.
CLAIM_ROUNDS: Final = 10
# IDs per XACK/XDEL command and per Lua call (Lua's unpack() has a C-stack limit near 8000).
ID_CHUNK: Final = 1000
SEND_CHUNK: Final = 1000  # XADDs per pipeline
# A consumer with nothing pending and idle this long is a leftover of a finished process.
STALE_CONSUMER_MS: Final = 24 * 3600 * 1000
MIN_SERVER_VERSION: Final = (6, 2)  # XAUTOCLAIM

# -- Lua -------------------------------------------------------------------------------------
# Each script touches only the keys it is given, so it also works where keys are checked.

# XAUTOCLAIM up to COUNT entries idle past the visibility timeout, with each entry's delivery
# counter (XAUTOCLAIM's reply lacks it; reading it here saves a round trip and a race).
# KEYS: stream. ARGV: group, consumer, min_idle_ms, cursor, count, rounds.
# Returns {next_cursor, {{id, fields}...}, {delivery_count...}}.
_CLAIM_LUA: Final = """
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
_EXTEND_LUA: Final = """
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
_DEAD_LETTER_LUA: Final = """
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

# XACK + XDEL (delete_on_ack) with the IDs in one space-separated argument: redis-py packs
# each argument of a command in Python, which for 100 IDs costs more client CPU than the round
# trip; one string is packed at once. XDEL comes after XACK, atomically with it. (A plain XACK
# is packed by _xack_command instead: no script for the server to run.)
# KEYS: stream. ARGV: group, "id id ...". Returns how many were acked.
_ACK_DELETE_LUA: Final = """
local ids = {}
for id in string.gmatch(ARGV[2], '%S+') do ids[#ids + 1] = id end
if #ids == 0 then return 0 end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return acked
"""

# Remove this consumer from the group if it owns nothing (DELCONSUMER drops a consumer's
# pending entries with it, which would lose them). KEYS: stream. ARGV: group, consumer.
_RETIRE_LUA: Final = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if p[1] then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# Drop consumers left by processes that ended without retiring (crashes): nothing pending,
# idle for long. KEYS: stream. ARGV: group, min_idle_ms, our consumer. Returns how many.
_REAP_LUA: Final = """
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

# Commands sent through redis-py whose replies we read straight from hiredis: redis-py's
# parsers build a dict per entry (and differ between RESP2 and RESP3). XREADGROUP and XACK
# skip redis-py altogether (RedisQueue._raw).
_RAW_COMMANDS: Final = ("XRANGE",)


def _resp_args(parts: Sequence[bytes]) -> bytes:
    """Bulk strings in RESP, without the array header (it depends on the whole command)."""
    return b"".join(b"$%d\r\n%b\r\n" % (len(part), part) for part in parts)


def _resp_int(value: int) -> bytes:
    digits = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


def consumer_name() -> str:
    """hostname-pid-random: one PEL per source instance, unique across daemons and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _text(value: bytes) -> str:
    # Field names and attribute values we cannot decode are still shown, never dropped.
    return value.decode("utf-8", "backslashreplace")


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    raw = info.get("redis_version")
    if raw is None:
        return ()  # not Redis itself: let the commands speak for the server
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    parts = []
    for piece in raw.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@dataclass(slots=True)
class _ReadRequest:
    """One receive() call waiting for a share of a merged XREADGROUP."""

    limit: int
    deadline: float  # loop time after which it is answered, with nothing if need be
    future: asyncio.Future[list[Message]]


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
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        group: str = DEFAULT_GROUP,
        visibility_timeout_s: float = 30,
        max_receive_count: int | None = None,
        dead_letter: str | None = None,
        start_id: str = "$",
        delete_on_ack: bool = False,
        display_uri: str | None = None,
        region: str = "local",
        consumer: str | None = None,
        config_error: str | None = None,
        reader: bool = True,
    ) -> None:
        if not stream_key:
            raise SourceError("a redis-queue needs a stream key", retryable=False)
        if start_id not in ("0", "$"):
            raise SourceError(f"redis-queue start must be 0 or $, not {start_id!r}",
                              retryable=False)
        self.stream_key = stream_key
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self._password = password
        self.tls = tls
        self.ca_file = ca_file
        self.group = group
        self.visibility_timeout_s = float(visibility_timeout_s)
        self.max_receive_count = max_receive_count
        self.dead_letter_key = dead_letter or f"{stream_key}:dlq"
        self.start_id = start_id
        self.delete_on_ack = delete_on_ack
        self.display_uri = display_uri or f"redis-queue://{host}:{port}/{db}/{stream_key}"
        self.region = region
        self.consumer = consumer or consumer_name()
        # False for a sender (`poller send`): it must not create (or retire from) a group that
        # no mapping reads.
        self.reader = reader
        # Set when the config cannot work (a password from an unset environment variable, a
        # missing CA file): reported by the first call, where the engine shows it, rather than
        # while building the runner.
        self._config_error = config_error

        self._shape = SqsRecordShape(EVENT_SOURCE, self.display_uri, self.region)
        self._key = stream_key.encode()
        self._group_b = group.encode()
        self._consumer_b = self.consumer.encode()
        self._visibility_ms = int(self.visibility_timeout_s * 1000)
        self._claim_interval = min(
            max(self.visibility_timeout_s / 4, CLAIM_INTERVAL_MIN_S), CLAIM_INTERVAL_MAX_S
        )
        # The constant parts of XREADGROUP and XACK in RESP (see _read_new and _xack).
        self._read_head = _resp_args(
            (b"XREADGROUP", b"GROUP", self._group_b, self._consumer_b, b"COUNT")
        )
        self._read_tail = _resp_args((b"STREAMS", self._key, b">"))
        self._xack_head = _resp_args((b"XACK", self._key, self._group_b))
        # Idle connections for the commands packed here (_raw), outside redis-py's pool.
        self._raw_idle: list[Any] = []

        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False
        self._closing = False
        # Redelivery bookkeeping (loop time; 0 = due now, so a new instance first picks up
        # what a crashed predecessor left pending).
        self._next_claim = 0.0
        self._claim_cursor = b"0-0"
        self._claiming = False
        # Merged reads.
        self._read_queue: deque[_ReadRequest] = deque()
        self._read_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Group-committed acks.
        self._ack_busy = False
        self._ack_ids: list[str] = []
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._ack_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisQueue({self.display_uri!r}, group={self.group!r}, consumer={self.consumer!r})"

    @classmethod
    def from_source(
        cls, source: EventSource, config: Config, *, group: str | None = None
    ) -> RedisQueue:
        """Build from a parsed ``redis-queue://`` URI.

        ``group`` is the default consumer group (the factory passes the mapping's UUID, as
        Lambda does for Kafka); an explicit ``?group=`` in the URI wins. ``start`` is honoured
        only when the URI says it, else ``$`` (new entries only, like Lambda's LATEST). The
        password is the URI's, else the one in the environment variable named by
        ``[redis] password_env``.
        """
        options = source.options
        # Only what the URI says explicitly overrides our defaults (whatever defaults the
        # parser fills in for the options it leaves out).
        given = {key for key, _ in parse_qsl(urlsplit(source.uri).query, keep_blank_values=True)}
        explicit_group = options.get("group") if "group" in given else None
        chosen_group = explicit_group or group or options.get("group") or DEFAULT_GROUP
        start_id = (options.get("start") or "$") if "start" in given else "$"
        password = source.password
        config_error = None
        env_name = config.redis.password_env
        if password is None and env_name:
            password = os.environ.get(env_name)
            if password is None:
                config_error = (
                    f"{source.display_uri}: the environment variable {env_name} (named by "
                    "[redis] password_env in the config) is not set; export it, or put the "
                    "password in the URI"
                )
        tls = bool(options.get("tls", False))
        ca_file = config.redis.ca_file if tls else None
        if ca_file is not None and not os.path.isfile(ca_file):
            config_error = (
                f"{source.display_uri}: [redis] ca_file {ca_file!r} is not a file; point it at "
                "the PEM file of the CA that signed the Redis server's certificate, or remove "
                "it to trust the system's CAs"
            )
        return cls(
            source.stream_key or "",
            host=source.host or "127.0.0.1",
            port=source.port or DEFAULT_PORT,
            db=source.db or 0,
            username=source.username,
            password=password,
            tls=tls,
            ca_file=ca_file,
            group=chosen_group,
            visibility_timeout_s=options.get("visibility_timeout", 30),
            max_receive_count=options.get("max_receive_count"),
            dead_letter=options.get("dead_letter"),
            start_id=start_id,
            delete_on_ack=bool(options.get("delete_on_ack", False)),
            display_uri=source.display_uri,
            config_error=config_error,
            # The factory names no group for a sender (open_queue_sender).
            reader=group is not None,
        )

    # -- connection --------------------------------------------------------------------------
    def _client(self) -> aioredis.Redis:
        if self._config_error is not None:
            raise SourceError(self._config_error, retryable=False)
        if self._closed:
            raise SourceError(f"{self.display_uri}: the source is closed", retryable=False)
        if self._redis is None:
            client = aioredis.Redis(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.username,
                password=self._password,
                ssl=self.tls,
                ssl_ca_certs=self.ca_file,
                decode_responses=False,  # bodies are bytes until we decide how to show them
                protocol=2,  # reply shapes we parse ourselves; every server speaks it
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_keepalive=True,
                # One immediate retry on a dropped connection: a pooled socket that died with
                # a restart reconnects transparently; a server that is really down fails fast
                # so the engine can back off (redis-py's default retries for seconds).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                # No client_name: CLIENT SETNAME needs a permission a user limited to stream
                # commands may lack, and would then fail every connection.
            )
            for command in _RAW_COMMANDS:
                client.response_callbacks.pop(command, None)
            self._scripts = {
                "ack_delete": client.register_script(_ACK_DELETE_LUA),
                "claim": client.register_script(_CLAIM_LUA),
                "extend": client.register_script(_EXTEND_LUA),
                "dead_letter": client.register_script(_DEAD_LETTER_LUA),
                "retire": client.register_script(_RETIRE_LUA),
                "reap": client.register_script(_REAP_LUA),
            }
            self._redis = client
        return self._redis

    def _error(self, operation: str, exc: BaseException) -> SourceError:
        """A SourceError a person can act on; never carries the password."""
        where = f"{self.display_uri} ({operation})"
        text = str(exc) or type(exc).__name__
        if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError) or (
            isinstance(exc, ResponseError) and text.startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
        ):
            return SourceError(
                f"{where}: Redis refused the credentials or permissions: {text}. Check the "
                "user/password in the URI (or [redis] password_env) and the user's ACL",
                retryable=False,
            )
        if "CERTIFICATE_VERIFY_FAILED" in text:
            # Retried all the same: the server's certificate may be replaced while we wait.
            return SourceError(
                f"{where}: the TLS certificate of Redis at {self.host}:{self.port} was not "
                f"accepted: {text}. If a private CA signed it, set [redis] ca_file to that "
                "CA's PEM file",
                retryable=True,
            )
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            return SourceError(
                f"{where}: cannot reach Redis at {self.host}:{self.port}: {text}", retryable=True
            )
        if isinstance(exc, ResponseError) and text.startswith("WRONGTYPE"):
            return SourceError(
                f"{where}: the key {self.stream_key!r} holds something other than a stream; "
                "point the mapping at a stream key or delete that key",
                retryable=False,
            )
        if isinstance(exc, ResponseError) and "unknown command" in text.lower():
            return SourceError(
                f"{where}: this server lacks a stream command ({text}); redis-queue needs "
                "Redis 6.2 or newer (7 recommended)",
                retryable=False,
            )
        return SourceError(f"{where}: Redis error: {text}", retryable=True)

    async def _call(self, operation: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``fn(client)``; re-create a vanished group and retry once; map errors."""
        try:
            client = self._client()
            try:
                return await fn(client)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            # The group (or the whole stream) is gone: Redis restarted without persistence,
            # or someone destroyed it. Start it at 0: whatever the stream holds now was added
            # since, and must be delivered.
            log.warning(
                "redis-queue %s: consumer group %r missing; re-creating it at 0",
                self.display_uri, self.group,
            )
            await self._create_group(client, "0")
            return await fn(client)
        except SourceError:
            raise
        except (RedisError, OSError) as exc:
            raise self._error(operation, exc) from exc

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
                version = _version(await client.info("server"))
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
        self._closing = True
        if self._ack_task is not None and not self._ack_task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._ack_task), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        while self._read_queue:
            request = self._read_queue.popleft()
            if not request.future.done():
                request.future.set_result([])
        idle, self._raw_idle = self._raw_idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect()
        client, self._redis = self._redis, None
        if client is None:
            self._closed = True
            return
        if self.reader:
            with contextlib.suppress(RedisError, OSError):
                await self._scripts["retire"](
                    keys=[self._key], args=[self._group_b, self._consumer_b], client=client
                )
        self._closed = True
        with contextlib.suppress(Exception):
            await client.aclose()

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages: redelivered (expired) entries first, then new ones; waits up
        to wait_s for the first. Concurrent calls share round trips (module docstring)."""
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        request = _ReadRequest(
            limit=min(max_messages, self.max_receive_batch),
            deadline=loop.time() + max(wait_s, 0.0),
            future=loop.create_future(),
        )
        self._read_queue.append(request)
        if self._read_scheduled:
            # Someone collects this tick's receive() calls: ride along with them.
            return await request.future
        # Lead: let the other receive() calls of this tick join, then read for all of them
        # from this task (no extra task, no extra loop iteration on the hot path).
        self._read_scheduled = True
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._read_scheduled = False
            request.future.cancel()
            if self._read_queue:
                self._schedule_read(loop)
            raise
        self._read_scheduled = False
        requests = self._take_requests()
        if requests:
            await self._read(requests, loop, own=request)
        return await request.future

    async def delete(self, messages: list[Message]) -> None:
        """XACK (+XDEL). Deletes that arrive while one is in flight go out together next
        (group commit): one round trip for many pollers under load, none added when idle."""
        if not messages:
            return
        ids = [m.receipt for m in messages]
        if not self._ack_busy:
            self._ack_busy = True
            try:
                await self._ack(ids)
            finally:
                if self._ack_waiters:
                    # Hand the queue to a task; it clears _ack_busy when drained.
                    self._ack_task = asyncio.get_running_loop().create_task(self._ack_loop())
                else:
                    self._ack_busy = False
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_ids.extend(ids)
        self._ack_waiters.append(waiter)
        await waiter

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
            self._next_claim = 0.0

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Copy each entry with the reason to the dead-letter stream and ack it, atomically."""
        if not messages:
            return
        ids = [m.receipt for m in messages]
        script = self._scripts_or_connect()["dead_letter"]
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
        after = await client.execute_command(
            "XRANGE", self._key, f"({last}", "+", "COUNT", cap
        )
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

            async def go(client: aioredis.Redis, chunk: Sequence[str] = chunk) -> int:
                pipe = client.pipeline(transaction=False)
                for body in chunk:
                    pipe.execute_command("XADD", self._key, "*", BODY_FIELD, body, *extra)
                return len(await pipe.execute())

            sent += await self._call("send", go)
        return sent

    # -- merged reads ----------------------------------------------------------------------
    def _enqueue(self, request: _ReadRequest, loop: asyncio.AbstractEventLoop) -> None:
        """Queue a request that has no caller to lead its read (it is waiting again)."""
        self._read_queue.append(request)
        if not self._read_scheduled:
            self._schedule_read(loop)

    def _schedule_read(self, loop: asyncio.AbstractEventLoop) -> None:
        self._read_scheduled = True
        # At the end of this loop iteration, so every request queued in the same tick joins
        # the same round trip.
        loop.call_soon(self._start_read, loop)

    def _take_requests(self) -> list[_ReadRequest]:
        requests = [r for r in self._read_queue if not r.future.done()]
        self._read_queue.clear()
        return requests

    def _start_read(self, loop: asyncio.AbstractEventLoop) -> None:
        self._read_scheduled = False
        requests = self._take_requests()
        if not requests:
            return
        task = loop.create_task(self._read(requests, loop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(
        self,
        requests: list[_ReadRequest],
        loop: asyncio.AbstractEventLoop,
        own: _ReadRequest | None = None,
    ) -> None:
        """One round of reads for ``requests``; ``own`` is the leading caller's request."""
        try:
            waiting = requests
            if loop.time() >= self._next_claim and not self._claiming:
                entries = await self._claim(sum(r.limit for r in waiting), loop)
                waiting = self._hand_out(waiting, entries)
            if waiting:
                now = loop.time()
                # Block no longer than the most impatient caller, and wake for the next
                # redelivery scan (if one is running elsewhere now, for the one after it).
                claim_at = self._next_claim
                if claim_at <= now and self._claiming:
                    claim_at = now + self._claim_interval
                until = min(min(r.deadline for r in waiting), claim_at)
                block_ms = int(min(until - now, MAX_BLOCK_S) * 1000)
                entries = await self._read_new(sum(r.limit for r in waiting), block_ms)
                waiting = self._hand_out(waiting, entries)
        except Exception as exc:
            # SourceError (or a bug): every caller of this round trip sees it.
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        except BaseException:
            # Cancelled (the leading caller, or close()). What the interrupted command read
            # returns to the queue after the visibility timeout; the other callers wait on
            # in a new round, or get nothing if the source is closing.
            if own is not None:
                future = own.future
                if (future.done() and not future.cancelled() and future.exception() is None
                        and not self._closing):
                    # Handed entries by the redelivery scan just before the cancel: nobody
                    # will process them, so let someone else have them now.
                    self._release_later([m.receipt for m in future.result()])
                future.cancel()
            for request in requests:
                if not request.future.done():
                    if self._closing:
                        request.future.set_result([])
                    else:
                        self._enqueue(request, loop)
            raise
        now = loop.time()
        for request in waiting:
            if request.future.done():
                continue
            if request.deadline - now > 0.001:
                # Nothing yet and time left: wait again (with whoever else is waiting) rather
                # than answer empty, which the engine would count as an idle poll.
                self._enqueue(request, loop)
            else:
                request.future.set_result([])

    def _hand_out(
        self, requests: list[_ReadRequest], entries: list[Message]
    ) -> list[_ReadRequest]:
        """Give each caller at most its limit, in order; return those that got nothing."""
        index = 0
        waiting: list[_ReadRequest] = []
        for request in requests:
            if request.future.done():  # cancelled meanwhile
                continue
            if index >= len(entries):
                waiting.append(request)
                continue
            share = entries[index : index + request.limit]
            index += len(share)
            request.future.set_result(share)
        if index < len(entries):
            # Read for callers that were cancelled: let someone else have them now instead of
            # after the visibility timeout.
            self._release_later([m.receipt for m in entries[index:]])
        return waiting

    def _release_later(self, ids: list[str]) -> None:
        async def release() -> None:
            try:
                await self._extend(ids, self._visibility_ms)
            except SourceError as exc:
                log.warning("redis-queue %s: could not release %d entries (they return after "
                            "the visibility timeout): %s", self.display_uri, len(ids), exc)
            self._next_claim = 0.0

        task = asyncio.get_running_loop().create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_new(self, count: int, block_ms: int) -> list[Message]:
        if block_ms >= 1:
            packed = b"*11\r\n%b%b%b%b" % (
                self._read_head, _resp_int(count), _resp_args((b"BLOCK", b"%d" % block_ms)),
                self._read_tail,
            )
        else:  # BLOCK 0 would mean forever
            packed = b"*9\r\n%b%b%b" % (self._read_head, _resp_int(count), self._read_tail)

        async def go(client: aioredis.Redis) -> Any:
            return (await self._raw(client, packed, 1))[0]

        reply = await self._call("receive", go)
        if not reply:
            return []
        # RESP2: [[key, entries]]; a RESP3 connection would give {key: entries}.
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        return self._first_deliveries(entries)

    async def _claim(self, count: int, loop: asyncio.AbstractEventLoop) -> list[Message]:
        """Entries idle past the visibility timeout, now ours, with their delivery counts."""
        self._claiming = True
        self._next_claim = loop.time() + self._claim_interval
        try:
            script = self._scripts_or_connect()["claim"]

            async def go(client: aioredis.Redis) -> Any:
                return await script(
                    keys=[self._key],
                    args=[self._group_b, self._consumer_b, self._visibility_ms,
                          self._claim_cursor, count, CLAIM_ROUNDS],
                    client=client,
                )

            cursor, entries, counts = await self._call("receive", go)
        finally:
            self._claiming = False
        self._claim_cursor = cursor
        if cursor != b"0-0":
            # The scan stopped part-way through the PEL: continue at the next receive.
            self._next_claim = 0.0
        if not entries:
            return []
        now_ms = int(time.time() * 1000)
        build = self._message
        return [
            build(entry_id, fields, int(delivered), now_ms)
            for (entry_id, fields), delivered in zip(entries, counts, strict=True)
        ]

    def _scripts_or_connect(self) -> dict[str, AsyncScript]:
        self._client()
        return self._scripts

    async def _extend(self, ids: list[str], idle_ms: int) -> None:
        script = self._scripts_or_connect()["extend"]
        for chunk in _chunks(ids, ID_CHUNK):

            async def go(client: aioredis.Redis, chunk: Sequence[str] = chunk) -> Any:
                return await script(
                    keys=[self._key],
                    args=[self._group_b, self._consumer_b, idle_ms, *chunk],
                    client=client,
                )

            await self._call("change_visibility", go)

    # -- group-committed acks ----------------------------------------------------------------
    async def _ack_loop(self) -> None:
        """Flush queued deletes, all of them per round trip, until none are left."""
        try:
            while self._ack_waiters:
                ids, self._ack_ids = self._ack_ids, []
                waiters, self._ack_waiters = self._ack_waiters, []
                try:
                    await self._ack(ids)
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                except BaseException:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.cancel()
                    raise
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            # No await between the emptiness check and this: a delete() arriving now leads.
            self._ack_busy = False

    async def _ack(self, ids: list[str]) -> None:
        if not self.delete_on_ack:
            await self._xack(ids)
            return
        script = self._scripts_or_connect()["ack_delete"]
        chunks = [" ".join(chunk) for chunk in _chunks(ids, ID_CHUNK)]

        async def go(client: aioredis.Redis) -> Any:
            if len(chunks) == 1:
                return await script(keys=[self._key], args=[self._group_b, chunks[0]],
                                    client=client)
            pipe = client.pipeline(transaction=False)
            for chunk in chunks:
                await script(keys=[self._key], args=[self._group_b, chunk], client=pipe)
            return await pipe.execute()

        await self._call("delete", go)

    async def _xack(self, ids: list[str]) -> None:
        """XACK, packed here (one write for every chunk; see _raw).

        Entry IDs are ASCII, so one join packs them all: a tenth of what redis-py's
        per-argument packing costs, and the server runs plain XACKs, not a script that first
        splits a string (which took it twice as long as the XACK itself).
        """
        chunks = _chunks(ids, ID_CHUNK)
        packed = b"".join(self._xack_command(chunk) for chunk in chunks)

        async def go(client: aioredis.Redis) -> Any:
            return await self._raw(client, packed, len(chunks))

        await self._call("delete", go)

    async def _raw(self, client: aioredis.Redis, packed: bytes, replies: int) -> list[Any]:
        """Send commands packed in RESP and read their ``replies`` raw (hiredis) replies.

        The hot commands (XREADGROUP, XACK) bypass redis-py's command path and its pool,
        whose per-call lock, liveness probe (a read syscall) and bookkeeping cost more than
        the round trip on a busy daemon. Connections come from the pool's factory, with its
        address, credentials and TLS, and are kept here, one per command in flight. One that
        fails in any way (an error reply may leave a reply unread, a cancel may leave half a
        command written) is closed, never reused. A reused one that turns out dead (Redis
        restarted) takes the other idle ones with it, since they died the same way, and the
        command is retried once at once on a fresh connection, as redis-py's own retry would.
        """
        idle = self._raw_idle
        while True:
            reused = bool(idle)
            if reused:
                connection = idle.pop()
            else:
                connection = client.connection_pool.make_connection()
                # One deadline for the whole exchange (below) instead of redis-py's per-write
                # wait_for, which costs a task per command.
                connection.socket_timeout = None
            try:
                async with asyncio.timeout(SOCKET_TIMEOUT_S):
                    await connection.send_packed_command(packed, check_health=False)
                    out = [await connection.read_response() for _ in range(replies)]
            except RedisConnectionError:
                await connection.disconnect(nowait=True)
                if reused:
                    stale, idle[:] = list(idle), []
                    for other in stale:
                        await other.disconnect(nowait=True)
                    continue
                raise
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            idle.append(connection)
            return out

    def _xack_command(self, ids: Sequence[str]) -> bytes:
        head = self._xack_head
        return (
            b"*%d\r\n%b" % (len(ids) + 3, head)
            + "".join([f"${len(i)}\r\n{i}\r\n" for i in ids]).encode("ascii")
        )

    # -- records -------------------------------------------------------------------------------
    def _first_deliveries(self, entries: list[list[Any]]) -> list[Message]:
        """Messages for entries XREADGROUP just delivered for the first time.

        The hot path: the loop is _message's fast case inlined, with everything it touches
        in locals, for the usual entry (a lone UTF-8 ``body`` field). The record goes straight
        to JSON through the shape's template; anything else goes through _message.
        """
        now_ms = int(time.time() * 1000)
        now = b"%d" % now_ms
        digest = md5
        json_body = json_string
        template = self._shape.plain_template
        slow = self._message
        messages: list[Message] = []
        append = messages.append
        for raw_id, fields in entries:
            if len(fields) != 2 or fields[0] != BODY_FIELD:
                append(slow(raw_id, fields, 1, now_ms))
                continue
            raw = fields[1]
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                append(slow(raw_id, fields, 1, now_ms))
                continue
            entry_id = raw_id.decode("ascii")
            encoded = template % (
                raw_id, raw_id, json_body(body), b"1", raw_id.partition(b"-")[0], now,
                digest(raw).hexdigest().encode("ascii"),
            )
            # Positional: half the cost of keywords here.
            append(Message(entry_id, entry_id, body, 1, None, len(encoded), None, None, encoded))
        return messages

    def _message(
        self, raw_id: bytes, fields: list[bytes] | None, receive_count: int, now_ms: int
    ) -> Message:
        """The message and its §7.1 record for one entry."""
        entry_id = raw_id.decode("ascii")
        sent_ms = raw_id.partition(b"-")[0]
        attributes: dict[str, dict[str, Any]] | None = None
        if fields is not None and len(fields) == 2 and fields[0] == BODY_FIELD:
            # The common case: just a body.
            raw = fields[1]
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                body = base64.b64encode(raw).decode("ascii")
                raw = body.encode("ascii")
                attributes = {BODY_ENCODING_ATTRIBUTE: string_attribute(ENCODING_BASE64)}
        else:
            body, attributes = self._decode_fields(fields or [])
            raw = body.encode()
        # The PEL keeps only the last delivery time: for a redelivery the send time is the
        # closest bound we have for the first receive.
        first_receive = b"%d" % now_ms if receive_count <= 1 else sent_ms
        md5_of_body = md5(raw).hexdigest()
        if not attributes:
            encoded = self._shape.encode_plain(
                raw_id, raw_id, body, b"%d" % receive_count, sent_ms, first_receive,
                md5_of_body.encode("ascii"),
            )
            return Message(entry_id, entry_id, body, receive_count, None, len(encoded),
                           encoded=encoded)
        record = self._shape.record(
            entry_id, entry_id, body, str(receive_count), sent_ms.decode("ascii"),
            first_receive.decode("ascii"), md5_of_body, attributes,
        )
        record["md5OfMessageAttributes"] = md5_of_message_attributes(attributes)
        encoded = _encode_json(record)
        return Message(entry_id, entry_id, body, receive_count, record, len(encoded),
                       encoded=encoded)

    @staticmethod
    def _decode_fields(fields: list[bytes]) -> tuple[str, dict[str, dict[str, Any]]]:
        """Body and messageAttributes of an entry that is not a lone UTF-8 ``body``."""
        pairs = list(zip(fields[0::2], fields[1::2], strict=False))
        attributes: dict[str, dict[str, Any]] = {}
        raw_body: bytes | None = None
        for name, value in pairs:
            if name == BODY_FIELD:
                raw_body = value
                continue
            try:
                attributes[_text(name)] = string_attribute(value.decode("utf-8"))
            except UnicodeDecodeError:
                attributes[_text(name)] = binary_attribute(value)
        if raw_body is None:
            # Nothing to call the body: hand over every field so nothing is lost.
            body = _encode_json({_text(n): _text(v) for n, v in pairs}).decode()
            attributes[BODY_ENCODING_ATTRIBUTE] = string_attribute(ENCODING_FIELDS_JSON)
            return body, attributes
        try:
            return raw_body.decode("utf-8"), attributes
        except UnicodeDecodeError:
            attributes[BODY_ENCODING_ATTRIBUTE] = string_attribute(ENCODING_BASE64)
            return base64.b64encode(raw_body).decode("ascii"), attributes
