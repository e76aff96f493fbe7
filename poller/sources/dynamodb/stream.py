"""Reading a DynamoDB stream's shards (DescribeStream, GetShardIterator, GetRecords) over
aiobotocore.

I/O only. A reader fetches up to GetRecords' 1,000 records at a time and hands them to the
engine in the amounts it asks for; records have Lambda's shape (ESM_SEMANTICS.md §7.3). A
shard closes about every 4 hours and its children appear in DescribeStream: a closed shard's
reader ends when GetRecords hands back no next iterator, and the engine starts the children
only then.

An expired iterator (15 minutes) is replaced by one after the last record fetched: every
record between the checkpoint and that one is already held by the engine, so this reads what
reopening at the checkpoint would, without reading those records twice. Records trimmed by the
24-hour retention before they were read (TrimmedDataAccessException) are reported as lost and
reading goes on at the oldest record still there.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

from poller.events import DynamoDbRecordShape
from poller.logs import JsonLog
from poller.sources.aws_client import AwsCallError, AwsService
from poller.sources.base import (
    TRIM_HORIZON,
    ReadResult,
    Shard,
    SourceError,
    StartAt,
    StreamRecord,
)
from poller.sources.dynamodb import DynamoDbSpec

_encode = msgspec.json.Encoder().encode
_encode_sorted = msgspec.json.Encoder(order="sorted").encode

FETCH_LIMIT: Final = 1_000  # GetRecords' most
DESCRIBE_PAGE: Final = 100  # DescribeStream's most shards per page
_ITERATOR_TYPES: Final = {
    "after": "AFTER_SEQUENCE_NUMBER",
    "trim_horizon": "TRIM_HORIZON",
    "latest": "LATEST",
}
PERMISSIONS: Final = (
    "dynamodb:DescribeStream, dynamodb:GetShardIterator and dynamodb:GetRecords "
    "(and dynamodb:DescribeTable for dynamodb://TABLE)"
)


class DynamoDbStream:
    """One DynamoDB stream, as a StreamSource."""

    batch_info_key = "DDBStreamBatchInfo"
    idle_poll_s = 0.25  # Lambda polls a DynamoDB shard 4 times a second

    def __init__(
        self,
        spec: DynamoDbSpec,
        *,
        endpoint_url: str | None,
        profile: str | None,
        log: JsonLog | None = None,
        describe_page: int = DESCRIBE_PAGE,
    ) -> None:
        self.spec = spec
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.log = log or JsonLog()
        self.describe_page = describe_page
        self.what = f"DynamoDB stream of table {spec.table_name}"
        self.stream_arn = spec.stream_arn or spec.display_uri
        self.shape = DynamoDbRecordShape(self.stream_arn, spec.region)
        self.aws = self._service("dynamodbstreams")

    def __repr__(self) -> str:
        return f"DynamoDbStream({self.stream_arn!r})"

    def _service(self, name: str) -> AwsService:
        return AwsService(
            name,
            region=self.spec.region,
            endpoint_url=self.endpoint_url,
            profile=self.profile,
            what=self.what,
            permissions=PERMISSIONS,
        )

    async def start(self) -> None:
        """Find the stream (the table's current one for dynamodb://TABLE) and check it."""
        if self.spec.stream_arn is None:
            arn = await self._latest_stream()
            if arn != self.stream_arn:
                self.stream_arn = arn
                self.shape = DynamoDbRecordShape(arn, self.spec.region)
        await self.aws.start()
        try:
            await self.aws.call("DescribeStream", StreamArn=self.stream_arn, Limit=1)
        except AwsCallError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            raise SourceError(
                f"{self.what}: stream {self.stream_arn} not found in {self.spec.region}: map "
                f"dynamodb://{self.spec.table_name} to follow the table's current stream, or "
                "the ARN its LatestStreamArn shows"
            ) from None

    async def _latest_stream(self) -> str:
        """The table's LatestStreamArn; retryable errors while it has none, so a mapping
        starts once a stream is enabled."""
        table = self.spec.table_name
        service = self._service("dynamodb")
        await service.start()
        try:
            described = await service.call("DescribeTable", TableName=table)
        except AwsCallError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            raise SourceError(
                f"DynamoDB table {table} not found in {self.spec.region}: create it or fix the "
                "event source"
            ) from None
        finally:
            await service.close()
        details = described.get("Table", {})
        arn = details.get("LatestStreamArn")
        if not arn or not details.get("StreamSpecification", {}).get("StreamEnabled"):
            raise SourceError(
                f"DynamoDB table {table} has no stream enabled: enable one (aws dynamodb "
                f"update-table --table-name {table} --stream-specification "
                "StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES) and the mapping starts "
                "reading it"
            )
        latest: str = arn
        return latest

    async def close(self) -> None:
        await self.aws.close()

    async def shards(self) -> list[Shard]:
        shards: list[Shard] = []
        params: dict[str, Any] = {"StreamArn": self.stream_arn, "Limit": self.describe_page}
        while True:
            described = (await self.aws.call("DescribeStream", **params))["StreamDescription"]
            for raw in described.get("Shards", []):
                parent = raw.get("ParentShardId")
                closed = "EndingSequenceNumber" in raw.get("SequenceNumberRange", {})
                shards.append(Shard(raw["ShardId"], (parent,) if parent else (), closed))
            last = described.get("LastEvaluatedShardId")
            if not last:
                return shards
            params["ExclusiveStartShardId"] = last

    async def open_reader(self, shard: Shard, start: StartAt) -> DynamoDbShardReader:
        reader = DynamoDbShardReader(self, shard.id, start)
        await reader.open()
        return reader

    async def iterator(self, shard_id: str, start: StartAt) -> str:
        params: dict[str, Any] = {
            "StreamArn": self.stream_arn,
            "ShardId": shard_id,
            # No AT_TIMESTAMP: a mapping asking for it is refused when it is created.
            "ShardIteratorType": _ITERATOR_TYPES[start.kind],
        }
        if start.kind == "after":
            params["SequenceNumber"] = start.sequence
        response = await self.aws.call("GetShardIterator", **params)
        iterator: str = response["ShardIterator"]
        return iterator


class DynamoDbShardReader:
    """One shard, read forward with GetRecords and the iterator each call hands back."""

    start_point: str | None = None  # the service names no sequence number for LATEST

    def __init__(self, stream: DynamoDbStream, shard_id: str, start: StartAt) -> None:
        self._stream = stream
        self._shard_id = shard_id
        self._start = start
        self._iterator: str | None = None
        self._last: str | None = None  # the sequence number of the last record fetched
        self._buffer: list[StreamRecord] = []
        self._taken = 0
        self._ended = False
        self._lost = 0  # trimmed before they were read, not reported yet

    async def open(self) -> None:
        self._iterator = await self._open_at(self._start)

    async def close(self) -> None:
        """Nothing of its own: the client is the stream's."""

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        """Up to ``limit`` records (DynamoDB Streams cannot block: ``wait_s`` is not used)."""
        if self._taken == len(self._buffer) and not self._ended:
            await self._fetch()
        records = self._buffer[self._taken : self._taken + limit]
        self._taken += len(records)
        lost, self._lost = self._lost, 0
        end = self._ended and self._taken == len(self._buffer)
        return ReadResult(records, end=end, lost=lost)

    async def _open_at(self, start: StartAt) -> str:
        try:
            return await self._stream.iterator(self._shard_id, start)
        except AwsCallError as exc:
            if exc.code != "TrimmedDataAccessException":
                raise
        self._trimmed()
        return await self._stream.iterator(self._shard_id, TRIM_HORIZON)

    def _trimmed(self) -> None:
        self._lost += 1  # the service does not say how many
        self._stream.log.warning(
            "records were trimmed from the shard (24-hour retention) before they were read; "
            "reading goes on at the oldest record still there",
            source=self._stream.stream_arn,
            shard=self._shard_id,
            sequence=self._last,
        )

    async def _fetch(self) -> None:
        stream = self._stream
        try:
            response = await self._get_records()
        except AwsCallError as exc:
            if exc.code == "ExpiredIteratorException":
                stream.log.info(
                    "shard iterator expired; reading on from a new one after the last record read",
                    source=stream.stream_arn,
                    shard=self._shard_id,
                    sequence=self._last,
                )
                resume = self._start if self._last is None else StartAt.after(self._last)
            elif exc.code == "TrimmedDataAccessException":
                self._trimmed()
                resume = TRIM_HORIZON
            else:
                raise
            self._iterator = await self._open_at(resume)
            response = await self._get_records()
        raw = response.get("Records") or []
        self._buffer = self._records(raw)
        self._taken = 0
        if raw:
            self._last = raw[-1]["dynamodb"]["SequenceNumber"]
        self._iterator = response.get("NextShardIterator")
        self._ended = self._iterator is None

    async def _get_records(self) -> dict[str, Any]:
        return await self._stream.aws.call(
            "GetRecords", ShardIterator=self._iterator, Limit=FETCH_LIMIT
        )

    def _records(self, raw: list[dict[str, Any]]) -> list[StreamRecord]:
        shape = self._stream.shape
        records = []
        now = time.time()
        for entry in raw:
            record = shape.record(entry)
            change = entry.get("dynamodb") or {}
            created = change.get("ApproximateCreationDateTime")
            # One item's changes stay in one lane (ParallelizationFactor): its key decides.
            key = _encode_sorted(change.get("Keys") or {}).decode()
            records.append(
                StreamRecord(
                    change["SequenceNumber"],
                    key,
                    now if created is None else float(created),
                    _encode(record),
                )
            )
        return records
