"""The queue engine's delivery contract, against an in-memory queue and real worker processes.

The stub is a queue with SQS's visibility semantics, not a mock of any client: the sources'
own tests run against real servers. Here we check what the engine decides.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from poller.config import FunctionConfig
from poller.engine import queue as queue_engine
from poller.engine.batching import Batch, parse_batch_item_failures
from poller.engine.filter_compiler import compile_filter_criteria
from poller.engine.queue import ConcurrencyPolicy, OutcomeCounts, QueueRunner, QueueSettings
from poller.events import encode_record, sqs_record
from poller.logs import JsonLog
from poller.metrics import MappingMetrics
from poller.runtime.pool import Runtime
from poller.sources.base import Depth, Message

HANDLERS = textwrap.dedent(
    """
    import json, os, time

    def ok(event, context):
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(json.dumps({"id": r["messageId"], "body": r["body"],
                                    "n": len(event["Records"])}) + "\\n")
        return None

    def partial(event, context):
        failures = []
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                if r["body"].startswith("bad"):
                    failures.append({"itemIdentifier": r["messageId"]})
                else:
                    f.write(json.dumps({"id": r["messageId"], "body": r["body"]}) + "\\n")
        return {"batchItemFailures": failures}

    def invalid(event, context):
        return {"batchItemFailures": [{"foo": "notvalid"}]}

    def boom(event, context):
        raise RuntimeError("always fails")

    def slow(event, context):
        time.sleep(float(os.environ.get("SLEEP", "1.5")))
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(json.dumps({"id": r["messageId"], "body": r["body"]}) + "\\n")
    """
)


class StubQueue:
    """An in-memory queue with visibility timeouts, receive counts and a dead-letter list."""

    native_redrive = False
    max_receive_batch = 10
    fifo = False

    def __init__(self, visibility_timeout_s: float = 30, max_receive_count: int | None = None):
        self.visibility_timeout_s = visibility_timeout_s
        self.max_receive_count = max_receive_count
        self.messages: dict[str, dict[str, Any]] = {}
        self.order = itertools.count()
        self.dead: list[tuple[str, str]] = []
        self.deleted: list[str] = []
        self.visibility_changes = 0
        self.receives = 0
        self.receive_counts: dict[str, int] = {}

    def put(self, body: str) -> str:
        mid = str(uuid.uuid4())
        self.messages[mid] = {
            "body": body,
            "visible_at": 0.0,
            "count": 0,
            "seq": next(self.order),
            "receipt": None,
        }
        return mid

    async def start(self) -> None:
        pass

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        self.receives += 1
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            ready = sorted(
                (m for m in self.messages.items() if m[1]["visible_at"] <= now),
                key=lambda kv: kv[1]["seq"],
            )[:max_messages]
            if ready or now >= deadline:
                break
            await asyncio.sleep(0.01)
        out = []
        for mid, m in ready:
            m["visible_at"] = now + self.visibility_timeout_s
            m["count"] += 1
            self.receive_counts[mid] = m["count"]
            m["receipt"] = str(uuid.uuid4())
            record = sqs_record(
                message_id=mid,
                receipt_handle=m["receipt"],
                body=m["body"],
                receive_count=m["count"],
                sent_ms=0,
                first_receive_ms=0,
                event_source="poller:stub",
                event_source_arn="stub://q",
                region="local",
            )
            out.append(
                Message(
                    mid, m["receipt"], m["body"], m["count"], record, len(encode_record(record))
                )
            )
        return out

    async def delete(self, messages: list[Message]) -> None:
        for msg in messages:
            m = self.messages.get(msg.id)
            if m is not None and m["receipt"] == msg.receipt:
                del self.messages[msg.id]
                self.deleted.append(msg.id)

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        self.visibility_changes += 1
        for msg in messages:
            m = self.messages.get(msg.id)
            if m is not None and m["receipt"] == msg.receipt:
                m["visible_at"] = time.monotonic() + timeout_s

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        for msg in messages:
            self.messages.pop(msg.id, None)
            self.dead.append((msg.id, reason))

    async def depth(self) -> Depth:
        now = time.monotonic()
        visible = sum(1 for m in self.messages.values() if m["visible_at"] <= now)
        return Depth(visible, len(self.messages) - visible)

    async def close(self) -> None:
        pass


@pytest.fixture
def handler_dir(tmp_path: Path) -> Path:
    (tmp_path / "qh.py").write_text(HANDLERS)
    return tmp_path


def _runtime(handler_dir: Path, handler: str, **fn: Any) -> Runtime:
    out = handler_dir / "out.jsonl"
    env = {"OUT": str(out), **fn.pop("environment", {})}
    config = FunctionConfig(
        name="f", handler=f"qh.{handler}", code_path=str(handler_dir), environment=env, **fn
    )
    return Runtime([config], memory_budget_mb=4096, log=JsonLog(open("/dev/null", "wb")))


def _settings(**overrides: Any) -> QueueSettings:
    values: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "function_name": "f",
        "batch_size": 10,
        "batching_window_s": 0.0,
        "report_batch_item_failures": False,
        "maximum_concurrency": 2,
        "max_payload_bytes": 6 * 1024 * 1024,
    }
    values.update(overrides)
    return QueueSettings(**values)


def _handled(handler_dir: Path) -> list[dict[str, Any]]:
    out = handler_dir / "out.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


async def _run_until(runner: QueueRunner, condition: Any, limit_s: float = 20) -> None:
    task = asyncio.create_task(runner.run())
    try:
        deadline = time.monotonic() + limit_s
        while not condition():
            assert time.monotonic() < deadline, "condition not reached in time"
            assert not task.done() or task.exception() is None, task.exception()
            await asyncio.sleep(0.02)
    finally:
        await runner.stop(5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class RecordingPolicy(ConcurrencyPolicy):
    """One poller; keeps what each tick saw."""

    def __init__(self) -> None:
        super().__init__(1)
        self.ticks: list[tuple[float, Depth | None]] = []
        self.batch_seconds = 0.0
        self.batches = 0

    def tick(self, now: float, depth: Depth | None, in_flight: int, counts: OutcomeCounts) -> int:
        self.ticks.append((now, depth))
        self.batch_seconds += counts.batch_seconds
        self.batches += counts.batches_completed
        return self.target


def _runner(
    settings: QueueSettings,
    source: StubQueue,
    runtime: Runtime,
    policy: ConcurrencyPolicy | None = None,
    log: JsonLog | None = None,
) -> QueueRunner:
    return QueueRunner(
        settings,
        source,
        runtime.pool("f"),
        log=log or JsonLog(open("/dev/null", "wb")),
        metrics=MappingMetrics(settings.uuid, "f"),
        policy=policy,
    )


async def test_success_deletes_every_message_once(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "ok")
    source = StubQueue()
    ids = {source.put(f"m{i}") for i in range(57)}
    runner = _runner(_settings(), source, runtime)
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    handled = _handled(handler_dir)
    assert sorted(h["id"] for h in handled) == sorted(ids)
    assert all(h["n"] <= 10 for h in handled)


async def test_batching_window_gathers_up_to_batch_size(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "ok")
    source = StubQueue()
    for i in range(30):
        source.put(f"m{i}")
    runner = _runner(
        _settings(batch_size=30, batching_window_s=1.0, maximum_concurrency=1),
        source,
        runtime,
        ConcurrencyPolicy(1),
    )
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    # 30 messages, 10 per receive call, one invoke: the window let the batch fill.
    assert {h["n"] for h in _handled(handler_dir)} == {30}


async def test_window_zero_invokes_without_waiting_to_fill(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "ok")
    source = StubQueue()
    source.put("only")
    runner = _runner(_settings(batch_size=10), source, runtime, ConcurrencyPolicy(1))
    started = time.monotonic()
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    assert time.monotonic() - started < 3
    assert [h["n"] for h in _handled(handler_dir)] == [1]


async def test_partial_batch_response_deletes_all_but_failures(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "partial")
    source = StubQueue(visibility_timeout_s=60)
    good = {source.put(f"good{i}") for i in range(8)}
    bad = {source.put(f"bad{i}") for i in range(2)}
    runner = _runner(
        _settings(report_batch_item_failures=True), source, runtime, ConcurrencyPolicy(1)
    )
    await _run_until(runner, lambda: set(source.deleted) >= good)
    await runtime.close()
    assert set(source.deleted) == good
    assert set(source.messages) == bad  # hidden until their visibility timeout ends


async def test_each_partial_failure_is_logged_once_with_its_request_id(
    handler_dir: Path,
) -> None:
    """A partial batch failure is visible at once: one line per batch with what happened to
    its records, tagged with the invoke's request id (the REPORT line alone says success)."""
    runtime = _runtime(handler_dir, "partial")
    source = StubQueue(visibility_timeout_s=60)
    good = {source.put(f"good{i}") for i in range(4)}
    source.put("bad0")
    stream = io.BytesIO()
    log = JsonLog(stream)
    runner = _runner(
        _settings(report_batch_item_failures=True, batch_size=10),
        source,
        runtime,
        ConcurrencyPolicy(1),
        log=log,
    )
    await _run_until(runner, lambda: set(source.deleted) >= good)
    await runtime.close()
    log.flush()  # "batch settled" is an info record: it may still wait in the log's buffer
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    settled = [r for r in records if r.get("message") == "batch settled"]
    assert len(settled) == 1, settled
    line = settled[0]
    assert line["level"] == "INFO" and line["requestId"]
    assert (line["records"], line["deleted"], line["failed"]) == (5, 4, 1)
    assert (line["filtered"], line["deadLettered"]) == (0, 0)


