"""DynamoDB Streams on the stream engine, against moto_server over real HTTP with real workers.

moto keeps one shard per table stream that never closes, where DynamoDB closes a shard about
every 4 hours and opens children: the engine's side of that rollover runs here over a stub
source (``RollingStream``), and the reader's side (a closed shard's last GetRecords) in
tests/unit/test_aws_stream_readers.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from poller.config import AwsConfig, Config
from poller.engine.checkpoints import SHARD_END
from poller.engine.filter_compiler import compile_filter_criteria
from poller.events import DynamoDbRecordShape
from poller.sources.base import ReadResult, Shard, StartAt, StreamRecord
from poller.sources.dynamodb import SOURCE
from tests.conftest import AwsEnv
from tests.integration.stream_harness import Harness, until
from tests.servers import AWS_REGION

ACCOUNT = "123456789012"  # moto's
DDB = {"record_shape": SOURCE.record_shape}  # what the daemon's runner takes from the kind


@asynccontextmanager
async def _dynamodb(env: AwsEnv) -> AsyncIterator[Any]:
    async with get_session().create_client("dynamodb", **env.client_kwargs()) as client:
        yield client


async def _table(env: AwsEnv, name: str, view: str | None = "NEW_AND_OLD_IMAGES") -> str | None:
    """A table keyed by ``id`` (with a stream of that view type); its LatestStreamArn."""
    stream = {"StreamEnabled": True, "StreamViewType": view} if view else {}
    async with _dynamodb(env) as ddb:
        created = await ddb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
            **({"StreamSpecification": stream} if stream else {}),
        )
    arn: str | None = created["TableDescription"].get("LatestStreamArn")
    return arn


def _harness(env: AwsEnv, tmp: Path, uri: str, **kwargs: Any) -> Harness:
    settings = {**DDB, **kwargs.pop("settings", {})}
    config = Config(aws=AwsConfig(endpoint_url=env.endpoint_url, account=ACCOUNT))
    kwargs.setdefault("handler", "changes")
    return Harness(None, tmp, source_uri=uri, config=config, settings=settings, **kwargs)


async def test_insert_modify_remove_arrive_in_order_per_item(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _table(aws_env, "orders")
    items = [f"order-{i}" for i in range(6)]
    async with _dynamodb(aws_env) as ddb:
        for round_ in range(3):
            for item in items:
                await ddb.put_item(
                    TableName="orders", Item={"id": {"S": item}, "version": {"N": str(round_)}}
                )
        for item in items:
            await ddb.delete_item(TableName="orders", Key={"id": {"S": item}})
    h = _harness(
        aws_env,
        tmp_path,
        "dynamodb://orders",
        settings={"batch_size": 4, "parallelization_factor": 3},
    )
    async with h.running():
        await until(lambda: len(h.handled()) == 24, 20, "every change handled")
    per_item: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for record in h.handled():
        new = record["dynamodb"].get("NewImage")
        per_item[record["dynamodb"]["Keys"]["id"]["S"]].append(
            (record["eventName"], new and new["version"]["N"])
        )
    assert per_item == {
        item: [("INSERT", "0"), ("MODIFY", "1"), ("MODIFY", "2"), ("REMOVE", None)]
        for item in items
    }
    # Three lanes ran: an item's changes stay in one, in order.
    assert len({r["request"] for r in h.handled()}) >= 6


async def test_records_have_lambdas_dynamodb_shape(aws_env: AwsEnv, tmp_path: Path) -> None:
    stream_arn = await _table(aws_env, "shapes")
    async with _dynamodb(aws_env) as ddb:
        await ddb.put_item(
            TableName="shapes",
            Item={
                "id": {"S": "a"},
                "blob": {"B": b"\x00\xff"},
                "count": {"N": "1.5"},
                "tags": {"SS": ["x", "y"]},
                "nested": {"M": {"ok": {"BOOL": True}, "none": {"NULL": True}}},
            },
        )
        await ddb.update_item(
            TableName="shapes",
            Key={"id": {"S": "a"}},
            UpdateExpression="SET #c = :c",
            ExpressionAttributeNames={"#c": "count"},
            ExpressionAttributeValues={":c": {"N": "2"}},
        )
    before = int(time.time())
    h = _harness(aws_env, tmp_path, stream_arn or "", handler="raw")
    async with h.running():
        await until(lambda: sum(len(e["Records"]) for e in h.events()) == 2, 20, "both handled")
    insert, modify = [r for e in h.events() for r in e["Records"]]
    # Members in the order Lambda's events have them.
    assert list(insert) == [
        "eventID",
        "eventVersion",
        "eventName",
        "eventSource",
        "awsRegion",
        "dynamodb",
        "eventSourceARN",
    ]
    assert list(modify["dynamodb"]) == [
        "ApproximateCreationDateTime",
        "Keys",
        "NewImage",
        "OldImage",
        "SequenceNumber",
        "SizeBytes",
        "StreamViewType",
    ]
    for record in (insert, modify):
        created = record["dynamodb"].pop("ApproximateCreationDateTime")
        assert isinstance(created, int) and before - 60 <= created <= time.time() + 1
        assert isinstance(record["dynamodb"].pop("SizeBytes"), int)
        assert record["dynamodb"].pop("SequenceNumber").isdigit()
        assert len(record.pop("eventID")) > 0
    image = {
        "id": {"S": "a"},
        "blob": {"B": "AP8="},  # base64, as Lambda gives it
        "count": {"N": "1.5"},
        "tags": {"SS": ["x", "y"]},
        "nested": {"M": {"ok": {"BOOL": True}, "none": {"NULL": True}}},
    }
    common = {
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": AWS_REGION,
        "eventSourceARN": stream_arn,
    }
    assert insert == {
        **common,
        "eventName": "INSERT",
        "dynamodb": {
            "Keys": {"id": {"S": "a"}},
            "NewImage": image,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }
    assert modify == {
        **common,
        "eventName": "MODIFY",
        "dynamodb": {
            "Keys": {"id": {"S": "a"}},
            "NewImage": {**image, "count": {"N": "2"}},
            "OldImage": image,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }
    assert "userIdentity" not in insert  # only on TTL deletions


async def test_a_table_without_a_stream_is_named_and_starts_once_one_is_enabled(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _table(aws_env, "plain", view=None)
    h = _harness(aws_env, tmp_path, "dynamodb://plain")
    async with h.running() as runner:
        await until(lambda: runner.health.status.startswith("PROBLEM"), 20, "the problem shown")
        problem = runner.health.status
        async with _dynamodb(aws_env) as ddb:
            await ddb.update_table(
                TableName="plain",
                StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
            )
        await until(lambda: runner.started, 60, "the mapping started on the new stream")
        async with _dynamodb(aws_env) as ddb:
            await ddb.put_item(TableName="plain", Item={"id": {"S": "x"}})
        await until(lambda: h.handled(), 20, "the change handled")
    assert "DynamoDB table plain has no stream enabled" in problem
    assert "aws dynamodb update-table --table-name plain --stream-specification" in problem
    [record] = h.handled()
    assert record["eventName"] == "INSERT" and record["dynamodb"]["StreamViewType"] == "NEW_IMAGE"


async def test_an_idle_shard_is_polled_about_four_times_a_second(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _table(aws_env, "idle")
    h = _harness(aws_env, tmp_path, "dynamodb://idle")
    calls: list[float] = []
    async with h.running() as runner:
        await until(lambda: runner.started, 20, "the runner started")
        runner.source.aws._client.meta.events.register(
            "before-call.dynamodbstreams.GetRecords", lambda **_: calls.append(time.monotonic())
        )
        await asyncio.sleep(3)
    # About four a second: never faster than the 0.25 s pause allows (a busy machine only
    # makes it slower, so the lower bound is loose).
    assert 3 <= len(calls) <= 13
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.18 for gap in gaps), gaps


async def test_filters_match_on_the_dynamodb_key(aws_env: AwsEnv, tmp_path: Path) -> None:
    await _table(aws_env, "filtered")
    async with _dynamodb(aws_env) as ddb:
        for i, status in enumerate(["paid", "open", "paid", "void"]):
            await ddb.put_item(
                TableName="filtered", Item={"id": {"S": f"o{i}"}, "status": {"S": status}}
            )
        await ddb.delete_item(TableName="filtered", Key={"id": {"S": "o0"}})
    pattern = {"dynamodb": {"NewImage": {"status": {"S": ["paid"]}}}, "eventName": ["INSERT"]}
    criteria = {"Filters": [{"Pattern": json.dumps(pattern)}]}
    h = _harness(
        aws_env,
        tmp_path,
        "dynamodb://filtered",
        settings={
            "filter": compile_filter_criteria(criteria, json_data_key=SOURCE.filter_json_key)
        },
    )
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 2, 20, "the matching changes handled")
        await until(lambda: runner.metrics.filtered_out._value.get() == 3, 10, "the rest counted")  # type: ignore[attr-defined]
        await asyncio.sleep(1)
    assert [r["dynamodb"]["Keys"]["id"]["S"] for r in h.handled()] == ["o0", "o2"]


async def test_partial_batch_failures_name_sequence_numbers(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _table(aws_env, "partial")
    async with _dynamodb(aws_env) as ddb:
        for item in (
            {"id": {"S": "a"}},
            {"id": {"S": "b"}, "bad": {"BOOL": True}},
            {"id": {"S": "c"}},
        ):
            await ddb.put_item(TableName="partial", Item=item)
    h = _harness(
        aws_env,
        tmp_path,
        "dynamodb://partial",
        handler="changes_partial",
        destination=True,
        settings={"report_batch_item_failures": True, "max_retries": 1},
    )
    async with h.running():
        await until(lambda: h.given_up(), 20, "the failing change given up")
    batches: dict[str, list[str]] = defaultdict(list)
    for record in h.handled():
        batches[record["request"]].append(record["dynamodb"]["Keys"]["id"]["S"])
    assert list(batches.values()) == [["a", "b", "c"], ["b", "c"]]
    [failure] = h.given_up()
    info = failure["DDBStreamBatchInfo"]
    sequences = [r["dynamodb"]["SequenceNumber"] for r in h.handled()[:3]]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (sequences[1], sequences[2])
    assert info["streamArn"].startswith(f"arn:aws:dynamodb:{AWS_REGION}:{ACCOUNT}:table/partial/")


# -- shard rollover, on a stub source (moto's shards never close) ----------------------------


class RollingStream:
    """A DynamoDB stream whose only shard closes after its records and hands over to two
    children, as DynamoDB does about every 4 hours."""

    batch_info_key = "DDBStreamBatchInfo"
    idle_poll_s = 0.25
    stream_arn = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2024-01-01T00:00:00.000"

    def __init__(self) -> None:
        self.shape = DynamoDbRecordShape(self.stream_arn, AWS_REGION)
        # The children split the parent's keys between them, as DynamoDB's do.
        self.records = {
            "parent": self._changes("parent", range(30), lambda n: n % 7),
            "child-a": self._changes("child-a", range(30, 40), lambda n: n % 4),
            "child-b": self._changes("child-b", range(40, 50), lambda n: 4 + n % 3),
        }
        self.rolled = False
        self.opened: list[tuple[str, float]] = []

    def _changes(self, shard: str, ns: range, item_of: Any) -> list[StreamRecord]:
        out = []
        for n in ns:
            item = f"item-{item_of(n)}"
            raw = {
                "eventID": f"{shard}-{n}",
                "eventName": "MODIFY",
                "awsRegion": AWS_REGION,
                "dynamodb": {
                    "ApproximateCreationDateTime": time.time(),
                    "Keys": {"id": {"S": item}},
                    "NewImage": {"id": {"S": item}, "n": {"N": str(n)}},
                    "SequenceNumber": f"{n:021d}",
                    "SizeBytes": 10,
                    "StreamViewType": "NEW_IMAGE",
                },
            }
            encoded = json.dumps(self.shape.record(raw)).encode()
            out.append(StreamRecord(f"{n:021d}", item, time.time(), encoded))
        return out

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def shards(self) -> list[Shard]:
        if not self.rolled:
            return [Shard("parent")]
        return [
            Shard("parent", closed=True),
            Shard("child-a", parents=("parent",)),
            Shard("child-b", parents=("parent",)),
        ]

    async def open_reader(self, shard: Shard, start: StartAt) -> Any:
        self.opened.append((shard.id, time.monotonic()))
        return _Reader(self, shard.id, start)


class _Reader:
    start_point = None

    def __init__(self, stream: RollingStream, shard: str, start: StartAt) -> None:
        self.stream = stream
        self.shard = shard
        records = stream.records[shard]
        self.position = 0
        if start.kind == "after":
            self.position = (
                next(i for i, r in enumerate(records) if r.sequence == start.sequence) + 1
            )

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        records = self.stream.records[self.shard][self.position : self.position + limit]
        self.position += len(records)
        done = self.position == len(self.stream.records[self.shard])
        if self.shard == "parent" and done:
            self.stream.rolled = True  # the shard closes once its records are read
        return ReadResult(records, end=done and self.shard == "parent")  # children stay open

    async def close(self) -> None:
        pass


async def test_a_rolled_over_shards_children_start_after_it_is_read_to_its_end(
    tmp_path: Path,
) -> None:
    stream = RollingStream()
    h = Harness(
        None,
        tmp_path,
        handler="changes",
        stub_source=stream,
        settings={**DDB, "batch_size": 4, "parallelization_factor": 2},
    )
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 50, 30, "every change handled")
        await until(lambda: runner.finished == {"parent"}, 10, "the parent finished")
        checkpoints = await runner.store.list_checkpoints("m")
    assert checkpoints["parent"].position == SHARD_END
    handled = [int(r["dynamodb"]["NewImage"]["n"]["N"]) for r in h.handled()]
    # Every change of the parent before any of its children's.
    assert set(handled[:30]) == set(range(30)) and set(handled[30:]) == set(range(30, 50))
    per_item: dict[str, list[int]] = defaultdict(list)
    for record in h.handled():
        per_item[record["dynamodb"]["Keys"]["id"]["S"]].append(
            int(record["dynamodb"]["NewImage"]["n"]["N"])
        )
    assert all(ns == sorted(ns) for ns in per_item.values())
    assert stream.opened[0][0] == "parent"
    assert sorted(shard for shard, _ in stream.opened[1:]) == ["child-a", "child-b"]
