"""Record batches parsed by poller (sources/kafka/batches.py) against kafka-python's own
parsing of the same bytes, encoded by the general path: the same records, byte for byte."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords, MemoryRecordsBuilder
from kafka.record.default_records import DefaultRecordBase
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition

from poller.sources.kafka.batches import install, partition_records_class
from poller.sources.kafka.records import RecordEncoder

TP = TopicPartition("orders", 3)
RecordSpec = tuple[int | None, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def _batch(
    base: int,
    records: list[RecordSpec],
    *,
    magic: int = 2,
    compression: int = 0,
    gaps: int = 0,
) -> bytes:
    builder = MemoryRecordsBuilder(magic, compression, batch_size=1 << 22, offset=base)
    for i, (timestamp, key, value, headers) in enumerate(records):
        if gaps and i:
            builder.skip(gaps)  # offsets a compaction removed
        builder.append(timestamp, key, value, headers if magic == 2 else None)
    builder.close()
    return bytes(builder.buffer())


def _with_attributes(batch: bytes, mask: int) -> bytes:
    """A v2 batch with attribute bits only a broker sets (LOG_APPEND_TIME, control), its CRC
    made right again."""
    buf = bytearray(batch)
    at = DefaultRecordBase.ATTRIBUTES_OFFSET
    (attributes,) = struct.unpack_from(">h", buf, at)
    struct.pack_into(">h", buf, at, attributes | mask)
    struct.pack_into(">I", buf, DefaultRecordBase.CRC_OFFSET, calc_crc32c(memoryview(buf)[at:]))
    return bytes(buf)


def _both(data: bytes, fetch_offset: int) -> tuple[list[Any], list[Any], int, int]:
    """(poller's records, kafka-python's encoded by the general path, next offsets of each)."""
    ours = partition_records_class(RecordEncoder())
    assert ours is not None
    fast = ours(fetch_offset, TP, MemoryRecords(data))
    reference = Fetcher.PartitionRecords(fetch_offset, TP, MemoryRecords(data))
    fast_records = fast.take()
    reference_records = RecordEncoder().encode(reference.take())
    return fast_records, reference_records, fast.next_fetch_offset, reference.next_fetch_offset


def _fields(records: list[Any]) -> list[tuple[str, str, float, bytes]]:
    return [(r.sequence, r.partition_key, r.arrival, r.encoded) for r in records]


VARIED: list[RecordSpec] = [
    (1_700_000_000_000, b"k1", b"v" * 100, []),
    (1_700_000_000_005, None, b"no key", []),
    (1_700_000_000_009, b"tomb", None, []),
    (1_700_000_000_010, None, None, []),
    (1_700_000_090_000, b"k2", b"\x00\xff" * 300, [("h", b"hv"), ("empty", b""), ("null", None)]),
    (1_700_000_090_001, b"k" * 200, b"x" * 20_000, []),  # multi-byte lengths
    (1_699_999_999_000, b"k3", b"", []),  # a timestamp before the batch's first
]


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_v2_batches_give_the_records_kafka_python_gives(compression: int) -> None:
    data = (
        _batch(40, VARIED, compression=compression)
        + _batch(47, VARIED[:3], compression=compression, gaps=2)  # 47, 50, 53 (compacted)
        + _batch(60, [(1_700_000_100_000 + i, b"k%d" % (i % 7), b"%d" % i, []) for i in range(300)])
    )
    fast, reference, fast_next, reference_next = _both(data, 40)
    assert len(fast) == len(VARIED) + 3 + 300
    assert _fields(fast) == _fields(reference)
    assert fast_next == reference_next == 360


def test_a_fetch_that_starts_inside_a_batch_skips_the_records_before_it() -> None:
    data = _batch(40, VARIED) + _batch(47, VARIED[:2])
    fast, reference, fast_next, _ = _both(data, 44)
    assert [r.sequence for r in fast] == ["44", "45", "46", "47", "48"]
    assert _fields(fast) == _fields(reference)
    assert fast_next == 49


def test_log_append_time_batches_carry_the_brokers_time() -> None:
    data = _with_attributes(_batch(0, VARIED), DefaultRecordBase.TIMESTAMP_TYPE_MASK)
    fast, reference, _, _ = _both(data, 0)
    assert _fields(fast) == _fields(reference)
    assert all(b'"timestampType":"LOG_APPEND_TIME"' in r.encoded for r in fast)
    assert {r.arrival for r in fast} == {1_700_000_090_001 / 1000}  # the batch's max timestamp


def test_control_batches_are_skipped_but_move_the_position() -> None:
    control = _with_attributes(_batch(5, VARIED[:1]), DefaultRecordBase.CONTROL_MASK)
    fast, reference, fast_next, reference_next = _both(_batch(0, VARIED[:5]) + control, 0)
    assert [r.sequence for r in fast] == ["0", "1", "2", "3", "4"]
    assert _fields(fast) == _fields(reference)
    assert fast_next == reference_next == 6


def test_legacy_batches_go_through_kafka_pythons_records() -> None:
    old = [(1_600_000_000_000 + i, b"k" if i % 2 else None, b"v%d" % i, []) for i in range(5)]
    fast, reference, fast_next, reference_next = _both(_batch(10, old, magic=1), 12)
    assert [r.sequence for r in fast] == ["12", "13", "14"]
    assert _fields(fast) == _fields(reference)
    assert fast_next == reference_next == 15


def test_a_corrupt_batch_is_reported_not_parsed() -> None:
    ours = partition_records_class(RecordEncoder())
    assert ours is not None
    good = bytearray(_batch(0, VARIED[1:3]))
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="crc"):
        ours(0, TP, MemoryRecords(bytes(bad_crc))).take()
    # A record longer than its length says, with the CRC made right: the structure is checked.
    at = DefaultRecordBase.HEADER_STRUCT.size
    assert good[at] < 0x80  # the first record's one-byte length
    good[at] -= 2
    struct.pack_into(
        ">I",
        good,
        DefaultRecordBase.CRC_OFFSET,
        calc_crc32c(memoryview(good)[DefaultRecordBase.ATTRIBUTES_OFFSET :]),
    )
    with pytest.raises(CorruptRecordError, match="invalid record structure"):
        ours(0, TP, MemoryRecords(bytes(good))).take()


def test_a_fetcher_of_another_shape_is_left_as_it_is() -> None:
    class NotAConsumer:
        _fetcher = object()

    consumer = NotAConsumer()
    assert install(consumer, RecordEncoder()) is False
    assert type(consumer._fetcher) is object
