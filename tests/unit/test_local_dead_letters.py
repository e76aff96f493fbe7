"""Dead letters of local:// queues: peek changes nothing, redrive moves each message once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from poller.events import invocation_record
from poller.mappings import parse_event_source
from poller.sources.base import SourceError
from poller.sources.dead_letters import on_failure_details
from poller.sources.local.dead_letters import LocalDeadLetters
from poller.sources.local.queue import LocalQueue
from poller.sources.local.sql import last_seq, redrive
from poller.state.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    yield store
    await store.close()


async def _dead_lettered(store: SqliteStore, name: str, bodies: list[str], **send: str) -> None:
    """Put ``bodies`` on ``name``, receive each twice and dead-letter them as the engine does."""
    queue = LocalQueue(store, name, visibility_timeout_s=0)
    await queue.send(bodies, **send)  # type: ignore[arg-type]
    await queue.receive(len(bodies), 0)
    again = await queue.receive(len(bodies), 0)
    await queue.dead_letter(again, "maxReceiveCount 2 exceeded")


async def test_peek_shows_reason_and_receive_count_and_takes_nothing(store: SqliteStore) -> None:
    await _dead_lettered(store, "orders", ["a", "b"], attributes={"trace": "t-1"})  # type: ignore[arg-type]
    dlq = LocalDeadLetters(store, "orders-dlq")
    await dlq.start()
    first = await dlq.peek(10)
    assert [(d.body, d.reason, d.receive_count, d.source) for d in first] == [
        ("a", "maxReceiveCount 2 exceeded", 2, "orders"),
        ("b", "maxReceiveCount 2 exceeded", 2, "orders"),
    ]
    assert first[0].attributes == {"trace": "t-1"}
    assert await dlq.peek(10) == first
    assert [d.body for d in await dlq.peek(1)] == ["a"]
    # Nothing was received: a consumer of the dead-letter queue gets the first receive.
    assert [m.receive_count for m in await LocalQueue(store, "orders-dlq").receive(10, 0)] == [
        1,
        1,
    ]


async def test_an_on_failure_record_gives_its_condition_and_invoke_count(
    store: SqliteStore,
) -> None:
    record = invocation_record(
        request_id="r",
        function_arn="arn:aws:lambda:us-east-1:000000000000:function:f",
        condition="RetryAttemptsExhausted",
        invoke_count=3,
        function_error="Unhandled",
        invoked=True,
        batch_info_key="KinesisBatchInfo",
        batch_info={},
        timestamp="2024-01-01T00:00:00.000Z",
    )
    body = json.dumps(record)
    assert on_failure_details(body) == ("RetryAttemptsExhausted", 3)
    assert on_failure_details("not json {") == (None, None)
    await LocalQueue(store, "failures").send([body])
    letter = (await LocalDeadLetters(store, "failures").peek(1))[0]
    assert (letter.reason, letter.receive_count, letter.source) == (
        "RetryAttemptsExhausted",
        3,
        None,
    )


async def test_redrive_moves_each_message_back_as_it_was_sent(store: SqliteStore) -> None:
    await _dead_lettered(store, "orders", ["a", "b", "c"], attributes={"trace": "t-1"})  # type: ignore[arg-type]
    dlq = LocalDeadLetters(store, "orders-dlq")
    assert await dlq.redrive(parse_event_source("local://orders"), 2) == 2
    assert [d.body for d in await dlq.peek(10)] == ["c"]
    source = LocalQueue(store, "orders")
    back = await source.receive(10, 0)
    assert [m.body for m in back] == ["a", "b"]
    assert [m.receive_count for m in back] == [1, 1]
    assert back[0].record["messageAttributes"] == {
        "trace": {
            "stringValue": "t-1",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        }
    }
    assert await dlq.redrive(parse_event_source("local://orders"), None) == 1
    assert await dlq.peek(10) == []


async def test_a_fifo_source_gets_its_groups_back(store: SqliteStore) -> None:
    await _dead_lettered(store, "jobs.fifo", ["x"], group="g-7")
    dlq = LocalDeadLetters(store, "jobs.fifo-dlq")
    assert await dlq.redrive(parse_event_source("local://jobs.fifo"), None) == 1
    assert [m.group for m in await LocalQueue(store, "jobs.fifo").receive(1, 0)] == ["g-7"]


async def test_messages_dead_lettered_during_a_redrive_wait_for_the_next(
    store: SqliteStore,
) -> None:
    await _dead_lettered(store, "loop", ["1", "2"])
    start = await store.run(last_seq, "loop-dlq")
    await LocalQueue(store, "loop-dlq").send(["late"])  # after the redrive began
    assert await store.run(redrive, "loop-dlq", "loop", False, start, 100, 2**62) == 2
    assert [d.body for d in await LocalDeadLetters(store, "loop-dlq").peek(10)] == ["late"]


async def test_a_failed_redrive_leaves_every_message_in_one_queue(store: SqliteStore) -> None:
    await _dead_lettered(store, "orders", ["a", "b", "c"])
    await store.run(
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER fail_c BEFORE INSERT ON local_messages"
            " WHEN NEW.body = 'c' AND NEW.queue = 'orders'"
            " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    )
    dlq = LocalDeadLetters(store, "orders-dlq")
    with pytest.raises(SourceError, match="disk full"):
        await dlq.redrive(parse_event_source("local://orders"), None)
    assert [d.body for d in await dlq.peek(10)] == ["a", "b", "c"]
    assert await LocalQueue(store, "orders").peek(10) == []


async def test_redrive_refuses_what_it_cannot_move_atomically(store: SqliteStore) -> None:
    dlq = LocalDeadLetters(store, "orders-dlq")
    with pytest.raises(SourceError, match="only to another local:// queue"):
        await dlq.redrive(parse_event_source("redis-queue://127.0.0.1/orders"), None)
    with pytest.raises(SourceError, match="the dead-letter queue itself"):
        await dlq.redrive(parse_event_source("local://orders-dlq"), None)
