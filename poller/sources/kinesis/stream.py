"""Reading a Kinesis data stream's shards (ListShards, GetShardIterator, GetRecords) and putting
records on it (PutRecords), over aiobotocore.

I/O only. A reader fetches up to GetRecords' 10,000 records at a time (one call per shard per
second is what the service is built for; asking for one batch at a time would meet its 5 calls
per second per shard long before its 2 MB/s) and hands them to the engine in the amounts it
asks for. Records have Lambda's shape (ESM_SEMANTICS.md §7.2).

A shard iterator expires about 5 minutes after it was issued (a reader held back that long by
a slow function, or a long outage): the reader then opens a new one after the last record it
fetched. Every record between the mapping's checkpoint and that one is already held by the
engine and will be settled and checkpointed in order, so this reads exactly what reopening at
the checkpoint would, without reading those records a second time. Never from LATEST: before
its first record, a reader opened at LATEST reopens at the time it was opened.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Final

import msgspec

from poller.events import KinesisRecordShape
from poller.logs import JsonLog
from poller.sources.aws_client import AwsCallError, AwsService
from poller.sources.base import ReadResult, Shard, SourceError, StartAt, StreamRecord
from poller.sources.kinesis import KinesisSpec

_encode = msgspec.json.Encoder().encode

FETCH_LIMIT: Final = 10_000  # GetRecords' most
LIST_PAGE: Final = 1_000  # ListShards' default page
PUT_CHUNK: Final = 500  # PutRecords' most records per call
PUT_BYTES: Final = 5 * 1024 * 1024  # and bytes per call
PUT_ATTEMPTS: Final = 4
PERMISSIONS: Final = (
    "kinesis:DescribeStreamSummary, kinesis:ListShards, kinesis:GetShardIterator and "
    "kinesis:GetRecords (kinesis:PutRecords to send)"
)


class KinesisStream:
    """One Kinesis data stream: a StreamSource for a mapping, a sender for `poller send`."""

    batch_info_key = "KinesisBatchInfo"
    idle_poll_s = 1.0  # Lambda polls an idle shard once a second

    def __init__(
        self,
        spec: KinesisSpec,
        *,
        endpoint_url: str | None,
        profile: str | None,
        invoke_identity_arn: str,
        log: JsonLog | None = None,
        list_page: int = LIST_PAGE,
    ) -> None:
        self.spec = spec
        self.stream_arn = spec.stream_arn
        self.invoke_identity_arn = invoke_identity_arn
        self.log = log or JsonLog()
        self.list_page = list_page
        self.what = f"Kinesis stream {spec.stream_name}"
        self.aws = AwsService(
            "kinesis",
            region=spec.region,
            endpoint_url=endpoint_url,
            profile=profile,
            what=self.what,
            permissions=PERMISSIONS,
        )
        self.shape = KinesisRecordShape(self.stream_arn, spec.region, invoke_identity_arn)

    def __repr__(self) -> str:
        return f"KinesisStream({self.stream_arn!r})"

    async def start(self) -> None:
        """Connect and check the stream exists; a stream given by name gets its real ARN."""
        await self.aws.start()
        spec = self.spec
        where = {"StreamName": spec.stream_name} if spec.by_name else {"StreamARN": spec.stream_arn}
        try:
            summary = await self.aws.call("DescribeStreamSummary", **where)
        except AwsCallError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            # Retryable: the mapping starts once the stream exists, as Lambda's does.
            raise SourceError(
                f"{self.what} not found in {self.spec.region} ({self.spec.display_uri}): create "
                f"it (aws kinesis create-stream --stream-name {self.spec.stream_name}) or map "
                "another stream"
            ) from None
        arn = summary["StreamDescriptionSummary"]["StreamARN"]
        if arn != self.stream_arn:
            self.stream_arn = arn
            self.shape = KinesisRecordShape(arn, self.spec.region, self.invoke_identity_arn)

    async def close(self) -> None:
        await self.aws.close()

    async def shards(self) -> list[Shard]:
        """Every shard the stream still has (closed ones until their records expire)."""
        shards: list[Shard] = []
        # The token alone names the stream: AWS refuses a page request that names it too.
        params: dict[str, Any] = {"StreamARN": self.stream_arn, "MaxResults": self.list_page}
        while True:
            page = await self.aws.call("ListShards", **params)
            for raw in page.get("Shards", []):
                parents = (raw.get("ParentShardId"), raw.get("AdjacentParentShardId"))
                closed = "EndingSequenceNumber" in raw.get("SequenceNumberRange", {})
                shards.append(Shard(raw["ShardId"], tuple(p for p in parents if p), closed))
            token = page.get("NextToken")
            if not token:
                return shards
            params = {"NextToken": token, "MaxResults": self.list_page}

    async def open_reader(self, shard: Shard, start: StartAt) -> KinesisShardReader:
        reader = KinesisShardReader(self, shard.id, start)
        await reader.open()
        return reader

    async def iterator(self, shard_id: str, start: StartAt) -> str:
        """A shard iterator at ``start``."""
        params: dict[str, Any] = {"StreamARN": self.stream_arn, "ShardId": shard_id}
        if start.kind == "after":
            params["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            params["StartingSequenceNumber"] = start.sequence
        elif start.kind == "at_timestamp":
            params["ShardIteratorType"] = "AT_TIMESTAMP"
            params["Timestamp"] = start.timestamp or 0.0
        elif start.kind == "trim_horizon":
            params["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            params["ShardIteratorType"] = "LATEST"
        response = await self.aws.call("GetShardIterator", **params)
        iterator: str = response["ShardIterator"]
        return iterator

    # -- StreamSender --------------------------------------------------------------------------
    async def send(self, bodies: list[str], *, partition_key: str | None = None) -> int:
        """PutRecords; without a partition key each record gets a random one, which spreads
        them over the shards. Records the service throttles are put again (after the ones that
        went through: PutRecords keeps no order for records it refused)."""
        entries = [
            {"Data": body.encode(), "PartitionKey": partition_key or uuid.uuid4().hex}
            for body in bodies
        ]
        sent = 0
        for chunk in _chunks(entries):
            sent += await self._put(chunk)
        return sent

    async def _put(self, entries: list[dict[str, Any]]) -> int:
        pending = entries
        errors: list[str] = []
        for attempt in range(PUT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.1 * 2**attempt)
            response = await self.aws.call("PutRecords", StreamARN=self.stream_arn, Records=pending)
            if not response.get("FailedRecordCount"):
                return len(entries)
            results = response.get("Records", [])
            failed = [e for e, r in zip(pending, results, strict=True) if r.get("ErrorCode")]
            errors = [
                f"{r['ErrorCode']}: {r.get('ErrorMessage', '')}"
                for r in results
                if "ErrorCode" in r
            ]
            pending = failed
        raise SourceError(
            f"{self.what}: PutRecords: {len(entries) - len(pending)} of {len(entries)} records "
            f"accepted after {PUT_ATTEMPTS} attempts; last errors: {'; '.join(errors[:3])}"
        )


def _chunks(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """PutRecords-sized chunks: at most 500 records and 5 MB each."""
    chunks: list[list[dict[str, Any]]] = []
    chunk: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        entry_size = len(entry["Data"]) + len(entry["PartitionKey"].encode())
        if chunk and (len(chunk) == PUT_CHUNK or size + entry_size > PUT_BYTES):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(entry)
        size += entry_size
    if chunk:
        chunks.append(chunk)
    return chunks


class KinesisShardReader:
    """One shard, read forward with GetRecords and the iterator each call hands back."""

    start_point: str | None = None  # Kinesis names no sequence number for LATEST/AT_TIMESTAMP

    def __init__(self, stream: KinesisStream, shard_id: str, start: StartAt) -> None:
        self._stream = stream
        self._shard_id = shard_id
        self._start = start
        self._opened_at = time.time()
        self._template = stream.shape.shard_template(shard_id)
        self._iterator: str | None = None
        self._last: str | None = None  # the sequence number of the last record fetched
        self._buffer: list[StreamRecord] = []
        self._taken = 0  # records of the buffer handed out
        self._ended = False  # GetRecords returned no next iterator: the closed shard is done

    async def open(self) -> None:
        self._iterator = await self._stream.iterator(self._shard_id, self._start)

    async def close(self) -> None:
        """Nothing of its own: the client is the stream's."""

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        """Up to ``limit`` records; Kinesis cannot block, so ``wait_s`` is not used (the engine
        polls an idle shard every ``idle_poll_s``)."""
        behind: int | None = None
        if self._taken == len(self._buffer) and not self._ended:
            behind = await self._fetch()
        records = self._buffer[self._taken : self._taken + limit]
        self._taken += len(records)
        end = self._ended and self._taken == len(self._buffer)
        return ReadResult(records, end=end, behind_ms=behind)

    async def _fetch(self) -> int | None:
        """One GetRecords into the buffer; MillisBehindLatest."""
        stream = self._stream
        try:
            response = await self._get_records()
        except AwsCallError as exc:
            if exc.code != "ExpiredIteratorException":
                raise
            where = "after the last record read" if self._last else "at the reader's start"
            stream.log.info(
                f"shard iterator expired; reading on from a new one {where}",
                source=stream.stream_arn,
                shard=self._shard_id,
                sequence=self._last,
            )
            self._iterator = await stream.iterator(self._shard_id, self._resume_at())
            response = await self._get_records()
        raw = response.get("Records") or []
        self._buffer = self._records(raw)
        self._taken = 0
        if raw:
            self._last = raw[-1]["SequenceNumber"]
        self._iterator = response.get("NextShardIterator")
        self._ended = self._iterator is None
        behind = response.get("MillisBehindLatest")
        return None if behind is None else int(behind)

    async def _get_records(self) -> dict[str, Any]:
        return await self._stream.aws.call(
            "GetRecords",
            ShardIterator=self._iterator,
            Limit=FETCH_LIMIT,
            StreamARN=self._stream.stream_arn,
        )

    def _resume_at(self) -> StartAt:
        if self._last is not None:
            return StartAt.after(self._last)
        if self._start.kind == "latest":
            return StartAt("at_timestamp", timestamp=self._opened_at)
        return self._start

    def _records(self, raw: list[dict[str, Any]]) -> list[StreamRecord]:
        """Records for GetRecords' entries: straight to JSON through the shard's template
        (``Data`` is still the base64 the service sent, the arrival time its epoch seconds)."""
        template = self._template
        encode = _encode
        records = []
        append = records.append
        for entry in raw:
            sequence = entry["SequenceNumber"]
            key = entry["PartitionKey"]
            arrival_ms = round(entry["ApproximateArrivalTimestamp"] * 1000)
            seconds, millis = divmod(arrival_ms, 1000)
            raw_sequence = sequence.encode()
            encoded = template % (
                encode(key),
                raw_sequence,
                entry["Data"].encode(),
                b"%d" % seconds,
                b"%03d" % millis,
                raw_sequence,
                b"",
            )
            append(StreamRecord(sequence, key, arrival_ms / 1000, encoded))
        return records
