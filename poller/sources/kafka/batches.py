"""Kafka record batches decoded straight into the engine's records.

kafka-python turns every record of a fetch into two objects (its ``DefaultRecord``, then a
13-field ``ConsumerRecord``), reading batch fields through properties and calling two
deserializers for each record on the way; poller then read those objects once more to write
the §7.5 JSON. That was the largest CPU cost of a Kafka mapping, larger than everything else
in the daemon (bench/RESULTS.md, Kafka). Here the consumer's fetcher hands over
``StreamRecord``\\ s instead: a message-format-v2 batch is parsed from its bytes, each record
written into its partition's template as it is read. kafka-python still does everything
around the parsing: fetches, positions, CRC checks, decompression, pausing. Older batches
(message format v0/v1, from brokers before 0.11) go through kafka-python's own records.

This reaches into kafka-python's fetcher (``Fetcher.PartitionRecords``, one class per fetched
partition): ``install`` checks that the fetcher still has that shape and says so when it does
not, and the consumer then takes kafka-python's records as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError

from poller.sources.base import StreamRecord
from poller.sources.kafka.records import RecordEncoder, encode_record

_PARTITION_RECORDS = getattr(Fetcher, "PartitionRecords", None)


def _varint(buf: bytearray, pos: int) -> tuple[int, int]:
    """A zigzag varint, and the position after it."""
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")


def install(consumer: Any, encoder: RecordEncoder) -> bool:
    """Have ``consumer``'s polls return StreamRecords; False (nothing changed) when this
    kafka-python's fetcher is not the one this module knows."""
    fetcher = getattr(consumer, "_fetcher", None)
    records_class = partition_records_class(encoder)
    if records_class is None or not isinstance(fetcher, Fetcher):
        return False
    fetcher.PartitionRecords = records_class
    return True


def partition_records_class(encoder: RecordEncoder) -> type | None:
    """kafka-python's ``Fetcher.PartitionRecords`` made to yield StreamRecords, or None."""
    if _PARTITION_RECORDS is None or not callable(
        getattr(_PARTITION_RECORDS, "_unpack_records", None)
    ):
        return None
    return type(
        "PartitionStreamRecords", (_StreamRecordsMixin, _PARTITION_RECORDS), {"encoder": encoder}
    )


class _StreamRecordsMixin:
    """Put before kafka-python's ``Fetcher.PartitionRecords``; its attributes (fetch_offset,
    next_fetch_offset, leader_epoch, check_crcs, records_read, bytes_read, drain) are the ones
    that class keeps."""

    encoder: RecordEncoder
    fetch_offset: int
    next_fetch_offset: int
    leader_epoch: int
    check_crcs: bool
    records_read: int
    bytes_read: int
    drain: Any

    def _maybe_skip_record(self, record: Any) -> bool:
        return False  # _unpack_records skips what lies before the fetch offset itself

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[StreamRecord]:
        # The consumer that installs this class sets no deserializers: payloads stay bytes.
        last = None
        batch = records.next_batch()
        while batch is not None:
            last = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"Record batch for partition {tp} at offset {batch.base_offset} failed "
                    "crc check"
                )
            if batch.magic < 2:
                yield from self._legacy(tp, batch)
            else:
                self.leader_epoch = batch.leader_epoch
                if batch.is_control_batch:  # transaction markers: never the consumer's
                    self.next_fetch_offset = batch.next_offset
                else:
                    try:
                        yield from self._v2(tp, batch)
                    except (IndexError, ValueError) as exc:
                        raise CorruptRecordError(
                            f"Found invalid record structure in partition {tp} at offset "
                            f"{batch.base_offset}: {exc!r}"
                        ) from exc
            batch = records.next_batch()
        if last is not None and last.magic == 2:
            # A v2 batch keeps its last offset when compaction removed its last records: go on
            # after it, or the same batch would be fetched again and again.
            self.next_fetch_offset = last.next_offset
        self.drain()

    def _legacy(self, tp: Any, batch: Any) -> Iterator[StreamRecord]:
        templates = self.encoder.templates(tp.topic, tp.partition)
        fetch_offset = self.fetch_offset
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise CorruptRecordError(
                    f"Record for partition {tp} at offset {record.offset} failed crc check"
                )
            if record.offset < fetch_offset:
                continue
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield encode_record(
                templates,
                record.offset,
                record.timestamp,
                record.timestamp_type == 1,
                record.key,
                record.value,
                record.headers,
            )

    def _v2(self, tp: Any, batch: Any) -> Iterator[StreamRecord]:
        # Record => Length Attributes(int8) TimestampDelta OffsetDelta Key Value Headers, all
        # the numbers zigzag varints; Key, Value and a header's value are -1 when null.
        iter(batch)  # decompresses the records, where they are compressed
        buf: bytearray = batch._buffer
        pos: int = batch._pos
        count: int = batch.records_count
        base = batch.base_offset
        first_ts = batch.first_timestamp
        log_append = batch.timestamp_type == 1
        log_append_ts = batch.max_timestamp
        fetch_offset = self.fetch_offset
        templates = self.encoder.templates(tp.topic, tp.partition)
        varint = _varint
        read_from = pos
        for _ in range(count):
            length, pos = varint(buf, pos)
            body = pos
            pos += 1  # attributes: no record-level attribute is defined
            ts_delta, pos = varint(buf, pos)
            offset_delta, pos = varint(buf, pos)
            key_len, pos = varint(buf, pos)
            key = None
            if key_len >= 0:
                key = buf[pos : pos + key_len]
                pos += key_len
            value_len, pos = varint(buf, pos)
            value = None
            if value_len >= 0:
                value = buf[pos : pos + value_len]
                pos += value_len
            header_count, pos = varint(buf, pos)
            headers = None
            if header_count:
                headers, pos = _headers(buf, pos, header_count)
            if pos - body != length:
                raise ValueError(f"a record of {length} bytes read as {pos - body}")
            offset = base + offset_delta
            if offset < fetch_offset:
                continue  # the fetch began inside this batch
            timestamp = log_append_ts if log_append else first_ts + ts_delta
            self.next_fetch_offset = offset + 1
            yield encode_record(templates, offset, timestamp, log_append, key, value, headers)
        # kafka-python's fetch metrics, counted per batch here rather than per record
        self.records_read += count
        self.bytes_read += pos - read_from


def _headers(buf: bytearray, pos: int, count: int) -> tuple[list[tuple[str, bytes | None]], int]:
    if count < 0:
        raise ValueError(f"a record with {count} headers")
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        key_len, pos = _varint(buf, pos)
        if key_len < 0:
            raise ValueError(f"a header key of {key_len} bytes")
        name = buf[pos : pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = _varint(buf, pos)
        value = None
        if value_len >= 0:
            value = bytes(buf[pos : pos + value_len])
            pos += value_len
        headers.append((name, value))
    return headers, pos
