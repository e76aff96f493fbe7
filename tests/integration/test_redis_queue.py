"""RedisQueue (redis-queue://) against real redis-servers: no mocks, the same commands as in
production. Visibility timeouts are 1 s so redelivery tests stay quick."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from poller.config import Config, RedisConfig
from poller.events import sqs_record
from poller.logs import JsonLog
from poller.mappings import parse_event_source
from poller.sources import redis_queue
from poller.sources.base import Message, SourceContext, SourceError
from poller.sources.redis_queue.queue import RedisQueue
from poller.sources.redis_queue.records import BODY_ENCODING_ATTRIBUTE
from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import RedisServer, TlsRedisServer, free_port

KEY = "orders"


def _uri(server: RedisServer, query: str = "", key: str = KEY, auth: str = "") -> str:
    return f"redis-queue://{auth}{server.host}:{server.port}/0/{key}" + (
        f"?{query}" if query else ""
    )


def _queue(
    uri: str,
    *,
    group: str | None = "mapping-uuid",
    config: Config | None = None,
    log: JsonLog | None = None,
) -> RedisQueue:
    """The queue a mapping with UUID ``group`` reads (group None: a sender's)."""
    context = SourceContext(
        config=config or Config(),
        store=None,  # type: ignore[arg-type]
        log=log or JsonLog(),
        mapping_uuid=group,
    )
    return redis_queue.open_queue(parse_event_source(uri), context)  # type: ignore[arg-type]


@asynccontextmanager
async def _started(uri: str, **kwargs: Any) -> AsyncIterator[RedisQueue]:
    queue = _queue(uri, **kwargs)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


@asynccontextmanager
async def _admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=server.host, port=server.port, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def _receive_all(queue: RedisQueue, n: int, within: float = 5.0) -> list[Message]:
    """Receive until n messages arrived or ``within`` seconds passed."""
    got: list[Message] = []
    deadline = time.monotonic() + within
    while len(got) < n and time.monotonic() < deadline:
        got += await queue.receive(n - len(got), min(0.5, deadline - time.monotonic()))
    return got


async def _pending(admin: aioredis.Redis, group: str = "mapping-uuid") -> int:
    return int((await admin.xpending(KEY, group))["pending"])


# -- the basics ----------------------------------------------------------------------------


async def test_ack_on_success(redis_server: RedisServer, redis_url: str) -> None:
    async with (
        _started(_uri(redis_server, "visibility_timeout=1")) as queue,
        _admin(redis_server) as admin,
    ):
        assert await queue.send(["a", "b", "c"]) == 3
        messages = await _receive_all(queue, 3)
        assert [m.body for m in messages] == ["a", "b", "c"]
        assert all(m.receive_count == 1 for m in messages)
        assert await _pending(admin) == 3
        await queue.delete(messages)
        assert await _pending(admin) == 0
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (0, 0)
        # Nothing comes back, even after the visibility timeout.
        await asyncio.sleep(1.1)
        assert await queue.receive(10, 0.3) == []
        # Without delete_on_ack the entries stay in the stream (acked).
        assert await admin.xlen(KEY) == 3


async def test_delete_on_ack_removes_entries(redis_server: RedisServer, redis_url: str) -> None:
    async with (
        _started(_uri(redis_server, "delete_on_ack=true")) as queue,
        _admin(redis_server) as admin,
    ):
        await queue.send(["a", "b"])
        await queue.delete(await _receive_all(queue, 2))
        assert await admin.xlen(KEY) == 0
        assert await _pending(admin) == 0


async def test_partial_failure_redelivers_only_the_rest(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=1")) as queue:
        await queue.send([f"m{i}" for i in range(4)])
        first = await _receive_all(queue, 4)
        done, failed = first[:2], first[2:]
        await queue.delete(done)
        # Not before the visibility timeout...
        assert await queue.receive(10, 0.5) == []
        again = await _receive_all(queue, 2, within=3)
        assert sorted(m.id for m in again) == sorted(m.id for m in failed)
        assert all(m.receive_count == 2 for m in again)
        assert all(m.record["attributes"]["ApproximateReceiveCount"] == "2" for m in again)
        await queue.delete(again)
        await asyncio.sleep(1.1)
        assert await queue.receive(10, 0.3) == []


async def test_redelivery_counts_every_receive(redis_server: RedisServer, redis_url: str) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=1")) as queue:
        await queue.send(["poison"])
        counts = []
        started = time.monotonic()
        for _ in range(3):
            [message] = await _receive_all(queue, 1, within=3)
            counts.append(message.receive_count)
            # Redelivered entries keep their id and send time.
            assert message.body == "poison"
        assert counts == [1, 2, 3]
        # Two redeliveries, each after ~1 s (+ at most a quarter of it for the scan).
        assert 1.9 < time.monotonic() - started < 4.5


async def test_send_via_factory_and_record_shape(redis_server: RedisServer, redis_url: str) -> None:
    uri = _uri(redis_server, "visibility_timeout=1", auth="")
    sender = _queue(uri, group=None)
    assert isinstance(sender, RedisQueue)
    async with _started(uri) as queue:
        # start=$ by default: only what is sent after the group exists.
        before = time.time() * 1000
        assert await sender.send(["hello"], attributes={"trace": "t-1"}) == 1
        await sender.close()
        [message] = await _receive_all(queue, 1)
        after = time.time() * 1000
    record = message.record
    reference = sqs_record(
        message_id="x",
        receipt_handle="x",
        body="x",
        receive_count=1,
        sent_ms=1,
        first_receive_ms=1,
        event_source="x",
        event_source_arn="x",
        region="x",
    )
    # Same keys as every other queue source's records (events.sqs_record), plus the MD5 of
    # the attributes SQS adds when there are some.
    assert set(record) == set(reference) | {"md5OfMessageAttributes"}
    assert set(record["attributes"]) == set(reference["attributes"])
    assert record["messageId"] == message.id == message.receipt == record["receiptHandle"]
    assert record["body"] == "hello"
    assert record["md5OfBody"] == hashlib.md5(b"hello").hexdigest()
    # Lambda's value for SQS-shaped records, whatever queue is behind them.
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == uri
    assert record["awsRegion"] == "local"
    assert record["messageAttributes"] == {
        "trace": {
            "stringValue": "t-1",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        }
    }
    attributes = record["attributes"]
    assert attributes["ApproximateReceiveCount"] == "1"
    # SentTimestamp is the entry id's millisecond part.
    assert attributes["SentTimestamp"] == message.id.split("-")[0]
    assert before - 1 <= int(attributes["SentTimestamp"]) <= after + 1
    assert int(attributes["SentTimestamp"]) <= int(attributes["ApproximateFirstReceiveTimestamp"])
    assert all(isinstance(v, str) for v in attributes.values())
    assert message.encoded == msgspec.json.encode(record)
    assert message.size == len(message.encoded)


async def test_plain_entries_encode_exactly_as_the_reference_record(
    redis_server: RedisServer, redis_url: str
) -> None:
    # The usual entry (a lone UTF-8 body) is encoded straight from a template: it must be the
    # same bytes as the dict every other source builds, whatever the body holds.
    uri = _uri(redis_server, "visibility_timeout=5", auth="")
    bodies = ["plain", 'quote " and \\ back', "ünïcode ☃ 🎉", "ctrl \x01\n\t\x7f", "%s %b %%", ""]
    async with _started(uri) as queue:
        sender = _queue(uri, group=None)
        assert await sender.send(bodies) == len(bodies)
        await sender.close()
        messages = await _receive_all(queue, len(bodies))
    assert [m.body for m in messages] == bodies
    for message in messages:
        attributes = json.loads(message.encoded)["attributes"]
        first_receive = attributes["ApproximateFirstReceiveTimestamp"]
        reference = sqs_record(
            message_id=message.id,
            receipt_handle=message.id,
            body=message.body,
            receive_count=1,
            sent_ms=int(message.id.split("-")[0]),
            first_receive_ms=int(first_receive),
            event_source="aws:sqs",
            event_source_arn=uri,
            region="local",
        )
        assert message.encoded == msgspec.json.encode(reference), message.body
        assert message.size == len(message.encoded)
        assert message.record == reference


async def test_send_refuses_delay_and_body_attribute(
    redis_server: RedisServer, redis_url: str
) -> None:
    queue = _queue(_uri(redis_server))
    try:
        with pytest.raises(SourceError, match="delay") as caught:
            await queue.send(["x"], delay_s=5)
        assert caught.value.retryable is False
        with pytest.raises(SourceError, match="body"):
            await queue.send(["x"], attributes={"body": "y"})
    finally:
        await queue.close()


async def test_eventsource_arn_has_no_password(redis_server: RedisServer, redis_url: str) -> None:
    async with _admin(redis_server) as admin:
        await admin.execute_command(
            "ACL", "SETUSER", "arnuser", "on", ">pw-123", "~*", "&*", "+@all"
        )
        try:
            uri = _uri(redis_server, auth="arnuser:pw-123@")
            async with _started(uri) as queue:
                await queue.send(["x"])
                [message] = await _receive_all(queue, 1)
            assert "pw-123" not in json.dumps(message.record)
            assert message.record["eventSourceARN"] == _uri(redis_server)
        finally:
            await admin.execute_command("ACL", "DELUSER", "arnuser")


# -- group and start -----------------------------------------------------------------------


async def test_group_defaults_to_the_mapping_and_explicit_group_wins(
    redis_server: RedisServer, redis_url: str
) -> None:
    assert _queue(_uri(redis_server), group="uuid-1").group == "uuid-1"
    assert _queue(_uri(redis_server, "group=mine"), group="uuid-1").group == "mine"
    assert _queue(_uri(redis_server), group=None).group == "poller"


async def test_start_defaults_to_new_entries_only(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _admin(redis_server) as admin:
        await admin.xadd(KEY, {"body": "old"})
        async with _started(_uri(redis_server), group="latest") as latest:
            assert await latest.receive(10, 0.2) == []
            await admin.xadd(KEY, {"body": "new"})
            assert [m.body for m in await _receive_all(latest, 1)] == ["new"]
        async with _started(_uri(redis_server, "start=0"), group="horizon") as horizon:
            assert [m.body for m in await _receive_all(horizon, 2)] == ["old", "new"]


# -- dead letters and visibility -------------------------------------------------------------


async def test_dead_letter_moves_entry_with_reason_and_acks(
    redis_server: RedisServer, redis_url: str
) -> None:
    uri = _uri(redis_server, "visibility_timeout=1&max_receive_count=2&dead_letter=orders-dlq")
    async with _started(uri) as queue, _admin(redis_server) as admin:
        assert queue.max_receive_count == 2 and queue.native_redrive is False
        await admin.xadd(KEY, {"body": b"\xff\xfe raw", "tenant": "t1"})
        await queue.send(["keep"])
        messages = await _receive_all(queue, 2)
        poison = next(m for m in messages if m.body != "keep")
        await queue.dead_letter([poison], "maxReceiveCount 2 exceeded")
        # Moved: in the dead-letter stream with every original field (bytes intact) + reason.
        [(_dlq_id, fields)] = await admin.xrange("orders-dlq")
        assert fields[b"body"] == b"\xff\xfe raw"
        assert fields[b"tenant"] == b"t1"
        assert fields[b"DeadLetterReason"] == b"maxReceiveCount 2 exceeded"
        assert fields[b"DeadLetterSourceQueue"] == KEY.encode()
        assert fields[b"DeadLetterSourceId"] == poison.id.encode()
        assert fields[b"DeadLetterReceiveCount"] == b"1"
        # ...and acked: only the other entry is still pending.
        pending = await admin.xpending_range(KEY, "mapping-uuid", "-", "+", 10)
        assert [p["message_id"].decode() for p in pending] == [
            m.id for m in messages if m is not poison
        ]
        # A second attempt (say the engine retried after a lost reply) moves nothing twice.
        await queue.dead_letter([poison], "again")
        assert await admin.xlen("orders-dlq") == 1
        # The poison never comes back; the other one does.
        await asyncio.sleep(1.1)
        assert [m.body for m in await _receive_all(queue, 1, within=2)] == ["keep"]


async def test_dead_letter_default_stream_and_delete_on_ack(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with (
        _started(_uri(redis_server, "delete_on_ack=true")) as queue,
        _admin(redis_server) as admin,
    ):
        await queue.send(["too big"])
        messages = await _receive_all(queue, 1)
        await queue.dead_letter(messages, "record larger than the event limit")
        assert await admin.xlen(f"{KEY}:dlq") == 1
        assert await admin.xlen(KEY) == 0  # XDEL'd as well


async def test_heartbeat_keeps_entry_from_other_consumers(
    redis_server: RedisServer, redis_url: str
) -> None:
    uri = _uri(redis_server, "visibility_timeout=1")
    async with _started(uri) as owner, _started(uri) as other:
        assert owner.consumer != other.consumer
        await owner.send(["long job"])
        [message] = await _receive_all(owner, 1)

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(0.4)
                await owner.change_visibility([message], owner.visibility_timeout_s)

        beating = asyncio.create_task(heartbeat())
        try:
            # 2.5 visibility timeouts: without the heartbeat `other` would claim it.
            stolen = await other.receive(10, 2.5)
        finally:
            beating.cancel()
        assert stolen == []
        # Heartbeat stopped: the entry is redelivered (to whoever asks) with count 2.
        [again] = await _receive_all(other, 1, within=3)
        assert (again.id, again.receive_count) == (message.id, 2)
        # The old owner's heartbeat no longer touches it (it is the other consumer's now).
        await owner.change_visibility([message], 1)
        async with _admin(redis_server) as admin:
            [pending] = await admin.xpending_range(KEY, "mapping-uuid", "-", "+", 10)
        assert pending["consumer"].decode() == other.consumer


async def test_change_visibility_zero_releases_at_once(
    redis_server: RedisServer, redis_url: str
) -> None:
    uri = _uri(redis_server, "visibility_timeout=30")
    async with _started(uri) as first, _started(uri) as second:
        await first.send(["carry"])
        [message] = await _receive_all(first, 1)
        await first.change_visibility([message], 0)
        started = time.monotonic()
        [again] = await _receive_all(second, 1, within=3)
        assert again.id == message.id and again.receive_count == 2
        assert time.monotonic() - started < 1.0  # not 30 s


# -- concurrency -----------------------------------------------------------------------------


async def test_two_sources_sharing_a_group_handle_each_entry_once(
    redis_server: RedisServer, redis_url: str
) -> None:
    uri = _uri(redis_server, "visibility_timeout=30")
    total = 300
    async with _started(uri) as one, _started(uri) as two:
        seen: list[tuple[str, str]] = []

        async def consume(queue: RedisQueue, name: str) -> None:
            while len(seen) < total:
                messages = await queue.receive(7, 0.2)
                seen.extend((name, m.id) for m in messages)
                await queue.delete(messages)

        await one.send([f"m{i}" for i in range(total)])
        await asyncio.wait_for(
            asyncio.gather(*(consume(q, n) for q, n in [(one, "1"), (two, "2")] * 3)), 10
        )
    ids = [entry for _, entry in seen]
    assert len(ids) == total and len(set(ids)) == total
    assert {name for name, _ in seen} == {"1", "2"}  # both took part


async def test_concurrent_receives_share_a_read_and_get_exactly_theirs(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server)) as queue, _admin(redis_server) as admin:
        # Ten callers wait together; entries arrive afterwards.
        waiting = [asyncio.create_task(queue.receive(1, 3)) for _ in range(10)]
        await asyncio.sleep(0.1)
        await queue.send([f"m{i}" for i in range(25)])
        results = await asyncio.gather(*waiting)
        assert all(len(r) == 1 for r in results)
        ids = {r[0].id for r in results}
        assert len(ids) == 10
        # Nothing was read beyond what the callers returned: the rest is still undelivered.
        assert await _pending(admin) == 10
        assert (await queue.depth()).visible == 15
        # A big and a small caller in the same tick: each gets at most its own limit.
        big, small = await asyncio.gather(queue.receive(10, 1), queue.receive(2, 1))
        assert (len(big), len(small)) == (10, 2)
        assert await _pending(admin) == 22


async def test_concurrent_deletes_are_merged_and_all_acked(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await queue.send([f"m{i}" for i in range(50)])
        messages = await _receive_all(queue, 50)
        await asyncio.gather(*(queue.delete([m]) for m in messages))
        assert await _pending(admin) == 0


async def test_large_settles_go_out_in_chunks(redis_server: RedisServer, redis_url: str) -> None:
    uri = _uri(redis_server, "delete_on_ack=true&visibility_timeout=30")
    async with _started(uri) as queue, _admin(redis_server) as admin:
        await queue.send([f"m{i}" for i in range(2500)])
        messages = await _receive_all(queue, 2500)
        assert len(messages) == 2500
        await queue.change_visibility(messages, 30)  # > one script call's worth of IDs
        await queue.delete(messages[:2400])
        assert await _pending(admin) == 100
        assert await admin.xlen(KEY) == 100
        await queue.dead_letter(messages[2400:], "test")
        assert await _pending(admin) == 0
        assert (await admin.xlen(KEY), await admin.xlen(f"{KEY}:dlq")) == (0, 100)


async def test_cancelled_receive_releases_what_it_was_given(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=30")) as queue:
        waiter = asyncio.create_task(queue.receive(5, 2))
        other = asyncio.create_task(queue.receive(5, 2))
        await asyncio.sleep(0.1)
        other.cancel()  # a poller stopped while waiting
        await queue.send(["a", "b", "c", "d", "e", "f"])
        got = await waiter
        assert 1 <= len(got) <= 5
        # Whatever was read for the cancelled caller is available again promptly, not after
        # 30 s; the rest was never delivered.
        rest = await _receive_all(queue, 6 - len(got), within=3)
        assert sorted(m.body for m in got + rest) == ["a", "b", "c", "d", "e", "f"]


async def test_cancelling_the_reading_caller_leaves_the_others_waiting(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=30")) as queue:
        # Started in one tick: the first runs the shared XREADGROUP for all three.
        leader, *others = [asyncio.create_task(queue.receive(5, 3)) for _ in range(3)]
        await asyncio.sleep(0.1)
        leader.cancel()
        await asyncio.sleep(0.05)
        await queue.send([f"m{i}" for i in range(4)])
        got = [m for batch in await asyncio.gather(*others) for m in batch]
        assert got  # the others kept waiting and were served
        rest = await _receive_all(queue, 4 - len(got), within=2)
        assert sorted(m.body for m in got + rest) == ["m0", "m1", "m2", "m3"]
        assert leader.cancelled()


# -- malformed entries -----------------------------------------------------------------------


async def test_malformed_entries_are_delivered_encoded(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server)) as queue, _admin(redis_server) as admin:
        binary = b"\x00\xff\xfebinary"
        await admin.xadd(KEY, {"body": binary})
        await admin.xadd(KEY, {"event": "created", "id": "42"})
        await admin.xadd(KEY, {"body": "fine", "blob": b"\xff"})
        messages = await _receive_all(queue, 3)
    raw, fields, mixed = messages

    assert base64.b64decode(raw.body) == binary
    encoding = raw.record["messageAttributes"][BODY_ENCODING_ATTRIBUTE]
    assert encoding["stringValue"] == "base64"
    assert raw.record["md5OfBody"] == hashlib.md5(raw.body.encode()).hexdigest()

    assert json.loads(fields.body) == {"event": "created", "id": "42"}
    attributes = fields.record["messageAttributes"]
    assert attributes[BODY_ENCODING_ATTRIBUTE]["stringValue"] == "fields-json"
    assert attributes["event"]["stringValue"] == "created"

    assert mixed.body == "fine"
    assert BODY_ENCODING_ATTRIBUTE not in mixed.record["messageAttributes"]
    blob = mixed.record["messageAttributes"]["blob"]
    assert blob["dataType"] == "Binary" and base64.b64decode(blob["binaryValue"]) == b"\xff"
    assert "md5OfMessageAttributes" in mixed.record
    for message in messages:
        json.dumps(message.record)  # every record is plain JSON


# -- depth -----------------------------------------------------------------------------------


async def test_depth_is_lag_plus_pending(redis_server: RedisServer, redis_url: str) -> None:
    async with _started(_uri(redis_server)) as queue:
        await queue.send([f"m{i}" for i in range(10)])
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (10, 0)
        messages = await _receive_all(queue, 4)
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (6, 4)
        await queue.delete(messages[:3])
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight, depth.backlog) == (6, 1, 7)


async def test_depth_counts_entries_when_deletions_make_the_lag_unknown(
    redis_server: RedisServer, redis_url: str
) -> None:
    # Redis 7 reports no lag once an entry past the group's position is deleted; Redis 6 never
    # reports one. Either way depth counts what follows the last delivered ID.
    async with _started(_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await queue.send([f"m{i}" for i in range(10)])
        await _receive_all(queue, 4)
        entries = await admin.xrange(KEY)
        await admin.xdel(KEY, entries[6][0])
        [group] = await admin.xinfo_groups(KEY)
        assert group["lag"] is None
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (5, 4)

        # Past 1,000 entries the count stops and the stream length stands in for it.
        await queue.send([f"n{i}" for i in range(1200)])
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (9 + 1200 - 4, 4)  # XLEN - pending


# -- credentials -----------------------------------------------------------------------------


async def test_password_from_environment_variable(
    redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(redis=RedisConfig(password_env="POLLER_TEST_REDIS_PASSWORD"))
    uri = _uri(redis_server, auth="envuser@")
    async with _admin(redis_server) as admin:
        await admin.execute_command(
            "ACL", "SETUSER", "envuser", "on", ">from-env", "~*", "&*", "+@all"
        )
        try:
            monkeypatch.delenv("POLLER_TEST_REDIS_PASSWORD", raising=False)
            missing = _queue(uri, config=config)
            with pytest.raises(SourceError, match="POLLER_TEST_REDIS_PASSWORD") as caught:
                await missing.start()
            assert caught.value.retryable is False

            monkeypatch.setenv("POLLER_TEST_REDIS_PASSWORD", "wrong")
            wrong = _queue(uri, config=config)
            with pytest.raises(SourceError, match="credentials") as caught:
                await wrong.start()
            assert caught.value.retryable is False
            assert "wrong" not in str(caught.value).lower().replace("wrongpass", "")
            await wrong.close()

            monkeypatch.setenv("POLLER_TEST_REDIS_PASSWORD", "from-env")
            async with _started(uri, config=config) as queue:
                await queue.send(["authenticated"])
                assert [m.body for m in await _receive_all(queue, 1)] == ["authenticated"]
        finally:
            await admin.execute_command("ACL", "DELUSER", "envuser")


async def test_wrong_key_type_is_not_retryable(redis_server: RedisServer, redis_url: str) -> None:
    async with _admin(redis_server) as admin:
        await admin.set(KEY, "not a stream")
    queue = _queue(_uri(redis_server))
    with pytest.raises(SourceError, match="other than a stream") as caught:
        await queue.start()
    assert caught.value.retryable is False
    await queue.close()


# -- TLS ---------------------------------------------------------------------------------------


async def test_tls_with_the_ca_file_from_the_config(tls_redis: TlsRedisServer) -> None:
    # The hand-packed XREADGROUP/XACK go out on connections of their own: they must be TLS too.
    config = Config(redis=RedisConfig(ca_file=str(tls_redis.ca_file)))
    uri = _uri(tls_redis, "tls=true&start=0&visibility_timeout=1", key="tls-jobs")
    async with _started(uri, config=config) as queue:
        await queue.send(["a", "b", "c"])
        got = await _receive_all(queue, 3)
        assert sorted(m.body for m in got) == ["a", "b", "c"]
        await queue.change_visibility(got[:1], 1)
        await queue.delete(got)
        depth = await queue.depth()
        assert (depth.visible, depth.in_flight) == (0, 0)

        tls_redis.restart()  # kept connections die unseen; new ones must be TLS as well
        await queue.send(["after"])
        assert [m.body for m in await _receive_all(queue, 1)] == ["after"]


async def test_tls_untrusted_certificate_names_the_ca_file_setting(
    tls_redis: TlsRedisServer,
) -> None:
    queue = _queue(_uri(tls_redis, "tls=true", key="tls-jobs"))
    with pytest.raises(SourceError, match=r"TLS certificate .* \[redis\] ca_file") as caught:
        await queue.start()
    assert caught.value.retryable is True  # the server's certificate may yet be replaced
    await queue.close()


async def test_tls_missing_ca_file_is_reported_before_connecting(
    tls_redis: TlsRedisServer, tmp_path: Path
) -> None:
    config = Config(redis=RedisConfig(ca_file=str(tmp_path / "nope.pem")))
    queue = _queue(_uri(tls_redis, "tls=true", key="tls-jobs"), config=config)
    with pytest.raises(SourceError, match=r"ca_file .*nope\.pem.* is not a file") as caught:
        await queue.start()
    assert caught.value.retryable is False
    await queue.close()
    # Without tls=true the CA file is not used, so it cannot be in the way.
    assert _queue(_uri(tls_redis, key="tls-jobs"), config=config)._link._login.ca_file is None


# -- outages ---------------------------------------------------------------------------------


async def test_restart_without_persistence_raises_then_recovers(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=1")) as queue:
        await queue.send(["before"])
        assert [m.body for m in await _receive_all(queue, 1)] == ["before"]

        redis_server.kill()
        for call in (
            lambda: queue.receive(10, 0.5),
            lambda: queue.send(["during"]),
            lambda: queue.depth(),
        ):
            started = time.monotonic()
            with pytest.raises(SourceError) as caught:
                await call()
            assert caught.value.retryable is True
            assert time.monotonic() - started < 3  # fails fast: the engine does the backing off

        redis_server.restart()  # empty: no persistence in the session server
        # Entries added after the restart, before we noticed: the group is re-created at 0, so
        # they are delivered, not skipped.
        async with _admin(redis_server) as admin:
            await admin.xadd(KEY, {"body": "after"})
        assert [m.body for m in await _receive_all(queue, 1)] == ["after"]
        assert (await queue.depth()).in_flight == 1


async def test_kept_connections_dead_after_a_restart_are_replaced_without_an_error(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with _started(_uri(redis_server, "visibility_timeout=1")) as queue:
        await queue.send(["before"])
        assert [m.body for m in await _receive_all(queue, 1)] == ["before"]
        assert queue._link._raw_idle  # the read's connection is kept for the next one

        redis_server.kill()
        redis_server.restart()  # nothing called in between: the kept socket is dead unseen
        async with _admin(redis_server) as admin:
            await admin.xadd(KEY, {"body": "after"})
        # No SourceError: the dead connection is dropped and the read retried on a new one.
        assert [m.body for m in await _receive_all(queue, 1)] == ["after"]


async def test_crash_loses_nothing_with_persistence(persistent_redis: RedisServer) -> None:
    uri = _uri(persistent_redis, "visibility_timeout=1")
    async with _started(uri) as queue:
        await queue.send([f"m{i}" for i in range(6)])
        in_flight = await _receive_all(queue, 3)
        await queue.delete(in_flight[:1])  # one done, two unacked when the server dies

        persistent_redis.kill()
        with pytest.raises(SourceError):
            await queue.receive(10, 0.2)
        persistent_redis.start()

        # The three never delivered come at once; the two unacked come back after their
        # visibility timeout, with the receive counted; the acked one never returns.
        got = await _receive_all(queue, 5, within=5)
        bodies = sorted(m.body for m in got)
        assert bodies == ["m1", "m2", "m3", "m4", "m5"]
        counts = {m.body: m.receive_count for m in got}
        assert counts["m1"] == counts["m2"] == 2
        assert counts["m3"] == counts["m4"] == counts["m5"] == 1
        await queue.delete(got)
        await asyncio.sleep(1.1)
        assert await queue.receive(10, 0.3) == []


# -- end to end --------------------------------------------------------------------------------

_HANDLER = """
import json, os

def handle(event, context):
    failures, lines = [], []
    for r in event["Records"]:
        if r["body"] == "poison":
            failures.append({"itemIdentifier": r["messageId"]})
        else:
            lines.append(r["body"] + "\\n")
    with open(os.environ["OUT"], "a") as f:
        f.write("".join(lines))
    return {"batchItemFailures": failures}
"""


@pytest.mark.timeout(120)
def test_daemon_end_to_end(redis_server: RedisServer, redis_url: str, tmp_path: Path) -> None:
    """`poller run` with a redis-queue mapping: every entry handled once, the poison entry
    dead-lettered after max_receive_count deliveries, `poller send` on the same URI."""
    import redis

    http_port = free_port()
    out = tmp_path / "handled.txt"
    (tmp_path / "e2e_redis_handler.py").write_text(_HANDLER)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nhttp_listen = "127.0.0.1:{http_port}"\nreconcile_interval_s = 0.5\n\n'
        '[[functions]]\nname = "handle"\nhandler = "e2e_redis_handler.handle"\n'
        f'timeout_s = 10\nenvironment = {{ OUT = "{out}" }}\n'
    )
    uri = _uri(
        redis_server, "visibility_timeout=1&max_receive_count=2&dead_letter=jobs-dlq", key="jobs"
    )
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    daemon = DaemonProcess(config, http_port)
    try:
        daemon.start()  # returns once /readyz answers 200
        created = json.loads(
            cli(
                config,
                "mappings",
                "create",
                "--function-name",
                "handle",
                "--event-source-arn",
                uri,
                "--batch-size",
                "10",
                "--function-response-types",
                "ReportBatchItemFailures",
            ).stdout
        )
        # The runner creates the group (named after the mapping) at $: wait for it.
        wait_for(
            lambda: (
                admin.exists("jobs")
                and any(g["name"].decode() == created["UUID"] for g in admin.xinfo_groups("jobs"))
            ),
            15,
            "the consumer group",
        )
        bodies = [f"msg-{i}" for i in range(300)]
        (tmp_path / "bodies.txt").write_text("\n".join([*bodies, "poison"]) + "\n")
        cli(config, "send", _uri(redis_server, key="jobs"), "--file", str(tmp_path / "bodies.txt"))

        def lines() -> list[str]:
            return out.read_text().splitlines() if out.exists() else []

        wait_for(lambda: len(lines()) >= len(bodies), 30, "every entry handled")
        wait_for(lambda: admin.xlen("jobs-dlq") == 1, 15, "the poison entry dead-lettered")
        assert sorted(lines()) == sorted(bodies)  # each exactly once
        [(_, fields)] = admin.xrange("jobs-dlq")
        assert fields[b"body"] == b"poison"
        assert fields[b"DeadLetterReason"] == b"maxReceiveCount 2 exceeded"
        assert int(admin.xpending("jobs", created["UUID"])["pending"]) == 0
        # Only the mapping's group: `poller send` created none.
        assert [g["name"].decode() for g in admin.xinfo_groups("jobs")] == [created["UUID"]]
    finally:
        returncode = daemon.stop(timeout=30) if daemon.proc is not None else None
        admin.close()
    assert returncode == 0


@pytest.mark.parametrize("level", ["info", "error"])
async def test_the_source_logs_through_the_daemons_log_at_its_level(
    redis_server: RedisServer, level: str
) -> None:
    """No second logging path: what the source has to say is a JSON line of the daemon's log,
    and the daemon's level decides whether it is written."""
    stream = io.BytesIO()
    async with (
        _started(_uri(redis_server), log=JsonLog(stream, level=level)) as queue,
        _admin(redis_server) as admin,
    ):
        await admin.xgroup_destroy(KEY, "mapping-uuid")
        await queue.receive(1, 0)  # NOGROUP: the group is re-created, with a warning
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    warnings = [r for r in records if r["message"].startswith("consumer group missing")]
    if level == "error":
        assert warnings == []
    else:
        [warning] = warnings
        assert warning["level"] == "WARN" and warning["source"] == _uri(redis_server)