async def test_partial_response_ignored_without_report_batch_item_failures(
    handler_dir: Path,
) -> None:
    runtime = _runtime(handler_dir, "partial")
    source = StubQueue()
    ids = {source.put(f"bad{i}") for i in range(3)}
    runner = _runner(_settings(report_batch_item_failures=False), source, runtime)
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    assert set(source.deleted) == ids


async def test_invalid_partial_response_fails_whole_batch_then_dead_letters(
    handler_dir: Path,
) -> None:
    runtime = _runtime(handler_dir, "invalid")
    source = StubQueue(visibility_timeout_s=0.2, max_receive_count=2)
    ids = {source.put(f"m{i}") for i in range(3)}
    runner = _runner(_settings(report_batch_item_failures=True), source, runtime)
    await _run_until(runner, lambda: len(source.dead) == 3)
    await runtime.close()
    assert not source.deleted
    assert {mid for mid, _ in source.dead} == ids
    assert all(reason == "maxReceiveCount 2 exceeded" for _, reason in source.dead)


async def test_function_error_deletes_nothing(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "boom")
    source = StubQueue(visibility_timeout_s=30)
    source.put("x")
    runner = _runner(_settings(), source, runtime, ConcurrencyPolicy(1))
    await _run_until(runner, lambda: runner.counts.errors or runner.counts.batches_completed)
    await runtime.close()
    assert not source.deleted
    assert len(source.messages) == 1


