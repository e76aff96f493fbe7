"""Unit tests for poller.sources.local: the SQS-like queue in the SQLite state file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from poller.events import md5_hex, md5_of_message_attributes, string_attribute
from poller.sources.base import Message, SourceError
from poller.sources.local.queue import LocalQueue
from poller.state.sqlite import SqliteStore


class Clock:
    """Wall-clock stand-in: tests move time instead of sleeping through visibility timeouts."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def queue(store: SqliteStore, clock: Clock, name: str = "orders", **kwargs: object) -> LocalQueue:
    return LocalQueue(store, name, clock=clock, **kwargs)  # type: ignore[arg-type]


def bodies(messages: list[Message]) -> list[str]:
    return [m.body for m in messages]


# -- basic path ------------------------------------------------------------------------------
async def test_send_receive_delete(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    await q.start()
    assert (q.fifo, q.native_redrive, q.max_receive_batch) == (False, False, 10_000)
    assert await q.send(["a", "b", "c"]) == 3
    got = await q.receive(2, 0)
    assert bodies(got) == ["a", "b"]
    assert all(m.receive_count == 1 for m in got)
    assert len({m.id for m in got}) == 2
    rest = await q.receive(10, 0)
    assert bodies(rest) == ["c"]
    assert await q.receive(10, 0) == []  # all in flight
    await q.delete(got + rest)
    assert (await q.depth()).backlog == 0
    clock.advance(60)
    assert await q.receive(10, 0) == []  # deleted for good, not just hidden


async def test_visibility_timeout_redelivers_with_new_receipt(
    store: SqliteStore, clock: Clock
) -> None:
    q = queue(store, clock, visibility_timeout_s=30)
    await q.send(["x"])
    first = (await q.receive(1, 0))[0]
    clock.advance(29)
    assert await q.receive(1, 0) == []
    clock.advance(2)
    second = (await q.receive(1, 0))[0]
    assert second.id == first.id
    assert second.receive_count == 2
    assert second.record["attributes"]["ApproximateReceiveCount"] == "2"
    assert second.receipt != first.receipt
    # First-receive time is the first one, not this one.
    first_ts = first.record["attributes"]["ApproximateFirstReceiveTimestamp"]
    assert second.record["attributes"]["ApproximateFirstReceiveTimestamp"] == first_ts

    # The earlier holder's receipt is stale: its delete and heartbeat must not touch the message.
    await q.delete([first])
    await q.change_visibility([first], 0)
    depth = await q.depth()
    assert (depth.visible, depth.in_flight) == (0, 1)
    await q.delete([second])
    assert (await q.depth()).backlog == 0


async def test_change_visibility_extends_and_releases(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, visibility_timeout_s=10)
    await q.send(["x"])
    got = await q.receive(1, 0)
    clock.advance(8)
    await q.change_visibility(got, 10)  # counts from now: hidden until t+18
    clock.advance(9)
    assert await q.receive(1, 0) == []
    clock.advance(2)
    again = await q.receive(1, 0)
    assert bodies(again) == ["x"]
    await q.change_visibility(again, 0)  # give it back at once
    assert bodies(await q.receive(1, 0)) == ["x"]


async def test_delay(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    await q.send(["later"], delay_s=5)
    await q.send(["now"])
    assert bodies(await q.receive(10, 0)) == ["now"]
    depth = await q.depth()
    assert (depth.visible, depth.in_flight) == (0, 1)  # delayed counts in neither
    clock.advance(5)
    assert bodies(await q.receive(10, 0)) == ["later"]
    with pytest.raises(SourceError, match="out of range"):
        await q.send(["x"], delay_s=901)


async def test_depth(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, visibility_timeout_s=30)
    await q.send([str(i) for i in range(5)])
    await q.receive(2, 0)
    depth = await q.depth()
    assert (depth.visible, depth.in_flight, depth.backlog) == (3, 2, 5)
    clock.advance(31)
    depth = await q.depth()
    assert (depth.visible, depth.in_flight) == (5, 0)


async def test_queues_are_separate(store: SqliteStore, clock: Clock) -> None:
    a, b = queue(store, clock, "a"), queue(store, clock, "b")
    await a.send(["for-a"])
    assert await b.receive(10, 0) == []
    got = await a.receive(10, 0)
    await b.delete(got)  # another queue's message: ignored
    assert (await a.depth()).in_flight == 1


async def test_concurrent_receivers_never_share(store: SqliteStore, tmp_path: Path) -> None:
    await LocalQueue(store, "shared").send([str(i) for i in range(300)])
    other = SqliteStore(f"sqlite:///{tmp_path}/state.db")  # another process's connection
    try:
        q1, q2 = LocalQueue(store, "shared"), LocalQueue(other, "shared")
        seen: list[str] = []
        while True:
            r1, r2 = await asyncio.gather(q1.receive(7, 0), q2.receive(7, 0))
            if not r1 and not r2:
                break
            seen += [m.id for m in r1 + r2]
        assert len(seen) == len(set(seen)) == 300
    finally:
        await other.close()


async def test_peek_and_purge(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    await q.send(["a", "b"], attributes={"k": "v"})
    await q.receive(1, 0)
    peeked = await q.peek(10)
    assert [(p.body, p.receive_count, p.attributes) for p in peeked] == [
        ("a", 1, {"k": "v"}),
        ("b", 0, {"k": "v"}),
    ]
    assert (await q.depth()).backlog == 2  # peeking receives nothing
    assert await q.purge() == 2
    assert await q.peek(10) == []


async def test_send_limits(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    with pytest.raises(SourceError, match="larger than"):
        await q.send(["ok", "x" * (1_048_576 + 1)])
    assert await q.peek(10) == []  # all or nothing
    assert await q.send([]) == 0


# -- FIFO ------------------------------------------------------------------------------------
async def test_fifo_requires_group(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, "jobs.fifo")
    assert q.fifo
    with pytest.raises(SourceError, match=r"'jobs\.fifo' is FIFO.*group") as info:
        await q.send(["x"])
    assert not info.value.retryable


async def test_fifo_group_exclusivity_and_order(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, "jobs.fifo", visibility_timeout_s=30)
    await q.send(["a1", "a2"], group="A")
    await q.send(["b1"], group="B")
    await q.send(["a3"], group="A")
    await q.send(["b2"], group="B")

    first = await q.receive(3, 0)
    assert bodies(first) == ["a1", "a2", "b1"]
    # A and B both have messages in flight: nothing else may go out.
    assert await q.receive(10, 0) == []

    await q.delete(first[:2])  # A done; B's b1 still in flight
    assert bodies(await q.receive(10, 0)) == ["a3"]

    # b1 fails (its visibility runs out): it comes back before b2, never after.
    clock.advance(31)
    retry = await q.receive(10, 0)
    assert bodies(retry) == ["b1", "a3", "b2"]  # send order across groups
    assert [m.receive_count for m in retry] == [2, 2, 1]


async def test_fifo_partial_release_keeps_group_blocked(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, "jobs.fifo")
    await q.send(["1", "2", "3"], group="G")
    batch = await q.receive(10, 0)
    # The engine gives back "1" but still holds "2" and "3": the group stays blocked.
    await q.change_visibility(batch[:1], 0)
    assert await q.receive(10, 0) == []
    await q.change_visibility(batch[1:], 0)
    assert bodies(await q.receive(10, 0)) == ["1", "2", "3"]


async def test_fifo_delayed_head_blocks_its_group_only(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, "jobs.fifo")
    await q.send(["g1"], group="G", delay_s=10)
    await q.send(["g2"], group="G")
    await q.send(["h1"], group="H")
    assert bodies(await q.receive(10, 0)) == ["h1"]
    clock.advance(10)
    assert bodies(await q.receive(10, 0)) == ["g1", "g2"]


# -- dead letters ----------------------------------------------------------------------------
async def test_dead_letter_moves_atomically(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, visibility_timeout_s=1, dead_letter="local://orders-dead")
    await q.send(["poison", "fine"], attributes={"trace": "t-1"})
    got = await q.receive(2, 0)
    clock.advance(2)
    again = await q.receive(2, 0)
    poison = [m for m in again if m.body == "poison"]
    assert poison[0].receive_count == 2

    await q.dead_letter(poison, "MaxReceiveCountExceeded")
    await q.dead_letter(got[:1], "stale")  # stale receipt: not moved a second time
    await q.delete([m for m in again if m.body == "fine"])
    assert (await q.depth()).backlog == 0

    dlq = queue(store, clock, "orders-dead")
    peeked = await dlq.peek(10)
    assert len(peeked) == 1
    assert (peeked[0].id, peeked[0].body, peeked[0].receive_count) == (
        poison[0].id,
        "poison",
        0,
    )
    assert peeked[0].attributes == {
        "trace": "t-1",
        "DeadLetterReason": "MaxReceiveCountExceeded",
        "DeadLetterSourceQueue": "orders",
        "DeadLetterReceiveCount": "2",
    }
    # The original SentTimestamp survives the move.
    moved = (await dlq.receive(1, 0))[0]
    assert (
        moved.record["attributes"]["SentTimestamp"]
        == poison[0].record["attributes"]["SentTimestamp"]
    )
    assert moved.record["messageAttributes"]["DeadLetterReason"]["stringValue"] == (
        "MaxReceiveCountExceeded"
    )
    assert moved.receive_count == 1


async def test_dead_letter_default_target(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    assert q.dead_letter_queue == "orders-dlq"
    await q.send(["x"])
    await q.dead_letter(await q.receive(1, 0), "boom")
    assert [p.body for p in await queue(store, clock, "orders-dlq").peek(5)] == ["x"]


async def test_dead_letter_is_one_transaction(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    await q.send(["a", "b"])
    got = await q.receive(2, 0)

    # Make the second insert fail mid-call: the first move must roll back with it.
    await store.run(
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER fail_b BEFORE INSERT ON local_messages"
            " WHEN NEW.body = 'b' AND NEW.queue = 'orders-dlq'"
            " BEGIN SELECT RAISE(ABORT, 'injected'); END"
        )
    )
    with pytest.raises(SourceError, match="injected"):
        await q.dead_letter(got, "boom")
    assert await queue(store, clock, "orders-dlq").peek(5) == []
    assert (await q.depth()).in_flight == 2
    await store.run(lambda conn: conn.execute("DROP TRIGGER temp.fail_b"))
    await q.dead_letter(got, "boom")
    assert len(await queue(store, clock, "orders-dlq").peek(5)) == 2
    assert (await q.depth()).backlog == 0


# -- long polling ----------------------------------------------------------------------------
async def test_long_poll_wakes_on_send(store: SqliteStore) -> None:
    q = LocalQueue(store, "lp")
    waiting = asyncio.create_task(q.receive(10, 5))
    await asyncio.sleep(0.3)  # long enough for the poll interval to reach its maximum
    assert not waiting.done()
    sent = time.monotonic()
    await LocalQueue(store, "lp").send(["hello"])
    got = await asyncio.wait_for(waiting, 2)
    assert bodies(got) == ["hello"]
    # Woken by the send, not by the next table check (up to 200 ms away).
    assert time.monotonic() - sent < 0.1


async def test_long_poll_sees_other_process(store: SqliteStore, tmp_path: Path) -> None:
    other = SqliteStore(f"sqlite:///{tmp_path}/state.db")
    try:
        # A store on another file key would not share in-process wake-ups; polling finds it.
        other.key = "elsewhere"
        waiting = asyncio.create_task(LocalQueue(store, "lp").receive(10, 5))
        await asyncio.sleep(0.1)
        await LocalQueue(other, "lp").send(["from afar"])
        assert bodies(await asyncio.wait_for(waiting, 2)) == ["from afar"]
    finally:
        await other.close()


async def test_long_poll_times_out_when_empty(store: SqliteStore) -> None:
    q = LocalQueue(store, "empty")
    start = time.monotonic()
    assert await q.receive(10, 0.3) == []
    assert 0.28 <= time.monotonic() - start < 1.0
    start = time.monotonic()
    assert await q.receive(10, 0) == []
    assert time.monotonic() - start < 0.1


# -- record shape (ESM_SEMANTICS.md §7.1) ----------------------------------------------------
async def test_record_shape(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, region="eu-west-1")
    await q.send(["Test message."])
    sent_ms = int(clock.now * 1000)
    clock.advance(0.002)
    message = (await q.receive(1, 0))[0]
    record = message.record
    assert list(record) == [
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    ]
    assert record["messageId"] == message.id
    assert record["receiptHandle"] == message.receipt
    assert record["body"] == "Test message."
    assert record["attributes"] == {
        "ApproximateReceiveCount": "1",
        "SentTimestamp": str(sent_ms),
        "SenderId": "AIDAPOLLERLOCAL",
        "ApproximateFirstReceiveTimestamp": str(sent_ms + 2),
    }
    assert record["messageAttributes"] == {}
    assert record["md5OfBody"] == "e4e68fb7bd0e697a0ae8f1bb342846b3"  # the §7.1 example's
    assert record["md5OfBody"] == md5_hex("Test message.")
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == "local://orders"
    assert record["awsRegion"] == "eu-west-1"
    assert message.encoded == msgspec.json.encode(record)
    assert message.size == len(message.encoded)
    assert message.group is None


async def test_record_message_attributes(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock)
    await q.send(["x"], attributes={"a": "1", "Zeta": "héllo"})
    record = (await q.receive(1, 0))[0].record
    assert record["messageAttributes"] == {
        "a": {
            "stringValue": "1",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "Zeta": {
            "stringValue": "héllo",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
    }
    # Value computed by moto's SQS (the same algorithm as SQS's MD5OfMessageAttributes).
    assert record["md5OfMessageAttributes"] == "3434443020da9364c68e974e0868a43c"
    assert md5_of_message_attributes(
        {"Zeta": string_attribute("héllo"), "a": string_attribute("1")}
    ) == ("3434443020da9364c68e974e0868a43c")


async def test_record_fifo_attributes(store: SqliteStore, clock: Clock) -> None:
    q = queue(store, clock, "jobs.fifo")
    await q.send(["one", "two"], group="G")
    first, second = await q.receive(2, 0)
    assert first.group == "G"
    attrs = first.record["attributes"]
    assert attrs["MessageGroupId"] == "G"
    assert attrs["MessageDeduplicationId"] == first.id
    assert attrs["SequenceNumber"].isdigit()
    assert attrs["SequenceNumber"] < second.record["attributes"]["SequenceNumber"]
    assert first.record["eventSourceARN"] == "local://jobs.fifo"


# -- throughput (printed, not asserted) ------------------------------------------------------
async def test_throughput(store: SqliteStore, capsys: pytest.CaptureFixture[str]) -> None:
    q = LocalQueue(store, "bench")
    count = 20_000
    start = time.perf_counter()
    await q.send([f'{{"n": {i}}}' for i in range(count)])
    sent = time.perf_counter()
    done = 0
    while batch := await q.receive(100, 0):
        await q.delete(batch)
        done += len(batch)
    drained = time.perf_counter()
    assert done == count
    with capsys.disabled():
        print(
            f"\nlocal queue: send {count / (sent - start):,.0f} msg/s, "
            f"receive+delete (batches of 100) {count / (drained - sent):,.0f} msg/s"
        )
