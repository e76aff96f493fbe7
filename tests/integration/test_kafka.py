"""kafka:// on the stream engine, against the tansu broker with real workers."""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from poller.sources.kafka import batches
from poller.sources.kafka.records import RecordEncoder
from tests.integration.kafka_harness import (
    KafkaHarness,
    committed,
    create_topic,
    read_topic,
    unique,
)
from tests.integration.stream_harness import until


async def test_records_are_delivered_in_order_per_partition(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("order")
    create_topic(kafka_bootstrap, topic, 2)
    h = KafkaHarness(kafka_bootstrap, tmp_path, topic, settings={"batch_size": 7})
    sent = h.produce([(f"k{i % 5}", f"m-{i}") for i in range(60)])
    async with h.running():
        await until(lambda: len(h.handled()) >= 60, 60, "every record handled")
    seen: dict[str, list[int]] = defaultdict(list)
    for record in h.handled():
        seen[record["shard"]].append(record["offset"])
        assert record["source"] == "SelfManagedKafka"
    expected: dict[str, list[int]] = defaultdict(list)
    for partition, offset in sent:
        expected[f"{topic}-{partition}"].append(offset)
    assert seen == {k: sorted(v) for k, v in expected.items()}
    got = committed(kafka_bootstrap, h.group, topic, 2)
    assert got == {p: len(expected[f"{topic}-{p}"]) for p in range(2)}


async def test_events_have_lambdas_kafka_shape(kafka_bootstrap: str, tmp_path: Path) -> None:
    """§7.5 exactly: records keyed TOPIC-PARTITION, key and value in base64 (left out when
    absent), headers as lists of byte values, the timestamp in ms and its type."""
    topic = unique("shape")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(kafka_bootstrap, tmp_path, topic, handler="event")
    when = int(time.time() * 1000) - 5000
    h.produce([("k1", "hello")], timestamp_ms=when, headers=[("trace", b"t1"), ("b", b"\xff")])
    h.produce([(None, "no key")], timestamp_ms=when + 1)
    async with h.running():
        await until(lambda: sum(len(e["records"][f"{topic}-0"]) for e in h.handled()) == 2, 30, "2")
    events = h.handled()
    for event in events:
        assert set(event) == {"eventSource", "bootstrapServers", "records"}
        assert event["eventSource"] == "SelfManagedKafka"
        assert event["bootstrapServers"] == kafka_bootstrap
        assert list(event["records"]) == [f"{topic}-0"]
    records = [r for e in events for r in e["records"][f"{topic}-0"]]
    assert records[0] == {
        "topic": topic,
        "partition": 0,
        "offset": 0,
        "timestamp": when,
        "timestampType": "CREATE_TIME",
        "key": base64.b64encode(b"k1").decode(),
        "value": base64.b64encode(b"hello").decode(),
        "headers": [{"trace": [116, 49]}, {"b": [255]}],
    }
    assert "key" not in records[1] and records[1]["headers"] == []
    assert base64.b64decode(records[1]["value"]) == b"no key"


async def test_tombstones_and_many_headers_are_delivered_as_they_are(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A record with a key and no value (a tombstone) and one with 300 headers, some of them
    empty or binary, reach the handler exactly as the broker holds them."""
    topic = unique("odd")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(kafka_bootstrap, tmp_path, topic, handler="event")
    headers = [(f"h{i}", bytes([i % 256]) * (i % 4)) for i in range(300)]
    h.produce([("gone", None)])
    h.produce([(None, "many")], headers=headers)
    async with h.running():
        await until(lambda: sum(len(e["records"][f"{topic}-0"]) for e in h.handled()) == 2, 30, "2")
    records = [r for e in h.handled() for r in e["records"][f"{topic}-0"]]
    assert base64.b64decode(records[0]["key"]) == b"gone"
    assert "value" not in records[0] and records[0]["headers"] == []
    assert "key" not in records[1]
    assert records[1]["headers"] == [{name: list(value)} for name, value in headers]


async def test_order_per_key_holds_over_a_long_run_with_parallel_lanes(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The handler itself checks that no record of a key comes after a later one; three
    partitions, ParallelizationFactor 3: batches of one partition run at once."""
    topic = unique("long")
    create_topic(kafka_bootstrap, topic, 3)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="ordered",
        settings={"batch_size": 20, "parallelization_factor": 3},
    )
    total = 3000
    sent = h.produce([(f"key{i % 17}", f"v-{i}") for i in range(total)])
    async with h.running() as runner:
        await until(
            lambda: len({(r["shard"], r["offset"]) for r in h.handled()}) == total, 120, "all"
        )
        ends = {f"{topic}-{p}": 0 for p in range(3)}
        for partition, offset in sent:
            ends[f"{topic}-{partition}"] = max(ends[f"{topic}-{partition}"], offset + 1)
        await until(
            lambda: (
                committed(kafka_bootstrap, h.group, topic, 3)
                == {p: ends[f"{topic}-{p}"] for p in range(3)}
            ),
            30,
            "every offset committed",
        )
        assert runner.metrics.concurrency_target._value.get() == 9  # type: ignore[attr-defined]
    assert not (tmp_path / "handled.jsonl.disorder").exists()
    requests = {r["request"] for r in h.handled()}
    assert len(requests) >= total / 20


async def test_a_poison_record_is_bisected_out_to_a_kafka_topic_and_the_partition_flows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, dead = unique("poison"), unique("dead")
    create_topic(kafka_bootstrap, topic, 1)
    create_topic(kafka_bootstrap, dead, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="poison",
        destination=f"kafka://{dead}",  # the source's own cluster
        settings={"batch_size": 16, "bisect": True, "max_retries": 1},
    )
    h.produce([(f"k{i}", f"m{i}") for i in range(9)])
    h.produce([("bad-key", "poison")])
    h.produce([(f"k{i}", f"m{i}") for i in range(9, 16)])
    async with h.running() as runner:
        await until(lambda: len({r["offset"] for r in h.handled()}) == 16, 60, "the rest handled")
        h.produce([("late", "after")])
        await until(lambda: any(r["body"] == "after" for r in h.handled()), 30, "still flowing")
        await until(
            lambda: committed(kafka_bootstrap, h.group, topic, 1) == {0: 18}, 30, "committed"
        )
        assert runner.metrics.bisected._value.get() >= 1  # type: ignore[attr-defined]
    assert 9 not in {r["offset"] for r in h.handled()}
    [message] = read_topic(kafka_bootstrap, dead, 1)
    assert message.key == b"bad-key"
    failure = json.loads(message.value)
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] >= 2
    assert failure["responseContext"]["functionError"] == "Unhandled"
    info = failure["KafkaBatchInfo"]
    assert info["recordInfo"]["offset"] == "9" and info["batchSize"] == 1
    assert info["bootstrapServers"] == kafka_bootstrap
    [record] = failure["payload"]["records"][f"{topic}-0"]
    assert base64.b64decode(record["value"]) == b"poison" and record["offset"] == 9