async def test_filtered_out_messages_are_deleted_without_invoke(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "ok")
    source = StubQueue()
    wanted = source.put(json.dumps({"kind": "order"}))
    source.put(json.dumps({"kind": "noise"}))
    source.put("plain text")
    record_filter = compile_filter_criteria(
        {"Filters": [{"Pattern": json.dumps({"body": {"kind": ["order"]}})}]}
    )
    runner = _runner(_settings(filter=record_filter), source, runtime)
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    assert [h["id"] for h in _handled(handler_dir)] == [wanted]
    assert len(source.deleted) == 3


async def test_heartbeat_extends_visibility_for_slow_invokes(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "slow", timeout_s=10, environment={"SLEEP": "2.5"})
    source = StubQueue(visibility_timeout_s=1.0)
    mid = source.put("slow one")
    runner = _runner(_settings(), source, runtime, ConcurrencyPolicy(2))
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    # Without the heartbeat the message would reappear after 1 s and run twice.
    assert [h["id"] for h in _handled(handler_dir)] == [mid]
    assert source.visibility_changes >= 2


async def test_no_receive_without_a_free_function_slot(handler_dir: Path) -> None:
    runtime = _runtime(
        handler_dir, "slow", timeout_s=10, reserved_concurrency=1, environment={"SLEEP": "0.3"}
    )
    source = StubQueue()
    for i in range(3):
        source.put(f"m{i}")
    runner = _runner(_settings(batch_size=1), source, runtime, ConcurrencyPolicy(4))
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    # Four pollers, one slot: extra pollers waited instead of receiving, so nothing was
    # received twice (a throttled invoke would have left messages to be received again).
    assert sorted(source.receive_counts.values()) == [1, 1, 1]
    assert len(_handled(handler_dir)) == 3


async def test_stop_lets_in_flight_batch_finish_and_settle(handler_dir: Path) -> None:
    runtime = _runtime(handler_dir, "slow", timeout_s=10, environment={"SLEEP": "1"})
    source = StubQueue()
    mid = source.put("draining")
    runner = _runner(_settings(), source, runtime, ConcurrencyPolicy(1))
    task = asyncio.create_task(runner.run())
    while runner.in_flight == 0:  # noqa: ASYNC110 - polling engine state is the point
        await asyncio.sleep(0.01)
    await runner.stop(5)
    await asyncio.gather(task, return_exceptions=True)
    await runtime.close()
    assert source.deleted == [mid]


