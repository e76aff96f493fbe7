"""Scaling end to end: a real `poller run` process drains a 5,000-message burst on a local://
queue, concurrency climbs to the mapping's bound and falls back to the idle minimum after.

The mapping is declared in the config file (MaximumConcurrency 10, batch size 10) and the
function's handler sleeps 50 ms, so the ideal drain is 5,000 / 10 * 0.05 s / 10 = 2.5 s. What
the test watches is what an operator would: /metrics, scraped every 50 ms by a thread.

A second, in-process test checks what the controller is fed during such a burst: queue depth
readings fresh enough for its per-tick arithmetic.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poller.config import FunctionConfig
from poller.engine.queue import (
    MANAGE_INTERVAL_S,
    QueueRunner,
    QueueSettings,
    ScaledConcurrency,
    concurrency_bound,
)
from poller.engine.scaling import ScalingController
from poller.logs import JsonLog
from poller.metrics import MappingMetrics
from poller.runtime.pool import Runtime
from poller.sources.base import Depth, Message
from poller.sources.local.queue import LocalQueue
from poller.state.sqlite import SqliteStore
from tests.daemon_helpers import DaemonProcess, cli
from tests.servers import free_port

MESSAGES = 5000
BOUND = 10  # ScalingConfig.MaximumConcurrency
BATCH = 10
SLEEP_S = 0.05
IDEAL_S = MESSAGES / BATCH * SLEEP_S / BOUND  # 2.5 s
IDLE_MINIMUM = 1  # ScalingController's default idle_minimum
SCRAPE_S = 0.05

HANDLER = textwrap.dedent(
    """
    import os, time

    def handler(event, context):
        time.sleep(float(os.environ["SLEEP_S"]))
        # One write per batch: O_APPEND keeps concurrent workers' lines whole.
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(r["body"] + "\\n" for r in event["Records"]))
    """
)


def write_config(tmp: Path, port: int) -> Path:
    (tmp / "scaling_handler.py").write_text(HANDLER)
    config = tmp / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            shutdown_grace_s = 10
            reconcile_interval_s = 0.5
            # Room for the {BOUND} environments of 128 MB the mapping may run at once.
            memory_mb = {BOUND * 128 * 2}

            [[functions]]
            name = "sleeper"
            handler = "scaling_handler.handler"
            timeout_s = 10
            environment = {{ OUT = "{tmp / "handled.txt"}", SLEEP_S = "{SLEEP_S}" }}

            [[mappings]]
            name = "burst"
            function_name = "sleeper"
            event_source_arn = "local://burst"
            batch_size = {BATCH}
            scaling_config = {{ MaximumConcurrency = {BOUND} }}
            """
        )
    )
    return config


@dataclass
class Sample:
    t: float  # time.monotonic()
    target: float  # poller_mapping_concurrency_target
    concurrent: float  # poller_concurrent_executions: invokes running now
    deleted: float  # poller_deleted_events_total
    visible: float  # poller_queue_visible_messages
    in_flight: float  # poller_queue_in_flight_messages


class Daemon(DaemonProcess):
    """`poller run` whose sleeper function's metrics can be sampled."""

    def metrics(self) -> dict[str, float]:
        """The sleeper function's series, by metric name (one mapping: labels are not needed)."""
        status, text = self.http("/metrics")
        assert status == 200, text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("function") == "sleeper":
                    values[sample.name] = sample.value
        return values

    def sample(self) -> Sample:
        m = self.metrics()
        return Sample(
            time.monotonic(),
            m.get("poller_mapping_concurrency_target", 0.0),
            m.get("poller_concurrent_executions", 0.0),
            m.get("poller_deleted_events_total", 0.0),
            m.get("poller_queue_visible_messages", 0.0),
            m.get("poller_queue_in_flight_messages", 0.0),
        )


