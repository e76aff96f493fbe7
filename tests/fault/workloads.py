"""The sources of the fault rounds: how each is made, fed, read back and broken."""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path
from typing import Any, ClassVar

import boto3
import redis

from tests.fault.harness import Outcome, Record, Workload
from tests.fault.proxy import Proxy
from tests.servers import AWS_REGION, MotoServer, PersistentRedisServer, TansuServer


def _body(record: Record) -> str:
    return json.dumps({"id": record.id, "key": record.key})


class LocalWorkload(Workload):
    """local:// in the daemon's SQLite state file (no server: no server faults)."""

    name = "local"
    queue = "fault-q"

    def config(self) -> str:
        return f'[state]\nurl = "sqlite:///{self.workdir}/state.db"\n'

    def mapping(self) -> str:
        return (
            f'event_source_arn = "local://{self.queue}?visibility_timeout=2"\n'
            "maximum_batching_window_in_seconds = 0\n"
            f"scaling_config = {{ MaximumConcurrency = {self.concurrency} }}\n"
        )

    def _run(self, fn: Any) -> Any:
        from poller.sources.local.queue import LocalQueue
        from poller.state.sqlite import SqliteStore

        async def go() -> Any:
            store = SqliteStore(f"sqlite:///{self.workdir}/state.db")
            await store.open()
            try:
                return await fn(LocalQueue(store, self.queue))
            finally:
                await store.close()

        return asyncio.run(go())

    def send(self, records: list[Record]) -> None:
        self._run(lambda queue: queue.send([_body(r) for r in records]))

    def dead_letters(self) -> dict[str, str]:
        from poller.sources.local.queue import LocalQueue
        from poller.state.sqlite import SqliteStore

        async def go() -> dict[str, str]:
            store = SqliteStore(f"sqlite:///{self.workdir}/state.db")
            await store.open()
            try:
                dlq = LocalQueue(store, f"{self.queue}-dlq")
                return {
                    json.loads(m.body)["id"]: m.attributes.get("DeadLetterReason", "")
                    for m in await dlq.peek(100_000)
                }
            finally:
                await store.close()

        return asyncio.run(go())


class RedisWorkload(Workload):
    """A Redis source behind a proxy, on a redis-server that keeps every write (AOF, fsync
    always), so killing it loses nothing it acknowledged."""

    faults = (
        "kill_daemon",
        "kill_worker",
        "pause_daemon",
        "restart_server",
        "proxy_drop",
        "proxy_stall",
        "proxy_half_close",
    )

    def __init__(self, workdir: Path, server: PersistentRedisServer) -> None:
        super().__init__(workdir)
        self.server = server
        self.client = redis.Redis(host=server.host, port=server.port, socket_timeout=10)

    def setup(self) -> None:
        self.client.flushall()
        self.proxy = Proxy(self.server.port)
        self.proxy.start()

    def teardown(self) -> None:
        super().teardown()
        self.client.close()

    def restart_server(self, outcome: Outcome) -> None:
        self.server.kill()
        self.server.start()


class RedisQueueWorkload(RedisWorkload):
    name = "redis-queue"
    key = "fault"

    def mapping(self) -> str:
        assert self.proxy is not None
        return (
            f'event_source_arn = "redis-queue://127.0.0.1:{self.proxy.port}/0/{self.key}'
            '?visibility_timeout=2&max_receive_count=8&start=0"\n'
            f"scaling_config = {{ MaximumConcurrency = {self.concurrency} }}\n"
        )

    def send(self, records: list[Record]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.key, {"body": _body(record)})
        pipe.execute()

    def dead_letters(self) -> dict[str, str]:
        return {
            json.loads(fields[b"body"])["id"]: fields.get(b"DeadLetterReason", b"").decode()
            for _, fields in self.client.xrange(f"{self.key}:dlq")
        }


