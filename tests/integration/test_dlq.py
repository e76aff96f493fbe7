"""`poller dlq peek|redrive` through the real CLI, on dead letters made by the same source code
the engine uses, against real servers (redis-server, moto); a redrive killed part-way loses and
duplicates nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from poller.config import Config
from poller.logs import JsonLog
from poller.mappings import parse_event_source
from poller.sources import redis_queue
from poller.sources.base import SourceContext
from poller.sources.local.queue import LocalQueue
from poller.state.sqlite import SqliteStore
from tests.daemon_helpers import POLLER, cli
from tests.servers import AwsEnv, RedisServer


def _config(tmp: Path, extra: str = "") -> Path:
    config = tmp / "config.toml"
    config.write_text(
        f'[state]\nurl = "sqlite:///{tmp}/state.db"\n[daemon]\nhttp_listen = "127.0.0.1:1"\n'
        + extra
    )
    return config


def _peek(config: Path, uri: str, *more: str) -> list[dict[str, Any]]:
    out = cli(config, "dlq", "peek", uri, "--output", "json", *more).stdout
    messages: list[dict[str, Any]] = json.loads(out)["Messages"]
    return messages


def _killed_part_way(config: Path, uri: str, to: str, moved: Any) -> None:
    """Run a redrive and SIGKILL it once ``moved()`` shows it has begun."""
    process = subprocess.Popen(
        [*POLLER, "dlq", "redrive", uri, "--to", to, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=config.parent,
    )
    try:
        deadline = time.monotonic() + 60
        while moved() == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)


# -- local:// ------------------------------------------------------------------------------------
async def _local_dead_letters(tmp: Path, bodies: list[str]) -> None:
    store = SqliteStore(f"sqlite:///{tmp}/state.db")
    await store.open()
    try:
        queue = LocalQueue(store, "orders", visibility_timeout_s=0)
        await queue.send(bodies, attributes={"origin": "test"})
        for _ in range(2):
            got = await queue.receive(len(bodies), 0)
        await queue.dead_letter(got, "maxReceiveCount 2 exceeded")
    finally:
        await store.close()


def test_local_peek_and_redrive(tmp_path: Path) -> None:
    config = _config(tmp_path)
    asyncio.run(_local_dead_letters(tmp_path, ["one", "two", "three"]))
    peeked = _peek(config, "local://orders-dlq", "--max", "2")
    assert [(m["Body"], m["Reason"], m["ReceiveCount"], m["Source"]) for m in peeked] == [
        ("one", "maxReceiveCount 2 exceeded", 2, "orders"),
        ("two", "maxReceiveCount 2 exceeded", 2, "orders"),
    ]
    assert peeked[0]["Attributes"] == {"origin": "test"}
    assert len(_peek(config, "local://orders-dlq")) == 3  # the peek took nothing

    table = cli(config, "dlq", "peek", "local://orders-dlq").stdout.splitlines()
    assert table[0].split()[:3] == ["MESSAGE", "ID", "SENT"]
    assert "maxReceiveCount 2 exceeded" in table[1] and table[1].rstrip().endswith("one")

    result = cli(config, "dlq", "redrive", "local://orders-dlq", "--to", "local://orders")
    assert result.stdout.strip() == "moved 3 message(s) from local://orders-dlq to local://orders"
    assert _peek(config, "local://orders-dlq") == []
    back = _peek(config, "local://orders")
    assert [m["Body"] for m in back] == ["one", "two", "three"]
    assert all(m["Reason"] is None and m["Attributes"] == {"origin": "test"} for m in back)

    refused = cli(config, "dlq", "redrive", "local://orders", "--to", "sqs://orders", check=False)
    assert refused.returncode == 1 and "only to another local:// queue" in refused.stderr


def test_a_local_redrive_killed_part_way_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bodies = [f"m-{i}" for i in range(20_000)]
    asyncio.run(_local_dead_letters(tmp_path, bodies))

    def count(queue: str) -> int:
        import sqlite3

        with sqlite3.connect(tmp_path / "state.db", timeout=30) as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM local_messages WHERE queue = ?", (queue,)
                ).fetchone()[0]
            )

    _killed_part_way(config, "local://orders-dlq", "local://orders", lambda: count("orders"))
    left, moved = count("orders-dlq"), count("orders")
    assert 0 < moved < len(bodies), "the redrive was not interrupted part-way"
    assert left + moved == len(bodies)
    cli(config, "dlq", "redrive", "local://orders-dlq", "--to", "local://orders")
    import sqlite3

    with sqlite3.connect(tmp_path / "state.db") as conn:
        rows = conn.execute("SELECT body FROM local_messages WHERE queue = 'orders'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(bodies)


# -- redis-queue:// --------------------------------------------------------------------------------
def _redis_uri(server: RedisServer, key: str, query: str = "") -> str:
    return f"redis-queue://{server.host}:{server.port}/0/{key}" + (f"?{query}" if query else "")


async def _redis_dead_letters(server: RedisServer, key: str, bodies: list[str]) -> None:
    """Entries moved to KEY:dlq by the source's own dead-lettering, after two deliveries."""
    uri = _redis_uri(server, key, "visibility_timeout=0&max_receive_count=1&start=0")
    context = SourceContext(
        config=Config(),
        store=None,  # type: ignore[arg-type]
        log=JsonLog(),
        mapping_uuid="group-1",
    )
    queue = redis_queue.open_queue(parse_event_source(uri), context)  # type: ignore[arg-type]
    await queue.start()
    try:
        await queue.send(bodies)
        got: list[Any] = []
        while len(got) < len(bodies):
            got += await queue.receive(len(bodies) - len(got), 1)
        redelivered: list[Any] = []
        while len(redelivered) < len(bodies):
            redelivered += await queue.receive(len(bodies) - len(redelivered), 1)
        await queue.dead_letter(redelivered, "maxReceiveCount 1 exceeded")
    finally:
        await queue.close()


