"""The stream engine over a real Kafka-compatible broker (tansu) and real worker processes,
in-process: what the handler saw is in a file, what the destination got in another.

tansu holds a consumer-group join for about half the session timeout, so the consumers here use
short timeouts: a join takes about 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from poller.config import Config, FunctionConfig, KafkaConfig
from poller.engine.destinations import Destination, FileDestination, open_destination
from poller.engine.stream import StreamRunner, StreamSettings
from poller.logs import JsonLog
from poller.mappings import create_mapping
from poller.metrics import MappingMetrics
from poller.runtime.pool import Runtime
from poller.sources import kafka as kafka_source
from poller.sources.base import TRIM_HORIZON, SourceContext
from poller.state.sqlite import SqliteStore

GROUP_TIMINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 6000,
}

HANDLERS = textwrap.dedent(
    """
    import base64, json, os, time

    def _bodies(event):
        for key, records in event["records"].items():
            for r in records:
                yield key, r, base64.b64decode(r["value"]).decode() if "value" in r else None

    def _note(event, context, **extra):
        with open(os.environ["OUT"], "a") as f:
            for key, r, body in _bodies(event):
                f.write(json.dumps({
                    "shard": key, "offset": r["offset"], "body": body,
                    "key": base64.b64decode(r["key"]).decode() if "key" in r else None,
                    "request": context.aws_request_id, "source": event["eventSource"],
                    **extra,
                }) + "\\n")

    def ok(event, context):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        _note(event, context)

    def event(event, context):
        with open(os.environ["OUT"], "a") as f:
            f.write(json.dumps(event) + "\\n")

    def ordered(event, context):
        # Checks order itself: a record of a key older than one seen before is noted. One file
        # per key: one key is in one lane, so no two invokes touch a file at once.
        for key, r, body in _bodies(event):
            k = base64.b64decode(r["key"]).decode() if "key" in r else key
            n = int(body.split("-")[-1])
            path = os.environ["OUT"] + ".last." + k
            last = int(open(path).read()) if os.path.exists(path) else -1
            if n < last:
                with open(os.environ["OUT"] + ".disorder", "a") as f:
                    f.write(f"{k} {n} after {last}\\n")
            with open(path, "w") as f:
                f.write(str(n))
        _note(event, context)

    def poison(event, context):
        if any(b and b.startswith("poison") for _, _, b in _bodies(event)):
            raise ValueError("poison in the batch")
        _note(event, context)

    def partial(event, context):
        failures = []
        for key, r, body in _bodies(event):
            if body.startswith("bad"):
                failures.append({"itemIdentifier": {"partition": key, "offset": r["offset"]}})
        _note(event, context)
        return {"batchItemFailures": failures}

    def bogus(event, context):
        _note(event, context)
        key = next(iter(event["records"]))
        return {"batchItemFailures": [{"itemIdentifier": {"partition": key, "offset": 999999}}]}

    def failing(event, context):
        _note(event, context)
        raise RuntimeError("always")
    """
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[str | None, str | None]],
    *,
    partition: int | None = None,
    timestamp_ms: int | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Send (key, value) pairs; returns each one's (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    try:
        futures = [
            producer.send(
                topic,
                key=None if key is None else key.encode(),
                value=None if value is None else value.encode(),
                partition=partition,
                timestamp_ms=timestamp_ms,
                headers=headers,
            )
            for key, value in messages
        ]
        producer.flush(30)
        return [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]
    finally:
        producer.close(10)


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def read_topic(bootstrap: str, topic: str, count: int, seconds: float = 30) -> list[Any]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    got: list[Any] = []
    try:
        deadline = time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
    finally:
        consumer.close()
    return got


@dataclass
class KafkaHarness:
    bootstrap: str
    tmp: Path
    topic: str
    handler: str = "ok"
    group: str = field(default_factory=lambda: unique("group"))
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    destination: str | None = None  # "file" or a kafka:// URI
    mapping_parameters: dict[str, Any] = field(default_factory=dict)
    log_stream: io.BytesIO = field(default_factory=io.BytesIO)
    log: JsonLog | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"kafka://{self.bootstrap}/{self.topic}"

    @property
    def out(self) -> Path:
        return self.tmp / "handled.jsonl"

    @property
    def failures(self) -> Path:
        return self.tmp / "failures.jsonl"

    def handled(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        # Handlers may be writing meanwhile: a line without its newline is not complete yet.
        lines = self.out.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines]

    def given_up(self) -> list[dict[str, Any]]:
        if not self.failures.exists():
            return []
        return [json.loads(line) for line in self.failures.read_text().splitlines()]

    def logs(self) -> list[dict[str, Any]]:
        if self.log is not None:
            self.log.flush()  # info and debug records wait up to FLUSH_DELAY_S in its buffer
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]

    def produce(self, messages: list[tuple[str | None, str | None]], **options: Any) -> list[Any]:
        return produce(self.bootstrap, self.topic, messages, **options)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StreamRunner]:
        (self.tmp / "kafka_handlers.py").write_text(HANDLERS)
        function = FunctionConfig(
            name="f",
            handler=f"kafka_handlers.{self.handler}",
            code_path=str(self.tmp),
            timeout_s=30,
            environment={"OUT": str(self.out), **self.environment},
        )
        log = self.log = JsonLog(self.log_stream, level="debug")
        runtime = Runtime([function], memory_budget_mb=4096, log=log)
        store = SqliteStore(f"sqlite:///{self.tmp}/state.db")
        await store.open()
        mapping = create_mapping(
            {
                "function_name": "f",
                "event_source_arn": self.uri,
                "starting_position": "TRIM_HORIZON",
                "consumer_group_id": self.group,
                **self.mapping_parameters,
            }
        )
        config = Config(kafka=KafkaConfig(**GROUP_TIMINGS))
        context = SourceContext(
            config=config, store=store, log=log, mapping_uuid=mapping.uuid, mapping=mapping
        )
        source = kafka_source.open_stream(mapping.source, context)  # type: ignore[arg-type]
        settings = StreamSettings(
            uuid=mapping.uuid,
            function_name="f",
            function_arn="arn:aws:lambda:us-east-1:000000000000:function:f",
            batch_size=100,
            batching_window_s=0,
            max_payload_bytes=6 * 1024 * 1024,
            starting=TRIM_HORIZON,
            retry_first_s=0.05,
            retry_most_s=0.2,
        )
        settings = replace(settings, **self.settings)
        destination: Destination | None = None
        if self.destination == "file":
            destination = FileDestination(self.failures)
        elif self.destination is not None:
            destination = open_destination(self.destination, context, mapping.source)
        metrics = MappingMetrics(mapping.uuid, "f")
        runner = StreamRunner(
            settings,
            source,
            runtime.pool("f"),
            store,
            log=log,
            metrics=metrics,
            destination=destination,
            ownership=source.ownership(settings, metrics),
        )
        task = asyncio.get_running_loop().create_task(runner.run())
        try:
            yield runner
        finally:
            await runner.stop(10)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await runtime.close()
            await store.close()
