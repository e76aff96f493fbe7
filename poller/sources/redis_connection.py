"""A Redis server as the Redis sources reach it: address, credentials, TLS, errors, and commands
sent outside redis-py's command path.

``redis-queue://`` and ``redis-stream://`` share their URI form
(``SCHEME://[USER:PASSWORD@]HOST[:PORT][/DB]/KEY[?OPTION=VALUE&...]``), the ``[redis]`` config
section (a password from an environment variable, a private CA for TLS) and the way a Redis
failure becomes a SourceError a person can act on; all of that lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis
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

from poller.sources.base import SourceError, uri_error

if TYPE_CHECKING:
    from poller.config import RedisConfig

T = TypeVar("T")

DEFAULT_PORT: Final = 6379
# One blocking read waits at most this long. Short enough that a server which accepts the
# connection and never answers is noticed within MAX_BLOCK_S + COMMAND_TIMEOUT_S even by an
# idle mapping; an idle read every few seconds costs the server nothing.
MAX_BLOCK_S: Final = 5.0
# Any reply (beyond the time a blocking read may legitimately wait) must come within this.
COMMAND_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5.0

pack = hiredis.pack_command  # a command's arguments to RESP, in C


@dataclass(frozen=True, kw_only=True)
class RedisAddress:
    """Where a Redis source's keys live, parsed from its URI."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


def parse_redis_uri(uri: str, label: str) -> tuple[RedisAddress, str, str, str]:
    """``(address, key path, query, display URI)`` of a Redis source URI.

    The path is ``/DB/KEY`` when its first segment is a number and a key follows, else the
    whole path is the key (keys may themselves hold '/'). The key path is still
    percent-encoded (a source may split it before decoding); the display URI has no user info.
    """
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        # Not the exception text: a mis-split password would end up in it.
        raise uri_error(
            uri,
            f"Invalid host or port in {label} URI (percent-encode '/', '@' and ':' in the user "
            "name and password)",
        ) from None
    if parts.fragment:
        raise uri_error(uri, f"Invalid {label} URI (a '#fragment' is not allowed)")
    if not parts.hostname:
        raise uri_error(uri, f"Missing host in {label} URI")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    db = 0
    first, sep, rest = path.partition("/")
    if sep and first.isdigit() and rest:
        db, path = int(first), rest
    key = unquote(path)
    if not key:
        raise uri_error(uri, f"Missing key in {label} URI ({label}://HOST[:PORT][/DB]/KEY)")
    address = RedisAddress(
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )
    hostport = parts.netloc.rpartition("@")[2]
    display = f"{label}://{hostport}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return address, path, parts.query, display


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a source needs to log in, from its URI and the config's ``[redis]`` section."""

    password: str | None
    ca_file: str | None
    # Set when the config cannot work (a password from an unset environment variable, a
    # missing CA file): reported by the first call, where the engine shows it, rather than
    # while building the runner.
    problem: str | None = None


def credentials(
    address: RedisAddress, tls: bool, settings: RedisConfig, display_uri: str
) -> Credentials:
    """The URI's password, else the one in the environment variable ``[redis] password_env``
    names; the CA file ``[redis] ca_file`` names for TLS."""
    password = address.password
    problem = None
    env_name = settings.password_env
    if password is None and env_name:
        password = os.environ.get(env_name)
        if password is None:
            problem = (
                f"{display_uri}: the environment variable {env_name} (named by [redis] "
                "password_env in the config) is not set; export it, or put the password in the "
                "URI"
            )
    ca_file = settings.ca_file if tls else None
    if ca_file is not None and not os.path.isfile(ca_file):
        problem = (
            f"{display_uri}: [redis] ca_file {ca_file!r} is not a file; point it at the PEM file "
            "of the CA that signed the Redis server's certificate, or remove it to trust the "
            "system's CAs"
        )
    return Credentials(password, ca_file, problem)


