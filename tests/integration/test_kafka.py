"""kafka:// on the stream engine, against the tansu broker with real workers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tests.integration.kafka_harness import KafkaHarness, committed, create_topic, unique
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