def test_redis_peek_and_redrive_back_to_the_consumer_group(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = "dlq-orders"
    admin = sync_redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.delete(key, f"{key}:dlq")
    asyncio.run(_redis_dead_letters(redis_server, key, ["a", "b", "c"]))
    config = _config(tmp_path)
    dlq = _redis_uri(redis_server, f"{key}:dlq")

    peeked = _peek(config, dlq)
    assert [(m["Body"], m["Reason"], m["ReceiveCount"], m["Source"]) for m in peeked] == [
        (body, "maxReceiveCount 1 exceeded", 2, key) for body in ("a", "b", "c")
    ]
    assert admin.xlen(f"{key}:dlq") == 3  # the peek took nothing
    assert [m["Body"] for m in _peek(config, dlq, "--max", "1")] == ["a"]

    result = cli(config, "dlq", "redrive", dlq, "--to", _redis_uri(redis_server, key), "--max", "2")
    assert result.stdout.startswith("moved 2 message(s)")
    assert [m["Body"] for m in _peek(config, dlq)] == ["c"]
    cli(config, "dlq", "redrive", dlq, "--to", _redis_uri(redis_server, key))
    assert admin.xlen(f"{key}:dlq") == 0

    # The mapping's consumer group gets them as new entries, as they were first sent.
    entries = admin.xreadgroup("group-1", "c-1", {key: ">"}, count=10)
    fields = [f for _, f in entries[0][1]]
    assert fields == [{b"body": body} for body in (b"a", b"b", b"c")]

    elsewhere = f"redis-queue://{redis_server.host}:{redis_server.port}/1/{key}"
    refused = cli(config, "dlq", "redrive", dlq, "--to", elsewhere, check=False)
    assert refused.returncode == 1 and "another Redis server or database" in refused.stderr


def test_a_redis_redrive_killed_part_way_loses_and_duplicates_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = "dlq-crash"
    admin = sync_redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.delete(key, f"{key}:dlq")
    total = 60_000
    pipe = admin.pipeline(transaction=False)
    for i in range(total):
        pipe.xadd(f"{key}:dlq", {"body": f"m-{i}", "DeadLetterReason": "test"})
    pipe.execute()
    config = _config(tmp_path)
    dlq, source = _redis_uri(redis_server, f"{key}:dlq"), _redis_uri(redis_server, key)

    _killed_part_way(config, dlq, source, lambda: admin.xlen(key))
    left, moved = admin.xlen(f"{key}:dlq"), admin.xlen(key)
    assert 0 < moved < total, "the redrive was not interrupted part-way"
    assert left + moved == total
    cli(config, "dlq", "redrive", dlq, "--to", source)
    bodies = [f[b"body"].decode() for _, f in admin.xrange(key)]
    assert sorted(bodies) == sorted(f"m-{i}" for i in range(total))


# -- SQS ------------------------------------------------------------------------------------------
def test_sqs_peek_leaves_messages_and_redrive_points_to_sqs_own_move_task(
    tmp_path: Path, aws_env: AwsEnv
) -> None:
    from aiobotocore.session import get_session

    async def dead_letters() -> str:
        async with get_session().create_client("sqs", **aws_env.client_kwargs()) as sqs:
            dlq = await sqs.create_queue(QueueName="peek-dlq")
            arn = (
                await sqs.get_queue_attributes(
                    QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"]
                )
            )["Attributes"]["QueueArn"]
            source = await sqs.create_queue(
                QueueName="peek-src",
                Attributes={
                    "RedrivePolicy": json.dumps(
                        {"deadLetterTargetArn": arn, "maxReceiveCount": "1"}
                    )
                },
            )
            url = source["QueueUrl"]
            await sqs.send_message(
                QueueUrl=url,
                MessageBody="poison",
                MessageAttributes={"trace": {"DataType": "String", "StringValue": "t-9"}},
            )
            for _ in range(2):  # the second receive moves it (SQS's own redrive)
                await sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)
            return str(arn)

    dlq_arn = asyncio.run(dead_letters())
    config = _config(
        tmp_path,
        textwrap.dedent(
            f"""
            [aws]
            endpoint_url = "{aws_env.endpoint_url}"
            region = "us-east-1"
            """
        ),
    )
    first = _peek(config, "sqs://peek-dlq")
    assert [(m["Body"], m["Attributes"]) for m in first] == [("poison", {"trace": "t-9"})]
    assert first[0]["ReceiveCount"] >= 2
    again = _peek(config, dlq_arn)
    assert [m["MessageId"] for m in again] == [first[0]["MessageId"]]  # still there
    assert again[0]["ReceiveCount"] == first[0]["ReceiveCount"] + 1  # SQS counts a peek

    refused = cli(config, "dlq", "redrive", dlq_arn, "--to", "sqs://peek-src", check=False)
    assert refused.returncode == 1
    assert "aws sqs start-message-move-task" in refused.stderr
    assert f"--source-arn {dlq_arn}" in refused.stderr


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("redis-stream://127.0.0.1/k", "hold no dead letters"),
        ("file:///tmp/x", "Got file:///tmp/x"),
    ],
)
def test_sources_without_dead_letters_are_refused_by_name(
    tmp_path: Path, uri: str, message: str
) -> None:
    result = cli(_config(tmp_path), "dlq", "peek", uri, check=False)
    assert result.returncode == 2 and message in result.stderr
