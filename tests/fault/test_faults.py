"""Nothing is lost when anything crashes: seeded rounds of random faults per source.

Each round starts a real `poller run` against real servers and injects faults at random
moments (a daemon or worker SIGKILLed, the daemon SIGSTOPped past its visibility timeout,
the server killed and restarted, connections dropped, stalled or half-closed by a proxy),
then checks what harness.Round.check says. The default run does one round per source, a new
seed each run; ``pytest -m fault --fault-rounds 30`` is the long one (tests/fault/RESULTS.md has
its figures).
The seed is printed; ``--fault-seed N`` replays a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.harness import Round, Workload
from tests.fault.workloads import (
    DynamoDbWorkload,
    KafkaWorkload,
    KinesisWorkload,
    LocalWorkload,
    RedisQueueWorkload,
    RedisStreamWorkload,
    SqsWorkload,
)
from tests.servers import (
    AWS_DUMMY_KEY,
    AWS_REGION,
    MotoServer,
    PersistentRedisServer,
    TansuServer,
    free_port,
)

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentRedisServer]:
    server = PersistentRedisServer(workdir=tmp_path_factory.mktemp("fault-redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def fault_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(workdir=tmp_path_factory.mktemp("fault-moto"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def fault_tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TansuServer, int]]:
    """tansu advertising the port of the proxy each Kafka round puts in front of it."""
    proxy_port = free_port()
    server = TansuServer(workdir=tmp_path_factory.mktemp("fault-tansu"), advertised_port=proxy_port)
    server.start()
    try:
        yield server, proxy_port
    finally:
        server.kill()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for the daemon (it inherits the environment) and boto3."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, AWS_DUMMY_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", AWS_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def _rounds(
    request: pytest.FixtureRequest, seed: int, make: object, tmp_path: Path
) -> list[dict[str, object]]:
    count = request.config.getoption("--fault-rounds")
    faults = request.config.getoption("--fault-faults")
    figures = []
    for index in range(count):
        workdir = tmp_path / f"round-{index}"
        workdir.mkdir()
        workload: Workload = make(workdir)  # type: ignore[operator]
        round_ = Round(workload, seed + index)
        outcome = round_.run(faults)
        result = round_.check()
        figures.append(
            {"source": workload.name, "seed": seed + index, "faults": outcome.faults, **result}
        )
        print(json.dumps(figures[-1]))
    return figures


def test_local_queue(request: pytest.FixtureRequest, fault_seed: int, tmp_path: Path) -> None:
    _rounds(request, fault_seed, LocalWorkload, tmp_path)


def test_redis_queue(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_redis: PersistentRedisServer,
) -> None:
    _rounds(request, fault_seed, lambda w: RedisQueueWorkload(w, fault_redis), tmp_path)


def test_redis_stream(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_redis: PersistentRedisServer,
) -> None:
    _rounds(request, fault_seed, lambda w: RedisStreamWorkload(w, fault_redis), tmp_path)


def test_sqs(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_moto: MotoServer,
    aws_credentials: None,
) -> None:
    _rounds(request, fault_seed, lambda w: SqsWorkload(w, fault_moto), tmp_path)


def test_kinesis(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_moto: MotoServer,
    aws_credentials: None,
) -> None:
    _rounds(request, fault_seed, lambda w: KinesisWorkload(w, fault_moto), tmp_path)


def test_dynamodb(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_moto: MotoServer,
    aws_credentials: None,
) -> None:
    _rounds(request, fault_seed, lambda w: DynamoDbWorkload(w, fault_moto), tmp_path)


def test_kafka(
    request: pytest.FixtureRequest,
    fault_seed: int,
    tmp_path: Path,
    fault_tansu: tuple[TansuServer, int],
) -> None:
    server, proxy_port = fault_tansu
    _rounds(request, fault_seed, lambda w: KafkaWorkload(w, server, proxy_port), tmp_path)