class Scraper(threading.Thread):
    """Scrapes /metrics every SCRAPE_S into ``samples`` until stopped."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.samples: list[Sample] = []
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.target.sample())
            except (OSError, AssertionError) as exc:
                self.errors.append(exc)
            self._stop_event.wait(SCRAPE_S)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, daemon: Daemon) -> float:
    """Poll ``condition`` every 20 ms; return the time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc is None or daemon.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited while waiting for {what}:\n{daemon.logs()[-3000:]}"
            )
        if condition():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    running = Daemon(write_config(tmp_path, port), port)
    running.start()  # returns once /readyz answers 200
    try:
        yield running
    finally:
        running.stop(signal.SIGKILL)  # a no-op but for the log file when the test stopped it


def test_burst_scales_to_bound_drains_and_falls_back(tmp_path: Path, daemon: Daemon) -> None:
    # Idle first: the controller starts at 5 and steps down to the idle minimum on an empty
    # queue, so the burst below is a step from idle.
    wait_for(lambda: daemon.sample().target == IDLE_MINIMUM, 15, "the idle minimum", daemon)

    scraper = Scraper(daemon)
    scraper.start()
    try:
        bodies = [f"m-{i}" for i in range(MESSAGES)]
        (tmp_path / "bodies.txt").write_text("\n".join(bodies) + "\n")
        sent_at = time.monotonic()
        cli(
            tmp_path / "config.toml",
            "send",
            "local://burst",
            "--file",
            str(tmp_path / "bodies.txt"),
        )

        def latest() -> Sample:
            return scraper.latest() or Sample(0, 0, 0, 0, 0, 0)

        drained_at = wait_for(
            lambda: latest().deleted >= MESSAGES, 60, f"{MESSAGES} messages deleted", daemon
        )
        idle_at = wait_for(
            lambda: latest().target == IDLE_MINIMUM and latest().concurrent == 0,
            30,
            "the target to fall back to the idle minimum",
            daemon,
        )
    finally:
        scraper.stop()
    assert not scraper.errors, scraper.errors[:3]
    samples = scraper.samples
    burst = [s for s in samples if sent_at <= s.t <= drained_at]

    # Concurrency rose to the bound: the controller's target and the invokes actually
    # running both reached MaximumConcurrency, and neither ever went over it.
    assert max(s.target for s in burst) == BOUND, [s.target for s in burst]
    assert max(s.concurrent for s in burst) == BOUND, [s.concurrent for s in burst]
    assert max(s.target for s in samples) <= BOUND
    assert max(s.concurrent for s in samples) <= BOUND
    reached = next(s.t for s in burst if s.target == BOUND)

    # Every message handled exactly once (no errors, visibility timeout 30 s: no redelivery),
    # and the queue is empty.
    handled = Counter((tmp_path / "handled.txt").read_text().splitlines())
    assert set(handled) == set(bodies), f"{len(set(bodies) - set(handled))} messages lost"
    assert max(handled.values()) == 1, [b for b, c in handled.items() if c > 1][:10]
    last = samples[-1]
    assert last.deleted == MESSAGES
    assert last.visible == 0 and last.in_flight == 0
    final = daemon.metrics()
    assert final.get("poller_invoke_errors_total", 0.0) == 0
    assert final.get("poller_dead_lettered_events_total", 0.0) == 0

    # The drain took a few times the ideal, not the ~25 s one slot would need: the burst was
    # processed at (close to) the bound. The send itself (a CLI process) is inside this time.
    drain_s = drained_at - sent_at
    assert drain_s < 6 * IDEAL_S, f"drain took {drain_s:.1f} s (ideal {IDEAL_S:.1f} s)"

    # Fell back to the idle minimum within seconds once the queue was empty: the controller
    # holds its peak for down_hold_s (5 s), then steps down by 25 % per 0.25 s tick.
    assert idle_at - drained_at < 15, f"idle minimum only {idle_at - drained_at:.1f} s after drain"
    print(
        f"\nscaling e2e: bound {BOUND} reached {reached - sent_at:.2f} s after the send started; "
        f"drain {drain_s:.2f} s (ideal {IDEAL_S:.2f} s); idle minimum "
        f"{idle_at - drained_at:.2f} s after the drain; {len(samples)} scrapes"
    )

    assert daemon.stop() == 0
    assert os.path.getsize(daemon.log_path) > 0


