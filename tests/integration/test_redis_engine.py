"""The queue engine over a real Redis stream, with real worker processes.

The engine's rules are unit-tested against an in-memory queue (tests/unit/test_queue_engine.py)
and the source's commands against redis-server (test_redis_queue.py). These run the two
together where only the pair shows the behaviour: a handler slower than the visibility timeout,
and Redis dying in the middle of a drain.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from poller.config import FunctionConfig
from poller.engine.queue import ConcurrencyPolicy, QueueRunner, QueueSettings
from poller.logs import JsonLog
from poller.metrics import REGISTRY, MappingMetrics
from poller.runtime.pool import Runtime
from tests.integration.test_redis_queue import _queue
from tests.servers import RedisServer

KEY = "jobs"
GROUP = "engine-group"

HANDLER = textwrap.dedent(
    """
    import os, time

    def record(event, context):
        time.sleep(float(os.environ["SLEEP"]))
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(r["body"] + "\\n" for r in event["Records"]))
    """
)


@pytest.fixture
def engine_log(tmp_path: Path) -> Iterator[JsonLog]:
    """The runners' log, written to tmp_path/engine.log."""
    with open(tmp_path / "engine.log", "wb") as stream:
        yield JsonLog(stream)


def _uri(server: RedisServer, query: str) -> str:
    return f"redis-queue://{server.host}:{server.port}/0/{KEY}?{query}"


def _runtime(tmp_path: Path, sleep_s: float) -> Runtime:
    (tmp_path / "engine_redis_handler.py").write_text(HANDLER)
    config = FunctionConfig(
        name="f",
        handler="engine_redis_handler.record",
        code_path=str(tmp_path),
        timeout_s=10,
        environment={"OUT": str(tmp_path / "out.txt"), "SLEEP": str(sleep_s)},
    )
    return Runtime([config], memory_budget_mb=4096, log=JsonLog(open("/dev/null", "wb")))


def _handled(tmp_path: Path) -> list[str]:
    out = tmp_path / "out.txt"
    return out.read_text().splitlines() if out.exists() else []


def _runner(
    uri: str, runtime: Runtime, log: JsonLog, *, batch_size: int, concurrency: int
) -> QueueRunner:
    source = _queue(uri, group=GROUP)
    settings = QueueSettings(
        uuid=str(uuid.uuid4()),
        function_name="f",
        batch_size=batch_size,
        batching_window_s=0.0,
        report_batch_item_failures=False,
        maximum_concurrency=concurrency,
        max_payload_bytes=6 * 1024 * 1024,
    )
    return QueueRunner(
        settings,
        source,
        runtime.pool("f"),
        log=log,
        metrics=MappingMetrics(settings.uuid, "f"),
        policy=ConcurrencyPolicy(concurrency),
    )


async def _wait_for(condition: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _drained(admin: aioredis.Redis) -> bool:
    groups = await admin.xinfo_groups(KEY) if await admin.exists(KEY) else []
    return bool(groups) and groups[0]["lag"] == 0 and groups[0]["pending"] == 0


def _metric(name: str, runner: QueueRunner, **labels: str) -> float:
    value = REGISTRY.get_sample_value(
        name, {"mapping": runner.settings.uuid, "function": "f", **labels}
    )
    return 0.0 if value is None else value


async def test_handler_slower_than_the_visibility_timeout_runs_once(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, engine_log: JsonLog
) -> None:
    # Two runners share the group, each with a free slot polling (XAUTOCLAIM every 0.25 s)
    # while the 2.5 s invokes run: without the heartbeat each entry would be claimed and run
    # again after 1 s.
    uri = _uri(redis_server, "visibility_timeout=1&start=0")
    runtime = _runtime(tmp_path, sleep_s=2.5)
    runners = [_runner(uri, runtime, engine_log, batch_size=1, concurrency=2) for _ in range(2)]
    admin = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    await admin.xadd(KEY, {"body": "first"})
    await admin.xadd(KEY, {"body": "second"})
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        await _wait_for(lambda: _drained(admin), 20, "both entries handled and acked")
    finally:
        # stop() lets invokes in flight finish, so a duplicate would be written before we look.
        await asyncio.gather(*(r.stop(10) for r in runners))
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.close()
        await admin.aclose()
    assert sorted(_handled(tmp_path)) == ["first", "second"]


@pytest.mark.timeout(90)
async def test_redis_killed_mid_drain_loses_nothing_and_logs_once(
    persistent_redis: RedisServer, tmp_path: Path, engine_log: JsonLog
) -> None:
    uri = _uri(persistent_redis, "visibility_timeout=1&start=0")
    runtime = _runtime(tmp_path, sleep_s=0.02)
    runner = _runner(uri, runtime, engine_log, batch_size=10, concurrency=2)
    bodies = [f"m{i}" for i in range(400)]
    admin = aioredis.Redis(host=persistent_redis.host, port=persistent_redis.port)
    for start in range(0, len(bodies), 100):
        async with admin.pipeline(transaction=False) as pipe:
            for body in bodies[start : start + 100]:
                pipe.xadd(KEY, {"body": body})
            await pipe.execute()
    await admin.aclose()
    connected = "poller_source_connected"
    task = asyncio.create_task(runner.run())
    try:

        async def some_handled() -> bool:
            return len(_handled(tmp_path)) >= 50

        await _wait_for(some_handled, 20, "the drain to get going")
        assert _metric(connected, runner) == 1
        persistent_redis.kill()

        async def failing_for_a_while() -> bool:
            errors = _metric("poller_source_errors_total", runner, operation="receive")
            return errors >= 3

        await _wait_for(failing_for_a_while, 20, "several failed receives")
        assert _metric(connected, runner) == 0
        assert len(_handled(tmp_path)) < len(bodies)  # killed mid-drain, not after it
        persistent_redis.start()

        admin = aioredis.Redis(host=persistent_redis.host, port=persistent_redis.port)
        try:
            await _wait_for(lambda: _drained(admin), 40, "the drain to finish after the restart")
        finally:
            await admin.aclose()
        assert _metric(connected, runner) == 1
    finally:
        await runner.stop(5)
        await asyncio.gather(task, return_exceptions=True)
        await runtime.close()
        engine_log.flush()
    # At least once: entries whose ack died with the server run again; none is missing.
    assert set(_handled(tmp_path)) == set(bodies)
    lines = (tmp_path / "engine.log").read_text().splitlines()
    messages = [json.loads(line)["message"].partition(":")[0] for line in lines]
    assert messages.count("event source unavailable") == 1  # one outage, one line
    assert messages.count("event source reachable again") == 1