async def test_backlog_on_an_idle_queue_prompts_a_tick_at_once(
    handler_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tick interval far longer than the depth cadence (1 s): without the prompt, the first
    # tick to see the burst would come up to 3 s after the reading that found it.
    monkeypatch.setattr(queue_engine, "MANAGE_INTERVAL_S", 3.0)

    class Watched(StubQueue):
        def __init__(self) -> None:
            super().__init__()
            self.readings: list[tuple[float, Depth]] = []

        async def depth(self) -> Depth:
            depth = await super().depth()
            self.readings.append((time.monotonic(), depth))
            return depth

    runtime = _runtime(handler_dir, "slow", timeout_s=10, environment={"SLEEP": "0.2"})
    source = Watched()
    policy = RecordingPolicy()
    runner = _runner(_settings(batch_size=1), source, runtime, policy)
    task = asyncio.create_task(runner.run())
    try:
        while not (policy.ticks and source.readings):  # noqa: ASYNC110 - engine state
            await asyncio.sleep(0.01)
        for i in range(20):
            source.put(f"m{i}")
        while not any(d is not None and d.backlog > 0 for _, d in policy.ticks):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        await runner.stop(5)
        await asyncio.gather(task, return_exceptions=True)
        await runtime.close()
    seen_at = next(t for t, d in source.readings if d.backlog > 0)
    ticked_at = next(t for t, d in policy.ticks if d is not None and d.backlog > 0)
    assert ticked_at - seen_at < 0.2, f"first tick {ticked_at - seen_at:.3f} s after the reading"


async def test_cold_start_is_not_counted_as_batch_time(handler_dir: Path) -> None:
    (handler_dir / "slowinit.py").write_text(
        "import time\ntime.sleep(1.0)\n\ndef handler(event, context):\n    return None\n"
    )

    config = FunctionConfig(name="f", handler="slowinit.handler", code_path=str(handler_dir))
    devnull = open(os.devnull, "wb")  # noqa: SIM115, ASYNC230 - /dev/null, for the test
    runtime = Runtime([config], memory_budget_mb=4096, log=JsonLog(devnull))
    source = StubQueue()
    source.put("first, cold")
    source.put("second, warm")
    policy = RecordingPolicy()
    runner = _runner(_settings(batch_size=1), source, runtime, policy)
    await _run_until(runner, lambda: policy.batches >= 2)
    await runtime.close()
    # Two batches of a no-op handler: the 1 s import of the first is not batch time.
    assert policy.batch_seconds < 0.5, policy.batch_seconds


def test_batch_respects_count_and_bytes() -> None:
    def msg(size: int) -> Message:
        return Message("i", "r", "b", 1, {}, size)

    batch = Batch(max_records=3, max_bytes=100)
    assert batch.add(msg(40))
    assert batch.add(msg(40))
    assert not batch.add(msg(40))  # 14 + 40 + 1 + 40 + 1 + 40 > 100
    assert len(batch) == 2
    assert batch.too_big_alone(msg(90))
    small = Batch(max_records=2, max_bytes=10_000)
    assert small.add(msg(1)) and small.add(msg(1)) and small.full and not small.add(msg(1))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"null", set()),
        (b"", set()),
        (b"{}", set()),
        (b'{"batchItemFailures": []}', set()),
        (b'{"batchItemFailures": null}', set()),
        (b'{"batchItemFailures": [{"itemIdentifier": "a"}]}', {"a"}),
        (b'{"batchItemFailures": [{"itemIdentifier": "a"}, {"itemIdentifier": "b"}]}', {"a", "b"}),
        (b'{"batchItemFailures": [{"itemIdentifier": ""}]}', None),
        (b'{"batchItemFailures": [{"itemIdentifier": null}]}', None),
        (b'{"batchItemFailures": [{"foo": "notvalid"}]}', None),
        (b'{"batchItemFailures": [{"itemIdentifier": "zzz"}]}', None),
        (b'{"batchItemFailures": "a"}', None),
        (b"not json", None),
        (b'"a string"', None),
        # Wrong types, and the Kafka form on an SQS-shaped mapping: complete failure.
        (b'{"batchItemFailures": [{"itemIdentifier": 5}]}', None),
        (b'{"batchItemFailures": ["a"]}', None),
        (b'{"batchItemFailures": {"itemIdentifier": "a"}}', None),
        (b'{"batchItemFailures": [{"itemIdentifier": {"partition": "t-0", "offset": 1}}]}', None),
        (b"[]", None),
    ],
)
def test_parse_batch_item_failures(payload: bytes, expected: set[str] | None) -> None:
    assert parse_batch_item_failures(payload, {"a", "b"}) == expected


async def test_unexpected_source_exception_is_logged_and_polling_continues(
    handler_dir: Path,
) -> None:
    import io

    class Flaky(StubQueue):
        failures = 1

        async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
            if self.failures:
                self.failures -= 1
                raise KeyError("unexpected")
            return await super().receive(max_messages, wait_s)

    runtime = _runtime(handler_dir, "ok")
    source = Flaky()
    mid = source.put("after the crash")
    settings = _settings()
    logs = io.BytesIO()
    runner = QueueRunner(
        settings,
        source,
        runtime.pool("f"),
        log=JsonLog(logs),
        metrics=MappingMetrics(settings.uuid, "f"),
        policy=ConcurrencyPolicy(1),
    )
    await _run_until(runner, lambda: not source.messages)
    await runtime.close()
    assert [h["id"] for h in _handled(handler_dir)] == [mid]
    assert b"poller crashed: KeyError('unexpected')" in logs.getvalue()