class WatchedQueue(LocalQueue):
    """A local queue that records every depth reading and counts deletions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.readings: list[tuple[float, Depth]] = []
        self.deleted = 0

    async def depth(self) -> Depth:
        depth = await super().depth()
        self.readings.append((time.monotonic(), depth))
        return depth

    async def delete(self, messages: list[Message]) -> None:
        await super().delete(messages)
        self.deleted += len(messages)


async def test_burst_depth_readings_fresh_for_every_tick(tmp_path: Path) -> None:
    """The controller estimates arrivals per 0.25 s tick from the backlog's change plus the
    messages done. With the 1 s idle cadence of depth readings it would count the deletions of
    three ticks out of four as new arrivals, and it would see a burst on an idle queue up to a
    second late. So: the burst shows up in a reading within a tick or two, and while it drains
    the depth is read about once per tick."""
    (tmp_path / "scaling_handler.py").write_text(HANDLER)
    function = FunctionConfig(
        name="sleeper",
        handler="scaling_handler.handler",
        code_path=str(tmp_path),
        environment={"OUT": str(tmp_path / "handled.txt"), "SLEEP_S": str(SLEEP_S)},
    )
    devnull = open(os.devnull, "wb")  # noqa: SIM115, ASYNC230 - closed below
    log = JsonLog(devnull)
    runtime = Runtime([function], memory_budget_mb=BOUND * 128, log=log)
    store = SqliteStore(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    queue = WatchedQueue(store, "burst")
    pool = runtime.pool("sleeper")
    settings = QueueSettings(
        uuid=str(uuid.uuid4()),
        function_name="sleeper",
        batch_size=BATCH,
        batching_window_s=0.0,
        report_batch_item_failures=False,
        maximum_concurrency=BOUND,
        max_payload_bytes=6 * 1024 * 1024,
    )
    # Built as the daemon builds it (Supervisor._start).
    controller = ScalingController(maximum=concurrency_bound(BOUND, pool), batch_size=BATCH)
    runner = QueueRunner(
        settings,
        queue,
        pool,
        log=log,
        metrics=MappingMetrics(settings.uuid, "sleeper"),
        policy=ScaledConcurrency(controller),
    )
    await runtime.start()
    task = asyncio.get_running_loop().create_task(runner.run())

    async def until(condition: Callable[[], bool], limit_s: float, what: str) -> float:
        deadline = time.monotonic() + limit_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert not task.done(), task
            await asyncio.sleep(0.01)
        return time.monotonic()

    try:
        await until(
            lambda: runner.started and runner.target == IDLE_MINIMUM and len(queue.readings) >= 2,
            15,
            "the idle minimum",
        )
        # Idle: the regular cadence, not one reading per tick.
        idle_since = time.monotonic()
        await asyncio.sleep(1.5)
        idle_reads = sum(1 for t, _ in queue.readings if t >= idle_since)
        assert idle_reads <= 2, f"{idle_reads} depth readings in 1.5 s of idling"

        sent_at = time.monotonic()
        await queue.send([f"m-{i}" for i in range(MESSAGES)])
        drained_at = await until(lambda: queue.deleted >= MESSAGES, 60, "the drain")
        during = [(t, d) for t, d in queue.readings if sent_at <= t <= drained_at]
        first_seen = next(t for t, d in during if d.backlog > 0)
        # The idle poller's first full receive prompts a reading at once (was: up to 1 s).
        assert first_seen - sent_at < 3 * MANAGE_INTERVAL_S, first_seen - sent_at
        # About one reading per tick while busy (was: one per second).
        per_s = len(during) / (drained_at - sent_at)
        assert per_s >= 0.6 / MANAGE_INTERVAL_S, f"{per_s:.1f} depth readings/s while busy"
        assert max(runner.target, controller.target) <= BOUND
    finally:
        await runner.stop(10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runtime.close()
        await store.close()
        devnull.close()