def version_of(info: dict[str, Any]) -> tuple[int, ...]:
    """The server's (major, minor) from INFO server; () when it is not Redis itself."""
    raw = info.get("redis_version")
    if raw is None:
        return ()
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    parts = []
    for piece in raw.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class RedisLink:
    """One source's way to its server: a redis-py client made on first use, errors turned into
    SourceErrors, and connections of its own for the hot commands (``raw``)."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        tls: bool,
        login: Credentials,
        display_uri: str,
        what: str,  # how errors name the kind ("redis-queue"), e.g. for old servers
    ) -> None:
        self.address = address
        self.tls = tls
        self.display_uri = display_uri
        self.what = what
        self._login = login
        self._redis: aioredis.Redis | None = None
        self._closed = False
        # Idle connections for the commands sent by raw(), outside redis-py's pool.
        self._raw_idle: list[Any] = []
        self._on_connect: list[Callable[[aioredis.Redis], None]] = []

    def on_connect(self, hook: Callable[[aioredis.Redis], None]) -> None:
        """Run ``hook(client)`` when the client is made (to register scripts, callbacks)."""
        self._on_connect.append(hook)

    def client(self) -> aioredis.Redis:
        if self._login.problem is not None:
            raise SourceError(self._login.problem, retryable=False)
        if self._closed:
            raise SourceError(f"{self.display_uri}: the source is closed", retryable=False)
        if self._redis is None:
            address = self.address
            client = aioredis.Redis(
                host=address.host,
                port=address.port,
                db=address.db,
                username=address.username,
                password=self._login.password,
                ssl=self.tls,
                ssl_ca_certs=self._login.ca_file,
                decode_responses=False,  # values are bytes until a source decides how to show them
                protocol=2,  # reply shapes the sources parse themselves; every server speaks it
                socket_timeout=COMMAND_TIMEOUT_S,  # no command sent through redis-py blocks
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_keepalive=True,
                # One immediate retry on a dropped connection: a pooled socket that died with a
                # restart reconnects transparently; a server that is really down fails fast so
                # the engine can back off (redis-py's default retries for seconds).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                # No client_name: CLIENT SETNAME needs a permission a user limited to stream
                # commands may lack, and would then fail every connection.
            )
            for hook in self._on_connect:
                hook(client)
            self._redis = client
        return self._redis

    @property
    def connected(self) -> bool:
        return self._redis is not None

    def error(self, operation: str, exc: BaseException, key: str) -> SourceError:
        """A SourceError a person can act on; never carries the password."""
        where = f"{self.display_uri} ({operation})"
        text = str(exc) or type(exc).__name__
        address = self.address.hostport
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
                f"{where}: the TLS certificate of Redis at {address} was not accepted: {text}. "
                "If a private CA signed it, set [redis] ca_file to that CA's PEM file",
                retryable=True,
            )
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            return SourceError(f"{where}: cannot reach Redis at {address}: {text}", retryable=True)
        if isinstance(exc, ResponseError) and text.startswith("WRONGTYPE"):
            return SourceError(
                f"{where}: the key {key!r} holds something other than a stream; point the "
                "mapping at a stream key or delete that key",
                retryable=False,
            )
        if isinstance(exc, ResponseError) and "unknown command" in text.lower():
            return SourceError(
                f"{where}: this server lacks a stream command ({text}); {self.what} needs Redis "
                "6.2 or newer (7 recommended)",
                retryable=False,
            )
        return SourceError(f"{where}: Redis error: {text}", retryable=True)

    async def call(
        self, operation: str, key: str, fn: Callable[[aioredis.Redis], Awaitable[T]]
    ) -> T:
        """``fn(client)`` with every Redis failure mapped to a SourceError."""
        try:
            return await fn(self.client())
        except SourceError:
            raise
        except (RedisError, OSError) as exc:
            raise self.error(operation, exc, key) from exc

    async def raw(self, packed: bytes, replies: int, block_ms: int = 0) -> list[Any]:
        """Send commands packed in RESP (``pack``) and read their ``replies`` raw replies
        (``block_ms``: how long a blocking command among them may wait on the server).

        The hot commands bypass redis-py's command path and its pool, whose per-call lock,
        liveness probe (a read syscall) and bookkeeping cost more than the round trip on a busy
        daemon, and whose reply parsers build a dict per stream entry. Connections come from the
        pool's factory, with its address, credentials and TLS, and are kept here, one per
        command in flight. One that fails in any way (an error reply may leave a reply unread, a
        cancel may leave half a command written) is closed, never reused. A reused one that
        turns out dead (Redis restarted) takes the other idle ones with it, since they died the
        same way, and the command is retried once at once on a fresh connection, as redis-py's
        own retry would. Raises redis-py's errors: call it inside ``call``.
        """
        idle = self._raw_idle
        client = self.client()
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
                async with asyncio.timeout(block_ms / 1000 + COMMAND_TIMEOUT_S):
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

    async def close(
        self, farewell: Callable[[aioredis.Redis], Awaitable[Any]] | None = None
    ) -> None:
        """Drop every connection; ``farewell(client)`` runs first if a client was made (a
        failure of it is ignored: the source is going away either way)."""
        idle, self._raw_idle = self._raw_idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect()
        client, self._redis = self._redis, None
        if client is not None and farewell is not None:
            with contextlib.suppress(RedisError, OSError):
                await farewell(client)
        self._closed = True
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