async def test_partial_batch_responses_retry_from_the_first_failure(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("partial")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="partial",
        destination="file",
        settings={"batch_size": 10, "report_batch_item_failures": True, "max_retries": 2},
    )
    h.produce([(None, "g0"), (None, "g1"), (None, "g2"), (None, "bad3"), (None, "g4")])
    async with h.running():
        await until(lambda: h.given_up(), 60, "the failing record given up")
        await until(lambda: committed(kafka_bootstrap, h.group, topic, 1) == {0: 5}, 30, "5")
    batches: dict[str, list[int]] = defaultdict(list)
    for record in h.handled():
        batches[record["request"]].append(record["offset"])
    # The whole batch, then twice from the failed record: the ones before it are done.
    assert list(batches.values()) == [[0, 1, 2, 3, 4], [3, 4], [3, 4]]
    [failure] = h.given_up()
    assert failure["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 3
    assert failure["responseContext"]["functionError"] is None
    info = failure["KafkaBatchInfo"]
    assert info["batchSize"] == 2 and info["eventSourceArn"] == h.uri
    shard = info["recordsInfo"][f"{topic}-0"]
    assert (shard["firstRecordOffset"], shard["lastRecordOffset"]) == ("3", "4")


async def test_an_identifier_not_in_the_batch_fails_the_whole_batch(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("bogus")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="bogus",
        destination="file",
        settings={"report_batch_item_failures": True, "max_retries": 0},
    )
    h.produce([(None, "x"), (None, "y")])
    async with h.running():
        await until(lambda: h.given_up(), 30, "the batch given up")
    info = h.given_up()[0]["KafkaBatchInfo"]["recordsInfo"][f"{topic}-0"]
    assert (info["firstRecordOffset"], info["lastRecordOffset"]) == ("0", "1")
    assert any("invalid response" in r.get("message", "") for r in h.logs())


async def test_retries_then_record_age(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Records already too old are given up without an invoke; a failing one is retried
    MaximumRetryAttempts times and then given up."""
    topic = unique("age")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="failing",
        destination="file",
        settings={"max_record_age_s": 60.0, "max_retries": 2, "batch_size": 1},
    )
    h.produce([(None, "old")], timestamp_ms=int(time.time() * 1000) - 120_000)
    h.produce([(None, "fresh")])
    async with h.running():
        await until(lambda: len(h.given_up()) == 2, 30, "both given up")
    old, fresh = h.given_up()
    assert old["requestContext"]["condition"] == "RecordAgeExceeded"
    assert "responseContext" not in old and old["requestContext"]["approximateInvokeCount"] == 1
    assert fresh["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert fresh["requestContext"]["approximateInvokeCount"] == 3
    assert [r["body"] for r in h.handled()] == ["fresh"] * 3


async def test_a_record_that_ages_out_while_retrying_is_given_up(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("aging")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        handler="failing",
        destination="file",
        settings={"max_record_age_s": 1.0, "max_retries": -1},
    )
    async with h.running() as runner:
        # Sent once the group join is done: younger than 1 s when first read.
        await until(lambda: runner.processors, 30, "the partition assigned")
        h.produce([(None, "x")])
        await until(lambda: h.given_up(), 30, "aged out")
    [failure] = h.given_up()
    assert failure["requestContext"]["condition"] == "RecordAgeExceeded"
    assert failure["requestContext"]["approximateInvokeCount"] == len(h.handled()) > 1


async def test_a_handler_slower_than_the_session_timeout_causes_no_rebalance(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """8 s per batch against a 6 s session timeout and a 6 s max poll interval: the
    partition is paused while its batch runs and the consumer keeps polling."""
    topic = unique("slow")
    create_topic(kafka_bootstrap, topic, 1)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        environment={"SLEEP": "8"},
        settings={"batch_size": 1},
    )
    h.produce([(None, "a"), (None, "b")])
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 2, 60, "both handled")
        await until(lambda: committed(kafka_bootstrap, h.group, topic, 1) == {0: 2}, 20, "2")
        assert runner.metrics.rebalances._value.get() == 1  # type: ignore[attr-defined]
    assert [r["body"] for r in h.handled()] == ["a", "b"]
    assert not any("revoked" in r.get("message", "") for r in h.logs())


async def test_offset_lag_is_reported_and_falls_to_zero(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("lag")
    create_topic(kafka_bootstrap, topic, 2)
    h = KafkaHarness(
        kafka_bootstrap,
        tmp_path,
        topic,
        environment={"SLEEP": "0.3"},
        settings={"batch_size": 5},
    )
    h.produce([(f"k{i}", f"m{i}") for i in range(80)])
    seen: list[float] = []
    async with h.running() as runner:
        metrics = runner.metrics

        def lag() -> float:
            value: float = metrics.offset_lag_sum._value.get()  # type: ignore[attr-defined]
            seen.append(value)
            return value

        await until(lambda: lag() > 0, 30, "a lag reported")
        await until(lambda: len(h.handled()) >= 80 and lag() == 0, 60, "the lag back to 0")
        per_partition = [metrics.offset_lag(f"{topic}-{p}")._value.get() for p in range(2)]  # type: ignore[attr-defined]
        assert per_partition == [0, 0]
        assert metrics.offset_lag_max._value.get() == 0  # type: ignore[attr-defined]
    assert max(seen) <= 80


async def test_a_revoked_partition_settles_and_commits_its_batch_before_it_is_released(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A second member joins while batches of both partitions are in the handler: the first
    lets them finish and commits them before handing a partition over, so the new owner does
    not run them again (no record is handled twice)."""
    topic, group = unique("handover"), unique("group")
    create_topic(kafka_bootstrap, topic, 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    common: dict[str, Any] = {
        "group": group,
        "environment": {"SLEEP": "1.5"},
        "settings": {"batch_size": 1},
    }
    a = KafkaHarness(kafka_bootstrap, tmp_path / "a", topic, **common)
    b = KafkaHarness(kafka_bootstrap, tmp_path / "b", topic, **common)
    for partition in (0, 1):
        a.produce([(None, f"p{partition}-{i}") for i in range(4)], partition=partition)

    def handled() -> list[tuple[str, int]]:
        return [(r["shard"], r["offset"]) for r in a.handled() + b.handled()]

    async with a.running() as first:
        await until(lambda: len(first.processors) == 2 and a.handled(), 30, "a busy on both")
        async with b.running() as second:
            await until(lambda: len(handled()) >= 8, 60, "every record handled")
            await until(
                lambda: committed(kafka_bootstrap, group, topic, 2) == {0: 4, 1: 4}, 30, "4, 4"
            )
            assert len(first.processors) == 1 and len(second.processors) == 1
    assert sorted(handled()) == sorted(set(handled()))  # none twice
    assert any("before handing them over" in r.get("message", "") for r in a.logs())


def _read_all(bootstrap: str, topic: str, count: int, *, decoded: bool) -> list[Any]:
    """Every record of partition 0 as StreamRecords: parsed by poller's batches.py, or
    kafka-python's ConsumerRecords through the encoder."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    encoder = RecordEncoder()
    if decoded:
        assert batches.install(consumer, encoder)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            for raw in consumer.poll(timeout_ms=500).values():
                got.extend(raw if decoded else encoder.encode(raw))
    finally:
        consumer.close()
    return got


def test_the_brokers_batches_parse_as_kafka_python_parses_them(kafka_bootstrap: str) -> None:
    """What the broker sends, plain and gzip-compressed, small and large, keyed or not, with
    headers: poller's own parsing gives the records kafka-python's gives, byte for byte."""
    topic = unique("parse")
    create_topic(kafka_bootstrap, topic, 1)
    messages: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (f"k{i % 13}".encode() if i % 5 else None, b"v" * (i % 300), []) for i in range(2000)
    ]
    messages[7] = (b"tomb", None, [])
    messages[8] = (None, b"headed", [("h", b"\x00\xff"), ("e", b"")])
    messages[9] = (b"big", b"\xab" * 50_000, [])
    for compression in (None, "gzip"):
        producer = KafkaProducer(
            bootstrap_servers=kafka_bootstrap, linger_ms=20, compression_type=compression
        )
        for key, value, headers in messages:
            producer.send(topic, key=key, value=value, headers=headers, partition=0)
        producer.flush(30)
        producer.close(10)
    total = 2 * len(messages)
    fast = _read_all(kafka_bootstrap, topic, total, decoded=True)
    reference = _read_all(kafka_bootstrap, topic, total, decoded=False)
    assert len(fast) == len(reference) == total
    assert [r.sequence for r in fast] == [str(i) for i in range(total)]
    assert [(r.sequence, r.partition_key, r.arrival, r.encoded) for r in fast] == [
        (r.sequence, r.partition_key, r.arrival, r.encoded) for r in reference
    ]