class RedisStreamWorkload(RedisWorkload):
    name = "redis-stream"
    ordered = True
    shards: ClassVar[int] = 2
    factor: ClassVar[int] = 2
    concurrency = 4  # shards x ParallelizationFactor
    stream_keys = tuple(f"fs-{i}" for i in range(2))

    def mapping(self) -> str:
        assert self.proxy is not None
        return (
            f'event_source_arn = "redis-stream://127.0.0.1:{self.proxy.port}/0/'
            f'{",".join(self.stream_keys)}"\n'
            'starting_position = "TRIM_HORIZON"\n'
            f"parallelization_factor = {self.factor}\n"
        )

    def send(self, records: list[Record]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            shard = self.stream_keys[zlib.crc32(record.key.encode()) % len(self.stream_keys)]
            pipe.xadd(shard, {"body": _body(record), "pk": record.key})
        pipe.execute()


class SqsWorkload(Workload):
    """SQS on moto, behind a proxy. moto keeps its state in memory: a restart loses every
    queue and message, which a real SQS outage would not. The round recreates the queues and
    sends again what was not handled yet (what SQS would still hold)."""

    name = "sqs"
    faults = (
        "kill_daemon",
        "kill_worker",
        "pause_daemon",
        "restart_server",
        "proxy_drop",
        "proxy_stall",
        "proxy_half_close",
    )
    queue = "fault-q"

    def __init__(self, workdir: Path, server: MotoServer) -> None:
        super().__init__(workdir)
        self.server = server
        self.client = boto3.client("sqs", region_name=AWS_REGION, endpoint_url=server.url)
        self.url = ""
        self.dlq_url = ""
        self.seen_dead: dict[str, str] = {}

    def setup(self) -> None:
        self.server.reset()
        self._make_queues()
        self.proxy = Proxy(self.server.port)
        self.proxy.start()

    def _make_queues(self) -> None:
        self.dlq_url = self.client.create_queue(QueueName=f"{self.queue}-dlq")["QueueUrl"]
        dlq_arn = self.client.get_queue_attributes(
            QueueUrl=self.dlq_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.url = self.client.create_queue(
            QueueName=self.queue,
            Attributes={
                "VisibilityTimeout": "2",
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "8"}
                ),
            },
        )["QueueUrl"]

    def config(self) -> str:
        assert self.proxy is not None
        return (
            f'[aws]\nendpoint_url = "http://127.0.0.1:{self.proxy.port}"\n'
            'account = "123456789012"\n'
        )

    def mapping(self) -> str:
        return (
            f'event_source_arn = "sqs://{self.queue}"\n'
            f"scaling_config = {{ MaximumConcurrency = {self.concurrency} }}\n"
        )

    def send(self, records: list[Record]) -> None:
        for start in range(0, len(records), 10):
            entries = [
                {"Id": str(i), "MessageBody": _body(r)}
                for i, r in enumerate(records[start : start + 10])
            ]
            self.client.send_message_batch(QueueUrl=self.url, Entries=entries)

    def dead_letters(self) -> dict[str, str]:
        while True:
            got = self.client.receive_message(
                QueueUrl=self.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=600
            ).get("Messages", [])
            if not got:
                return dict(self.seen_dead)
            for message in got:
                record = json.loads(message["Body"])
                self.seen_dead[record["id"]] = "moved by the queue's redrive policy"

    def restart_server(self, outcome: Outcome) -> None:
        self.server.kill()
        self.server.start()
        self._make_queues()
        handled = _handled_ids(self.workdir)
        self.send([r for r in outcome.sent_so_far if r.id not in handled])


def _handled_ids(workdir: Path) -> set[str]:
    out = workdir / "handled.jsonl"
    ids = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except ValueError:
                continue
    return ids


class _AwsStreamWorkload(Workload):
    """An AWS stream on moto behind a proxy. moto keeps streams in memory, so a restart would
    lose the stream and every record in it, which no Kinesis or DynamoDB outage does (and
    which would test a deleted stream, not an outage): the server is never restarted; the
    proxy drops, stalls and half-closes its connections instead."""

    ordered = True
    faults = (
        "kill_daemon",
        "kill_worker",
        "pause_daemon",
        "proxy_drop",
        "proxy_stall",
        "proxy_half_close",
    )

    def __init__(self, workdir: Path, server: MotoServer) -> None:
        super().__init__(workdir)
        self.server = server

    def setup(self) -> None:
        self.server.reset()
        self._create()
        self.proxy = Proxy(self.server.port)
        self.proxy.start()

    def _create(self) -> None:
        raise NotImplementedError

    def config(self) -> str:
        assert self.proxy is not None
        return (
            f'[aws]\nendpoint_url = "http://127.0.0.1:{self.proxy.port}"\n'
            'account = "123456789012"\n'
        )


