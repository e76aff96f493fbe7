"""SqsQueue against a real moto_server over HTTP: no mocks, the same wire calls as real SQS."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiobotocore.session import get_session
from aiohttp import web

from poller.events import encode_record, md5_hex
from poller.sources.base import Depth, Message, SourceError
from poller.sources.sqs.queue import SqsQueue
from poller.sources.sqs.wire import NON_EXISTENT_QUEUE_MESSAGE
from tests.conftest import AwsEnv
from tests.servers import free_port

REGION = "us-east-1"


@pytest.fixture
def _moto_endpoint(aws_env: AwsEnv) -> str:
    """moto endpoint with dummy credentials in the environment and a fresh state per test.

    A thin alias over the shared conftest fixture, so the tests read the same whether the
    server is shared or private.
    """
    return aws_env.endpoint_url


def _name(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def _admin(endpoint: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client for arranging and inspecting queues behind the source's back."""
    async with get_session().create_client(
        "sqs", region_name=REGION, endpoint_url=endpoint
    ) as client:
        yield client


async def _make_queue(admin: Any, name: str, **attributes: str) -> tuple[str, str]:
    """Create a queue; returns (url, arn)."""
    url = (await admin.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    attrs = await admin.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return url, attrs["Attributes"]["QueueArn"]


@asynccontextmanager
async def _source(endpoint: str, name: str, arn: str, **kwargs: Any) -> AsyncIterator[SqsQueue]:
    kwargs.setdefault("account", arn.split(":")[4])
    queue = SqsQueue(queue_name=name, region=REGION, endpoint_url=endpoint, arn=arn, **kwargs)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


async def _receive_all(queue: SqsQueue, expected: int, *, rounds: int = 20) -> list[Message]:
    got: list[Message] = []
    for _ in range(rounds):
        if len(got) >= expected:
            break
        got += await queue.receive(10, 0)
    return got


# -- start / errors -------------------------------------------------------------------------


async def test_start_on_missing_queue_raises_aws_message(_moto_endpoint: str) -> None:
    name = _name("missing")
    queue = SqsQueue(
        queue_name=name,
        region=REGION,
        account="123456789012",
        endpoint_url=_moto_endpoint,
        arn=f"arn:aws:sqs:{REGION}:123456789012:{name}",
    )
    with pytest.raises(SourceError) as info:
        await queue.start()
    assert str(info.value).startswith(NON_EXISTENT_QUEUE_MESSAGE)
    assert name in str(info.value)
    assert info.value.retryable is True
    await queue.close()  # harmless after a failed start


async def test_start_on_unreachable_endpoint_is_retryable(_moto_endpoint: str) -> None:
    queue = SqsQueue(
        queue_name="orders",
        region=REGION,
        account="123456789012",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        arn=f"arn:aws:sqs:{REGION}:123456789012:orders",
    )
    with pytest.raises(SourceError) as info:
        await queue.start()
    assert "cannot reach" in str(info.value)
    assert info.value.retryable is True


async def test_server_errors_are_retryable(_moto_endpoint: str) -> None:
    # A real HTTP server that answers every request with a 500, like an SQS outage.
    async def fail(_request: web.Request) -> web.Response:
        return web.json_response({"__type": "InternalFailure", "message": "try again"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        queue = SqsQueue(
            queue_name="orders",
            region=REGION,
            account="123456789012",
            endpoint_url=f"http://127.0.0.1:{port}",
            arn=f"arn:aws:sqs:{REGION}:123456789012:orders",
        )
        with pytest.raises(SourceError, match="server error") as info:
            await queue.start()
        assert info.value.retryable is True
    finally:
        await runner.cleanup()


async def test_start_with_unknown_profile_is_a_config_error(_moto_endpoint: str) -> None:
    queue = SqsQueue(
        queue_name="orders",
        region=REGION,
        account="123456789012",
        endpoint_url=_moto_endpoint,
        profile="no-such-profile",
        arn=f"arn:aws:sqs:{REGION}:123456789012:orders",
    )
    with pytest.raises(SourceError) as info:
        await queue.start()
    assert "no-such-profile" in str(info.value)
    assert info.value.retryable is False


async def test_start_with_malformed_endpoint_is_a_config_error(_moto_endpoint: str) -> None:
    queue = SqsQueue(
        queue_name="orders",
        region=REGION,
        account="123456789012",
        endpoint_url="not a url",
        arn=f"arn:aws:sqs:{REGION}:123456789012:orders",
    )
    with pytest.raises(SourceError, match="endpoint_url") as info:
        await queue.start()
    assert info.value.retryable is False


async def test_start_for_another_accounts_queue(_moto_endpoint: str) -> None:
    # The ARN's account differs from ours, so GetQueueUrl carries QueueOwnerAWSAccountId
    # (moto ignores it and serves its single account, which is enough to exercise the path).
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn, account="000000000000") as queue:
        assert queue.account == "000000000000"
        assert queue.queue_url is not None and queue.queue_url.endswith(name)


async def test_start_with_given_url_skips_lookup_and_reads_attributes(
    _moto_endpoint: str,
) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        url, arn = await _make_queue(admin, name, VisibilityTimeout="7")
    async with _source(_moto_endpoint, name, arn, queue_url=url) as queue:
        assert queue.queue_url == url
        assert queue.visibility_timeout_s == 7.0
        assert queue.fifo is False
        assert queue.native_redrive is True
        assert queue.max_receive_count is None
        assert queue.max_receive_batch == 10
        assert queue.redrive_policy is None


# -- the main path --------------------------------------------------------------------------


async def test_send_25_receive_in_batches_delete_leaves_queue_empty(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        bodies = [f"message-{i}" for i in range(25)]
        assert await queue.send(bodies) == 25
        assert await queue.depth() == Depth(visible=25, in_flight=0)

        got: list[Message] = []
        for _ in range(20):
            batch = await queue.receive(10, 0)
            assert len(batch) <= 10
            got += batch
            if len(got) >= 25:
                break
        assert sorted(m.body for m in got) == sorted(bodies)
        assert len({m.id for m in got}) == 25
        assert all(m.receive_count == 1 for m in got)
        assert await queue.depth() == Depth(visible=0, in_flight=25)

        await queue.delete(got)
        assert await queue.depth() == Depth(visible=0, in_flight=0)
        assert await queue.receive(10, 0) == []


async def test_receive_respects_max_messages_and_long_poll(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        await queue.send(["a", "b", "c"])
        first = await queue.receive(2, 0)
        assert 1 <= len(first) <= 2
        assert await queue.receive(0, 0) == []

        # Long poll: a message sent while the receive waits is returned without another call.
        rest = await _receive_all(queue, 3 - len(first))
        assert len(first) + len(rest) == 3
        waiter = asyncio.create_task(queue.receive(10, 5))
        await asyncio.sleep(0.3)
        await queue.send(["late"])
        late = await asyncio.wait_for(waiter, 10)
        assert [m.body for m in late] == ["late"]


async def test_depth_counts_visible_and_in_flight(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        await queue.send([str(i) for i in range(5)])
        got = await queue.receive(2, 0)
        assert len(got) == 2
        depth = await queue.depth()
        assert depth == Depth(visible=3, in_flight=2)
        assert depth.backlog == 5


async def test_receive_count_increments_after_visibility_expiry(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name, VisibilityTimeout="1")
    async with _source(_moto_endpoint, name, arn) as queue:
        assert queue.visibility_timeout_s == 1.0
        await queue.send(["again"])
        (first,) = await queue.receive(10, 0)
        assert first.receive_count == 1
        assert await queue.receive(10, 0) == []  # hidden
        await asyncio.sleep(1.2)
        (second,) = await queue.receive(10, 2)
        assert second.id == first.id
        assert second.receive_count == 2
        assert second.record["attributes"]["ApproximateReceiveCount"] == "2"
        assert second.receipt != first.receipt
        # The first receive time stays put across receives.
        assert (
            second.record["attributes"]["ApproximateFirstReceiveTimestamp"]
            == first.record["attributes"]["ApproximateFirstReceiveTimestamp"]
        )


async def test_change_visibility_keeps_message_hidden_past_original_timeout(
    _moto_endpoint: str,
) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name, VisibilityTimeout="1")
    async with _source(_moto_endpoint, name, arn) as queue:
        await queue.send(["slow"])
        got = await queue.receive(10, 0)
        await queue.change_visibility(got, 30)
        await asyncio.sleep(1.3)
        assert await queue.receive(10, 0) == []
        assert await queue.depth() == Depth(visible=0, in_flight=1)

        # Back to visible now: a zero timeout is how a batch is handed back early.
        await queue.change_visibility(got, 0)
        (again,) = await queue.receive(10, 0)
        assert again.id == got[0].id
        assert again.receive_count == 2


async def test_change_visibility_caps_at_twelve_hours(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        await queue.send(["x"])
        got = await queue.receive(10, 0)
        # 99999 s is over the API maximum; the source caps it rather than failing the heartbeat.
        await queue.change_visibility(got, 99_999)
        assert await queue.depth() == Depth(visible=0, in_flight=1)


async def test_delete_with_stale_receipts_does_not_raise(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        await queue.send(["once"])
        got = await queue.receive(10, 0)
        await queue.delete(got)
        await queue.delete(got)  # already deleted
        bogus = Message(
            id="m", receipt="not-a-receipt-handle", body="", receive_count=1, record={}, size=0
        )
        await queue.delete([bogus, *got, *got])  # unknown and duplicate receipts too
        await queue.change_visibility([bogus, *got], 5)  # nothing left to hide: not an error
        await queue.delete([])
        assert await queue.depth() == Depth(visible=0, in_flight=0)


# -- record shape (§7.1) --------------------------------------------------------------------


async def test_record_shape_matches_lambda(_moto_endpoint: str) -> None:
    name = _name("Orders")
    async with _admin(_moto_endpoint) as admin:
        url, arn = await _make_queue(admin, name)
        await admin.send_message(
            QueueUrl=url,
            MessageBody='{"order": 1}',
            MessageAttributes={
                "Color": {"DataType": "String", "StringValue": "blue"},
                "Count": {"DataType": "Number", "StringValue": "3"},
                "Blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01bin"},
            },
            MessageSystemAttributes={
                "AWSTraceHeader": {
                    "DataType": "String",
                    "StringValue": "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",
                }
            },
        )
        await admin.send_message(QueueUrl=url, MessageBody="plain")
    async with _source(_moto_endpoint, name, arn) as queue:
        got = {m.body: m for m in await _receive_all(queue, 2)}
    rich, plain = got['{"order": 1}'], got["plain"]

    record = plain.record
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
    assert record["messageId"] == plain.id
    assert record["receiptHandle"] == plain.receipt
    assert record["body"] == "plain"
    assert record["messageAttributes"] == {}
    assert record["md5OfBody"] == md5_hex("plain")
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == arn
    assert record["eventSourceARN"].split(":")[5] == name  # case preserved
    assert record["awsRegion"] == REGION
    attributes = record["attributes"]
    assert set(attributes) == {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    }
    assert all(isinstance(v, str) for v in attributes.values())
    assert attributes["ApproximateReceiveCount"] == "1"
    for key in ("SentTimestamp", "ApproximateFirstReceiveTimestamp"):
        assert attributes[key].isdigit() and len(attributes[key]) == 13  # epoch ms
    assert int(attributes["ApproximateFirstReceiveTimestamp"]) >= int(attributes["SentTimestamp"])
    assert plain.encoded == encode_record(record)
    assert plain.size == len(plain.encoded)
    assert plain.group is None
    json.dumps(record)  # plain JSON types only

    rich_record = rich.record
    assert list(rich_record).index("md5OfMessageAttributes") == 6  # right after md5OfBody
    md5_attrs = rich_record["md5OfMessageAttributes"]
    assert isinstance(md5_attrs, str) and len(md5_attrs) == 32
    assert rich_record["attributes"]["AWSTraceHeader"].startswith("Root=1-")
    assert rich_record["messageAttributes"] == {
        "Color": {
            "stringValue": "blue",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "Count": {
            "stringValue": "3",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Number",
        },
        "Blob": {
            "binaryValue": base64.b64encode(b"\x00\x01bin").decode(),
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Binary",
        },
    }
    assert rich.encoded == encode_record(rich_record)
    assert rich.size == len(rich.encoded)
    json.dumps(rich_record)


async def test_send_with_attributes_and_delay(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        assert await queue.send(["later"], delay_s=1, attributes={"kind": "test"}) == 1
        assert await queue.receive(10, 0) == []
        (got,) = await queue.receive(10, 3)
        assert got.body == "later"
        assert got.record["messageAttributes"]["kind"]["stringValue"] == "test"


async def test_send_splits_large_payloads_into_several_batches(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name)
    async with _source(_moto_endpoint, name, arn) as queue:
        # 12 x 100 KB would exceed the 256 KiB per-batch budget many times over.
        bodies = [str(i) * 100_000 for i in range(10)] + ["x" * 100_000] * 2
        assert await queue.send(bodies) == 12
        assert (await queue.depth()).visible == 12


# -- FIFO -----------------------------------------------------------------------------------


async def test_fifo_queue_groups(_moto_endpoint: str) -> None:
    name = _name() + ".fifo"
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(admin, name, FifoQueue="true")
    async with _source(_moto_endpoint, name, arn) as queue:
        assert queue.fifo is True
        assert queue.content_based_dedup is False
        assert await queue.send(["a1", "a2", "a3"], group="A") == 3
        assert await queue.send(["b1"], group="B") == 1
        got = await _receive_all(queue, 4)
        assert len(got) == 4
        by_group: dict[str, list[str]] = {}
        for message in got:
            assert message.group in {"A", "B"}
            attrs = message.record["attributes"]
            assert attrs["MessageGroupId"] == message.group
            assert attrs["SequenceNumber"].isdigit()
            assert attrs["MessageDeduplicationId"]
            by_group.setdefault(message.group, []).append(message.body)
        assert by_group == {"A": ["a1", "a2", "a3"], "B": ["b1"]}  # order kept per group
        await queue.delete(got)
        assert await queue.depth() == Depth(visible=0, in_flight=0)

        with pytest.raises(SourceError, match="message group") as info:
            await queue.send(["no group"])
        assert info.value.retryable is False


async def test_fifo_content_based_dedup(_moto_endpoint: str) -> None:
    name = _name() + ".fifo"
    async with _admin(_moto_endpoint) as admin:
        _url, arn = await _make_queue(
            admin, name, FifoQueue="true", ContentBasedDeduplication="true"
        )
    async with _source(_moto_endpoint, name, arn) as queue:
        assert queue.content_based_dedup is True
        await queue.send(["same"], group="G")
        await queue.send(["same"], group="G")  # deduplicated by SQS on content
        assert (await queue.depth()).visible == 1


# -- dead-letter queues ---------------------------------------------------------------------


async def test_native_redrive_moves_message_to_dlq(_moto_endpoint: str) -> None:
    name, dlq_name = _name(), _name("dlq")
    async with _admin(_moto_endpoint) as admin:
        dlq_url, dlq_arn = await _make_queue(admin, dlq_name)
        policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
        _url, arn = await _make_queue(admin, name, VisibilityTimeout="30", RedrivePolicy=policy)
        async with _source(_moto_endpoint, name, arn) as queue:
            assert queue.redrive_policy is not None
            assert queue.redrive_policy["deadLetterTargetArn"] == dlq_arn
            assert int(queue.redrive_policy["maxReceiveCount"]) == 2
            await queue.send(["poison"])
            for count in (1, 2):
                (got,) = await queue.receive(10, 0)
                assert got.receive_count == count
                await queue.change_visibility([got], 0)  # fail fast instead of waiting 30 s
            # The receive after maxReceiveCount moves it instead of returning it.
            assert await queue.receive(10, 0) == []
            assert await queue.depth() == Depth(visible=0, in_flight=0)
        moved = await admin.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10)
        assert [m["Body"] for m in moved["Messages"]] == ["poison"]


# -- settings changes and failures after start ----------------------------------------------


async def test_depth_refreshes_visibility_timeout(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        url, arn = await _make_queue(admin, name, VisibilityTimeout="30")
        async with _source(_moto_endpoint, name, arn) as queue:
            assert queue.visibility_timeout_s == 30.0
            await admin.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "90"})
            await queue.depth()
            assert queue.visibility_timeout_s == 90.0


async def test_queue_deleted_after_start_surfaces_on_receive(_moto_endpoint: str) -> None:
    name = _name()
    async with _admin(_moto_endpoint) as admin:
        url, arn = await _make_queue(admin, name)
        async with _source(_moto_endpoint, name, arn) as queue:
            await admin.delete_queue(QueueUrl=url)
            with pytest.raises(SourceError) as info:
                await queue.receive(10, 0)
            assert str(info.value).startswith(NON_EXISTENT_QUEUE_MESSAGE)
            assert info.value.retryable is True


async def test_use_before_start_is_a_programming_error() -> None:
    queue = SqsQueue(
        queue_name="q",
        region=REGION,
        account="123456789012",
        arn=f"arn:aws:sqs:{REGION}:123456789012:q",
    )
    with pytest.raises(RuntimeError, match="before start"):
        await queue.receive(1, 0)
