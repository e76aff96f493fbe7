"""The Kafka event of ESM_SEMANTICS.md §7.5, built once per record as JSON bytes, and what the
engine needs around it: the envelope of one partition's batch, the partial batch response's
identifiers (§5.3) and the on-failure batch description (§5.4)."""

from __future__ import annotations

import binascii
import time
from typing import Any, Final

import msgspec

from poller.sources.base import StreamRecord

_encode = msgspec.json.Encoder().encode
TIMESTAMP_TYPES: Final = ("CREATE_TIME", "LOG_APPEND_TIME")
EVENT_SOURCE: Final = "SelfManagedKafka"


def shard_id(topic: str, partition: int) -> str:
    """A partition's shard id: Lambda's ``TOPIC-PARTITION`` key of the event's records."""
    return f"{topic}-{partition}"


def iso_ms(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class RecordEncoder:
    """Kafka records to StreamRecords: each payload is base64-encoded once, straight into the
    record's JSON through templates made once per partition (no dict on the way). The records
    come from ``batches.py`` (parsed from the fetched bytes) or, where that cannot be installed,
    as kafka-python's ConsumerRecords (``encode``)."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, int], tuple[bytes, bytes]] = {}

    def templates(self, topic: str, partition: int) -> tuple[bytes, bytes]:
        """The partition's templates for ``encode_record``: the general one, and the one of the
        usual record (key and value, no headers, CREATE_TIME) with everything else already in
        it."""
        templates = self._templates.get((topic, partition))
        if templates is None:
            head = (
                b'{"topic":'
                + _encode(topic).replace(b"%", b"%%")
                + b',"partition":%d' % partition
                + b',"offset":%d,"timestamp":%d,"timestampType":"'
            )
            templates = self._templates[(topic, partition)] = (
                head + b'%b"%b%b,"headers":%b}',
                head + b'CREATE_TIME","key":"%b","value":"%b","headers":[]}',
            )
        return templates

    def encode(self, raw: list[Any]) -> list[StreamRecord]:
        """kafka-python's ConsumerRecords of one partition."""
        if not raw:
            return []
        templates = self.templates(raw[0].topic, raw[0].partition)
        return [
            encode_record(
                templates, r.offset, r.timestamp, r.timestamp_type == 1, r.key, r.value, r.headers
            )
            for r in raw
        ]


def encode_record(
    templates: tuple[bytes, bytes],
    offset: int,
    timestamp: int,
    log_append_time: bool,
    key: bytes | bytearray | None,
    value: bytes | bytearray | None,
    headers: list[tuple[str, bytes | None]] | None,
) -> StreamRecord:
    """One record through its partition's templates (``RecordEncoder.templates``)."""
    b64 = binascii.b2a_base64
    general, usual = templates
    if key is not None and value is not None and not headers and not log_append_time:
        key_b64 = b64(key, newline=False)
        encoded = usual % (offset, timestamp, key_b64, b64(value, newline=False))
        return StreamRecord(str(offset), key_b64.decode(), timestamp / 1000, encoded)
    key_b64 = b64(key, newline=False) if key is not None else None
    encoded = general % (
        offset,
        timestamp,
        b"LOG_APPEND_TIME" if log_append_time else b"CREATE_TIME",
        b',"key":"' + key_b64 + b'"' if key_b64 is not None else b"",
        b',"value":"' + b64(value, newline=False) + b'"' if value is not None else b"",
        _headers(headers) if headers else b"[]",
    )
    # A record without a key goes to the lane of the other keyless ones: their order within
    # the partition holds whatever the ParallelizationFactor.
    partition_key = key_b64.decode() if key_b64 is not None else ""
    return StreamRecord(str(offset), partition_key, timestamp / 1000, encoded)


def _headers(headers: list[tuple[str, bytes | None]]) -> bytes:
    """Lambda's headers: a list of one-member objects, each value a list of byte values."""
    return _encode([{name: list(value or b"")} for name, value in headers])


def envelope(bootstrap: str, shard: str) -> tuple[bytes, bytes]:
    """What goes before and after the records of a batch of one partition (§7.5)."""
    head = (
        b'{"eventSource":"'
        + EVENT_SOURCE.encode()
        + b'","bootstrapServers":'
        + _encode(bootstrap)
        + b',"records":{'
        + _encode(shard)
        + b":["
    )
    return head, b"]}}"


def item_sequence(shard: str, identifier: Any) -> str | None:
    """The offset a §5.3 itemIdentifier names, as the record's sequence; None when it is not
    ``{"partition": "TOPIC-N", "offset": N}`` for this batch's partition (the whole batch then
    fails, as Lambda does)."""
    if not isinstance(identifier, dict) or set(identifier) != {"partition", "offset"}:
        return None
    offset = identifier["offset"]
    if identifier["partition"] != shard:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int | str):
        return None
    text = str(offset)
    return text if text.isdigit() else None


def batch_info(
    bootstrap: str, source_arn: str, shard: str, records: list[StreamRecord], overhead: int
) -> dict[str, Any]:
    """``KafkaBatchInfo`` of an on-failure record (§5.4)."""
    first, last = records[0], records[-1]
    return {
        "batchSize": len(records),
        "eventSourceArn": source_arn,
        "bootstrapServers": bootstrap,
        "payloadSize": overhead + sum(r.size for r in records) + len(records) - 1,
        "recordsInfo": {
            shard: {
                "firstRecordOffset": first.sequence,
                "lastRecordOffset": last.sequence,
                "firstRecordTimestamp": iso_ms(first.arrival),
                "lastRecordTimestamp": iso_ms(last.arrival),
            }
        },
    }