class KinesisWorkload(_AwsStreamWorkload):
    name = "kinesis"
    stream = "fault-k"
    factor: ClassVar[int] = 2
    concurrency = 4  # 2 shards x ParallelizationFactor

    def __init__(self, workdir: Path, server: MotoServer) -> None:
        super().__init__(workdir, server)
        self.client = boto3.client("kinesis", region_name=AWS_REGION, endpoint_url=server.url)

    def _create(self) -> None:
        self.client.create_stream(StreamName=self.stream, ShardCount=2)
        self.client.get_waiter("stream_exists").wait(
            StreamName=self.stream, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
        )

    def mapping(self) -> str:
        return (
            f'event_source_arn = "kinesis://{self.stream}"\n'
            'starting_position = "TRIM_HORIZON"\n'
            f"parallelization_factor = {self.factor}\n"
        )

    def send(self, records: list[Record]) -> None:
        entries = [{"Data": _body(r).encode(), "PartitionKey": r.key} for r in records]
        failed = self.client.put_records(StreamName=self.stream, Records=entries)
        # Put one call at a time and in order: a partial failure would reorder a key.
        assert not failed.get("FailedRecordCount"), failed


class DynamoDbWorkload(_AwsStreamWorkload):
    """Each record is a new version of the item named by its key (PutItem), so the order per
    key the round checks is DynamoDB Streams' order of an item's changes."""

    name = "dynamodb"
    table = "fault-t"
    factor: ClassVar[int] = 2
    concurrency = 2  # moto's table stream has one shard; x ParallelizationFactor

    def __init__(self, workdir: Path, server: MotoServer) -> None:
        super().__init__(workdir, server)
        self.client = boto3.client("dynamodb", region_name=AWS_REGION, endpoint_url=server.url)

    def _create(self) -> None:
        self.client.create_table(
            TableName=self.table,
            KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
        )

    def mapping(self) -> str:
        return (
            f'event_source_arn = "dynamodb://{self.table}"\n'
            'starting_position = "TRIM_HORIZON"\n'
            f"parallelization_factor = {self.factor}\n"
        )

    def send(self, records: list[Record]) -> None:
        for record in records:
            self.client.put_item(
                TableName=self.table,
                Item={"key": {"S": record.key}, "payload": {"S": _body(record)}},
            )


class KafkaWorkload(Workload):
    """A Kafka topic of 2 partitions on tansu, whose every connection goes through the proxy
    (the broker advertises the proxy's port). tansu's storage is memory, PostgreSQL or S3: in
    memory a restart loses every topic and committed offset, which no Kafka outage does, and
    the others need a database or object store the tests do not have; so the broker is never
    restarted, and the proxy drops, stalls and half-closes its connections instead."""

    name = "kafka"
    ordered = True
    faults = (
        "kill_daemon",
        "kill_worker",
        "pause_daemon",
        "proxy_drop",
        "proxy_stall",
        "proxy_half_close",
    )
    factor: ClassVar[int] = 2
    concurrency = 4  # 2 partitions x ParallelizationFactor

    def __init__(self, workdir: Path, server: TansuServer, proxy_port: int) -> None:
        super().__init__(workdir)
        self.server = server
        self.proxy_port = proxy_port
        self.topic = f"fault-{workdir.parent.name}-{workdir.name}"
        self.producer: Any = None

    def setup(self) -> None:
        from kafka import KafkaProducer
        from kafka.admin import KafkaAdminClient, NewTopic

        self.proxy = Proxy(self.server.port, port=self.proxy_port)
        self.proxy.start()
        admin = KafkaAdminClient(bootstrap_servers=self.server.bootstrap)
        try:
            admin.create_topics([NewTopic(self.topic, num_partitions=2, replication_factor=1)])
        finally:
            admin.close()
        # One request in flight and retries: a key's records reach the broker in order.
        self.producer = KafkaProducer(
            bootstrap_servers=self.server.bootstrap,
            acks="all",
            retries=10,
            max_in_flight_requests_per_connection=1,
        )

    def teardown(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
        super().teardown()

    def config(self) -> str:
        # tansu holds a group join for half the session timeout: keep it short.
        return (
            "[kafka]\nsession_timeout_ms = 6000\nheartbeat_interval_ms = 1000\n"
            "max_poll_interval_ms = 6000\n"
        )

    def mapping(self) -> str:
        return (
            f'event_source_arn = "kafka://127.0.0.1:{self.proxy_port}/{self.topic}"\n'
            'starting_position = "TRIM_HORIZON"\n'
            f"parallelization_factor = {self.factor}\n"
        )

    def send(self, records: list[Record]) -> None:
        for record in records:
            self.producer.send(self.topic, key=record.key.encode(), value=_body(record).encode())
        self.producer.flush(timeout=30)
