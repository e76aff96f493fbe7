"""Drain a Kafka topic with a poller kafka:// mapping, beside a raw kafka-python consumer loop.

    python bench/kafka.py [--records 200000] [--partitions 4] [--repeat 3]

Loads N 100-byte records (keys spread over the partitions) into one topic on a private tansu
broker, then times, with a fresh consumer group each time:
  * raw: one kafka-python KafkaConsumer in the group looping poll() / commit() until every
    record was returned (what a hand-written consumer gets, with no processing at all);
  * poller: a real `poller run` daemon with a kafka:// mapping (BatchSize 100, TRIM_HORIZON,
    no batching window) and a no-op handler, from the group's first committed offset until the
    committed offsets reach the end of every partition. The records settled before the first
    commit are not counted, so the group join, daemon start-up and cold starts stay out, as the
    raw loop's join is left out too (its clock starts at its first record).
Both use the same client settings (session 6 s, heartbeat 1 s, max poll interval 6 s: tansu
holds a join for half the session timeout; no limit on records per poll, as poller's consumer).
Runs alternate which goes first; prints records/s, the ratio per run and the median ratio, and
the CPU the daemon and its workers used per record.
Target (issue): >= 0.6x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# This file is bench/kafka.py: with its directory first on the path, "import kafka" would
# import it again instead of kafka-python.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from poller.sources.kafka.consumer import UNLIMITED_POLL_RECORDS  # noqa: E402

sys.path.append(str(BENCH))
from redis_queue import children, cpu_seconds, cpu_used  # noqa: E402

from tests.servers import TansuServer, free_port  # noqa: E402

BODY = b"x" * 100
BATCH = 100
TIMINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 6000,
}


def load(bootstrap: str, topic: str, partitions: int, records: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024, acks=1
    )
    try:
        for i in range(records):
            producer.send(topic, key=f"k{i % 997}".encode(), value=BODY)
        producer.flush(120)
    finally:
        producer.close(30)


def raw_drain(bootstrap: str, topic: str, records: int) -> float:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=UNLIMITED_POLL_RECORDS,  # as poller's consumer polls
        **TIMINGS,
    )
    try:
        seen = 0
        started: float | None = None
        while seen < records:
            batches = consumer.poll(timeout_ms=200)
            if batches and started is None:
                started = time.perf_counter()
            for batch in batches.values():
                seen += len(batch)
            if batches:
                consumer.commit()
        assert started is not None
        return time.perf_counter() - started
    finally:
        consumer.close(autocommit=False)


def committed_total(watcher: KafkaConsumer, partitions: list[TopicPartition]) -> int:
    """The group's committed offsets, summed (a consumer that never joins the group)."""
    return sum(watcher.committed(tp) or 0 for tp in partitions)


def poller_drain(
    bootstrap: str, topic: str, partitions: int, records: int, workdir: Path, tag: str
) -> tuple[float, int, dict[str, float]]:
    """(seconds, records drained in them, CPU seconds by process kind)."""
    port = free_port()
    group = f"poller-{uuid.uuid4().hex[:8]}"
    (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")
    config = workdir / f"{tag}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"
        log_level = "warning"
        memory_mb = 8192

        [state]
        url = "sqlite:///{workdir / f"state-{tag}.db"}"

        [kafka]
        session_timeout_ms = {TIMINGS["session_timeout_ms"]}
        heartbeat_interval_ms = {TIMINGS["heartbeat_interval_ms"]}
        max_poll_interval_ms = {TIMINGS["max_poll_interval_ms"]}

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        code_path = "{workdir}"
        # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
        inherit_environment = ["PYTHONPATH"]

        [[mappings]]
        name = "bench"
        function_name = "noop"
        event_source_arn = "kafka://{bootstrap}/{topic}"
        starting_position = "TRIM_HORIZON"
        consumer_group_id = "{group}"
        batch_size = {BATCH}
        maximum_batching_window_in_seconds = 0
        """
        )
    )
    watcher = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    log = (workdir / f"daemon-{tag}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started: float | None = None
    counted = 0
    cpu_before: list[dict[int, float]] = []
    try:
        while True:
            now = time.perf_counter()
            done = committed_total(watcher, tps)
            if started is None and done:
                started = now
                counted = records - done
                cpu_before = [cpu_seconds([proc.pid]), cpu_seconds(children(proc.pid))]
            if started is not None and done >= records:
                break
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {log.name}")
            time.sleep(0.1)
        elapsed = now - started
        cpu_after = [cpu_seconds([proc.pid]), cpu_seconds(children(proc.pid))]
        cpu = {
            name: cpu_used(before, after)
            for name, before, after in zip(
                ("daemon", "workers"), cpu_before, cpu_after, strict=True
            )
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        watcher.close(autocommit=False)
    return elapsed, counted, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="raw/poller pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = TansuServer(workdir / "tansu")
        server.start()
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        print(
            f"tansu on {server.bootstrap}; {args.records} records of {len(BODY)} bytes over "
            f"{args.partitions} partitions; batch {BATCH}; {os.cpu_count()} CPUs"
        )
        print(
            f"{'run':>3} {'raw rec/s':>11} {'poller rec/s':>13} {'ratio':>6}  "
            "poller CPU per record: daemon / workers"
        )
        results = []
        ratios = []
        try:
            load(server.bootstrap, topic, args.partitions, args.records)
            for run in range(args.repeat):
                raw_first = run % 2 == 0
                if raw_first:
                    raw_s = raw_drain(server.bootstrap, topic, args.records)
                poller_s, drained, cpu = poller_drain(
                    server.bootstrap, topic, args.partitions, args.records, workdir, f"run-{run}"
                )
                if not raw_first:
                    raw_s = raw_drain(server.bootstrap, topic, args.records)
                raw_rate = args.records / raw_s
                poller_rate = drained / poller_s
                ratios.append(poller_rate / raw_rate)
                per = {k: v / drained * 1e6 for k, v in cpu.items()}
                print(
                    f"{run + 1:>3} {raw_rate:>11,.0f} {poller_rate:>13,.0f} "
                    f"{poller_rate / raw_rate:>5.2f}x  {per['daemon']:.1f} us / "
                    f"{per['workers']:.1f} us",
                    flush=True,
                )
                results.append(
                    {
                        "run": run + 1,
                        "raw_per_s": raw_rate,
                        "poller_per_s": poller_rate,
                        "cpu_us_per_record": per,
                    }
                )
            print(
                f"median ratio {statistics.median(ratios):.2f}x "
                f"[{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} runs; target >= 0.6x"
            )
        finally:
            server.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
