"""The Kinesis and DynamoDB shard readers on answers moto cannot give: a DynamoDB shard that
closes, iterators that expire, records trimmed by retention, a TTL deletion. The service is a
stub that answers each call with the next canned response (shaped as aiobotocore returns them
with the sources' parser settings: blobs in base64, timestamps in epoch seconds)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from poller.events import DynamoDbRecordShape
from poller.sources.aws_client import AwsCallError
from poller.sources.base import LATEST, TRIM_HORIZON, AwsDefaults, Shard, StartAt
from poller.sources.dynamodb import parse as parse_dynamodb
from poller.sources.dynamodb.stream import DynamoDbStream
from poller.sources.kinesis import parse as parse_kinesis
from poller.sources.kinesis.stream import KinesisStream

DDB_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/Tbl/stream/2024-01-01T00:00:00.000"
KINESIS_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/s"
SHARD = Shard("shardId-1")


class StubService:
    def __init__(self, *answers: tuple[str, Any]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, operation: str, **params: Any) -> dict[str, Any]:
        self.calls.append((operation, params))
        expected, answer = self.answers.pop(0)
        assert operation == expected, (operation, params)
        if isinstance(answer, Exception):
            raise answer
        result: dict[str, Any] = answer
        return result


def _expired() -> AwsCallError:
    return AwsCallError("expired", "ExpiredIteratorException")


def _change(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "eventID": f"e{n}",
        "eventName": "INSERT",
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": 1_700_000_000.0 + n,
            "Keys": {"id": {"N": str(n)}},
            "NewImage": {"id": {"N": str(n)}, "blob": {"B": "AP8="}},
            "SequenceNumber": f"{n:05d}",
            "SizeBytes": 20,
            "StreamViewType": "NEW_IMAGE",
        },
        **extra,
    }


def _ddb(*answers: tuple[str, Any]) -> tuple[DynamoDbStream, StubService]:
    stream = DynamoDbStream(parse_dynamodb(DDB_ARN, AwsDefaults()), endpoint_url=None, profile=None)
    stub = StubService(*answers)
    stream.aws = stub  # type: ignore[assignment]
    return stream, stub


def _sequences(result: Any) -> list[str]:
    return [r.sequence for r in result.records]


async def test_a_closed_dynamodb_shard_ends_when_no_next_iterator_comes_back() -> None:
    stream, _ = _ddb(
        ("GetShardIterator", {"ShardIterator": "i1"}),
        (
            "GetRecords",
            {"Records": [_change(1), _change(2), _change(3)], "NextShardIterator": "i2"},
        ),
        ("GetRecords", {"Records": [_change(4)]}),  # the last page of a closed shard
    )
    reader = await stream.open_reader(SHARD, TRIM_HORIZON)
    first = await reader.read(2, 0)
    assert (_sequences(first), first.end) == (["00001", "00002"], False)
    second = await reader.read(2, 0)
    assert (_sequences(second), second.end) == (["00003"], False)  # from what was fetched
    last = await reader.read(2, 0)
    assert (_sequences(last), last.end) == (["00004"], True)


async def test_an_expired_dynamodb_iterator_reopens_after_the_last_record_fetched() -> None:
    stream, stub = _ddb(
        ("GetShardIterator", {"ShardIterator": "i1"}),
        ("GetRecords", {"Records": [_change(1), _change(2)], "NextShardIterator": "i2"}),
        ("GetRecords", _expired()),
        ("GetShardIterator", {"ShardIterator": "i3"}),
        ("GetRecords", {"Records": [_change(3)], "NextShardIterator": "i4"}),
    )
    reader = await stream.open_reader(SHARD, StartAt.after("00000"))
    assert _sequences(await reader.read(10, 0)) == ["00001", "00002"]
    assert _sequences(await reader.read(10, 0)) == ["00003"]
    reopened = [params for op, params in stub.calls if op == "GetShardIterator"]
    assert reopened == [
        {
            "StreamArn": DDB_ARN,
            "ShardId": "shardId-1",
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
            "SequenceNumber": "00000",
        },
        {
            "StreamArn": DDB_ARN,
            "ShardId": "shardId-1",
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
            "SequenceNumber": "00002",
        },
    ]


@pytest.mark.parametrize("where", ["GetShardIterator", "GetRecords"])
async def test_records_trimmed_before_they_were_read_are_reported_lost(where: str) -> None:
    trimmed = AwsCallError("trimmed", "TrimmedDataAccessException")
    if where == "GetShardIterator":
        answers = [("GetShardIterator", trimmed)]
    else:
        answers = [("GetShardIterator", {"ShardIterator": "i1"}), ("GetRecords", trimmed)]
    stream, stub = _ddb(
        *answers,
        ("GetShardIterator", {"ShardIterator": "i2"}),
        ("GetRecords", {"Records": [_change(7)], "NextShardIterator": "i3"}),
        ("GetRecords", {"Records": [], "NextShardIterator": "i4"}),
    )
    reader = await stream.open_reader(SHARD, StartAt.after("00001"))
    result = await reader.read(10, 0)
    assert (_sequences(result), result.lost) == (["00007"], 1)
    assert stub.calls[-2][1]["ShardIteratorType"] == "TRIM_HORIZON"
    assert (await reader.read(10, 0)).lost == 0  # reported once


async def test_dynamodb_records_have_lambdas_shape_and_their_items_key() -> None:
    ttl = {"userIdentity": {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}}
    stream, _ = _ddb(
        ("GetShardIterator", {"ShardIterator": "i1"}),
        (
            "GetRecords",
            {"Records": [_change(1, eventName="REMOVE", **ttl)], "NextShardIterator": "i"},
        ),
    )
    reader = await stream.open_reader(SHARD, LATEST)
    [record] = (await reader.read(10, 0)).records
    assert record.partition_key == '{"id":{"N":"1"}}'
    assert record.arrival == 1_700_000_001.0
    assert json.loads(record.encoded) == {
        "eventID": "e1",
        "eventVersion": "1.1",
        "eventName": "REMOVE",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": 1_700_000_001,
            "Keys": {"id": {"N": "1"}},
            "NewImage": {"id": {"N": "1"}, "blob": {"B": "AP8="}},
            "SequenceNumber": "00001",
            "SizeBytes": 20,
            "StreamViewType": "NEW_IMAGE",
        },
        "eventSourceARN": DDB_ARN,
        # Only on TTL deletions, in Lambda's spelling.
        "userIdentity": {"type": "Service", "principalId": "dynamodb.amazonaws.com"},
    }


def test_a_dynamodb_shape_keeps_members_it_does_not_know() -> None:
    change = _change(1)
    change["dynamodb"]["SomethingNew"] = 1
    record = DynamoDbRecordShape(DDB_ARN, "eu-west-1").record({**change, "awsRegion": None})
    assert record["dynamodb"]["SomethingNew"] == 1 and record["awsRegion"] == "eu-west-1"


def _kinesis(*answers: tuple[str, Any]) -> tuple[KinesisStream, StubService]:
    stream = KinesisStream(
        parse_kinesis(KINESIS_ARN, AwsDefaults()),
        endpoint_url=None,
        profile=None,
        invoke_identity_arn="arn:aws:iam::123456789012:role/r",
    )
    stub = StubService(*answers)
    stream.aws = stub  # type: ignore[assignment]
    return stream, stub


def _put(n: int) -> dict[str, Any]:
    return {
        "SequenceNumber": str(n),
        "PartitionKey": "k",
        "Data": "eA==",
        "ApproximateArrivalTimestamp": 1_700_000_000.1234,
    }


async def test_a_kinesis_reader_started_at_trim_horizon_reopens_there_before_its_first_record() -> (
    None
):
    stream, stub = _kinesis(
        ("GetShardIterator", {"ShardIterator": "i1"}),
        ("GetRecords", _expired()),
        ("GetShardIterator", {"ShardIterator": "i2"}),
        ("GetRecords", {"Records": [_put(1)], "NextShardIterator": "i3", "MillisBehindLatest": 5}),
    )
    reader = await stream.open_reader(SHARD, TRIM_HORIZON)
    result = await reader.read(10, 0)
    assert (_sequences(result), result.behind_ms) == (["1"], 5)
    assert [p["ShardIteratorType"] for op, p in stub.calls if op == "GetShardIterator"] == [
        "TRIM_HORIZON",
        "TRIM_HORIZON",
    ]
    # Arrival times keep their milliseconds, rounded as Lambda's events show them.
    assert json.loads(result.records[0].encoded)["kinesis"]["approximateArrivalTimestamp"] == (
        1_700_000_000.123
    )


async def test_the_sender_puts_again_what_kinesis_throttled() -> None:
    stream, stub = _kinesis(
        (
            "PutRecords",
            {
                "FailedRecordCount": 1,
                "Records": [
                    {"SequenceNumber": "1", "ShardId": "s"},
                    {
                        "ErrorCode": "ProvisionedThroughputExceededException",
                        "ErrorMessage": "Rate exceeded",
                    },
                ],
            },
        ),
        ("PutRecords", {"FailedRecordCount": 0, "Records": [{"SequenceNumber": "2"}]}),
    )
    assert await stream.send(["a", "b"], partition_key="k") == 2
    second = stub.calls[1][1]["Records"]
    assert second == [{"Data": b"b", "PartitionKey": "k"}]


async def test_dynamodb_shards_are_described_page_by_page_with_their_parents() -> None:
    def shard(shard_id: str, parent: str | None = None, ending: str | None = None) -> Any:
        numbers = {
            "StartingSequenceNumber": "1",
            **({"EndingSequenceNumber": ending} if ending else {}),
        }
        return {"ShardId": shard_id, "SequenceNumberRange": numbers} | (
            {"ParentShardId": parent} if parent else {}
        )

    stream, stub = _ddb(
        (
            "DescribeStream",
            {
                "StreamDescription": {
                    "Shards": [shard("a", ending="9"), shard("b", parent="a")],
                    "LastEvaluatedShardId": "b",
                }
            },
        ),
        ("DescribeStream", {"StreamDescription": {"Shards": [shard("c", parent="a")]}}),
    )
    assert await stream.shards() == [
        Shard("a", (), closed=True),
        Shard("b", ("a",)),
        Shard("c", ("a",)),
    ]
    assert [params.get("ExclusiveStartShardId") for _, params in stub.calls] == [None, "b"]
