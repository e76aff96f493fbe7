"""Kinesis Data Streams on the stream engine, against moto_server over real HTTP with real
workers.

The tests' moto server behaves as AWS does where moto alone does not (tests/moto_kinesis.py):
resharding keeps a closed shard's records in it and ends its reads, iterators expire (after a
stream's ``poller-test:iterator-ttl-s`` tag here, to keep the tests short), GetRecords is
throttled when a stream's ``poller-test:throttle-get-records`` tag asks for it, and ListShards
pages by token alone.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from poller.config import AwsConfig, Config
from poller.engine.checkpoints import SHARD_END
from poller.sources.base import LATEST, AwsDefaults, SourceError, StartAt
from poller.sources.kinesis import parse
from poller.sources.kinesis.stream import KinesisStream
from tests.conftest import AwsEnv
from tests.integration.stream_harness import Harness, until
from tests.moto_kinesis import ITERATOR_TTL_TAG, THROTTLE_TAG
from tests.servers import AWS_REGION

ACCOUNT = "123456789012"  # moto's
DEFAULTS = AwsDefaults(AWS_REGION, ACCOUNT)


@asynccontextmanager
async def _admin(env: AwsEnv, service: str = "kinesis") -> AsyncIterator[Any]:
    """A plain aiobotocore client, to arrange streams behind the source's back."""
    async with get_session().create_client(service, **env.client_kwargs()) as client:
        yield client


async def _stream(env: AwsEnv, name: str, shards: int = 1, **tags: str) -> str:
    async with _admin(env) as kinesis:
        await kinesis.create_stream(StreamName=name, ShardCount=shards)
        if tags:
            await kinesis.add_tags_to_stream(StreamName=name, Tags=tags)
        summary = await kinesis.describe_stream_summary(StreamName=name)
    arn: str = summary["StreamDescriptionSummary"]["StreamARN"]
    return arn


async def _put(env: AwsEnv, stream: str, *bodies: str, key: str = "pk") -> list[str]:
    """PutRecord each body in turn; their sequence numbers."""
    async with _admin(env) as kinesis:
        return [
            (await kinesis.put_record(StreamName=stream, Data=body.encode(), PartitionKey=key))[
                "SequenceNumber"
            ]
            for body in bodies
        ]


def _config(env: AwsEnv, **aws: Any) -> Config:
    return Config(aws=AwsConfig(endpoint_url=env.endpoint_url, account=ACCOUNT, **aws))


def _harness(env: AwsEnv, tmp: Path, stream: str, **kwargs: Any) -> Harness:
    return Harness(None, tmp, source_uri=f"kinesis://{stream}", config=_config(env), **kwargs)


async def _started(runner: Any) -> KinesisStream:
    await until(lambda: runner.started, 20, "the runner started")
    source: KinesisStream = runner.source
    return source


def _first_deliveries(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each key's bodies in the order they were first handled."""
    seen: set[tuple[str, str]] = set()
    per_key: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if (record["shard"], record["seq"]) not in seen:
            seen.add((record["shard"], record["seq"]))
            per_key[record["pk"]].append(record["body"])
    return per_key


def _n(body: str) -> int:
    return int(body.rsplit(":", 1)[1])


# -- reading --------------------------------------------------------------------------------


async def test_a_long_run_over_several_shards_keeps_each_keys_order(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    """Four shards, two lanes each, records sent while they are read: the handler checks each
    key's order itself, and every record arrives once."""
    await _stream(aws_env, "long", shards=4)
    h = _harness(
        aws_env,
        tmp_path,
        "long",
        handler="ordered",
        settings={"batch_size": 25, "parallelization_factor": 2},
    )
    keys = [f"key-{k}" for k in range(16)]
    async with h.running() as runner:
        source = await _started(runner)
        for round_ in range(10):
            for key in keys:
                await source.send(
                    [f"{key}:{round_ * 10 + i}" for i in range(10)], partition_key=key
                )
        await until(lambda: len(h.handled()) >= 1600, 120, "every record handled")
    records = h.handled()
    assert h.disorder() == []
    assert len(records) == 1600  # nothing twice
    assert {r["shard"] for r in records} == {f"shardId-00000000000{i}" for i in range(4)}
    for key, bodies in _first_deliveries(records).items():
        assert [_n(b) for b in bodies] == list(range(100)), key
    assert {r["source"] for r in records} == {"aws:kinesis"}


async def test_records_have_lambdas_kinesis_shape(aws_env: AwsEnv, tmp_path: Path) -> None:
    arn = await _stream(aws_env, "shape")
    h = Harness(
        None,
        tmp_path,
        handler="raw",
        source_uri=arn,
        config=_config(aws_env, role_arn="arn:aws:iam::123456789012:role/fn-role"),
    )
    before = time.time()
    [sequence] = await _put(aws_env, "shape", "héllo", key="ключ")
    async with h.running():
        await until(lambda: h.events(), 20, "the record handled")
    [event] = h.events()
    [record] = event["Records"]
    arrival = record["kinesis"].pop("approximateArrivalTimestamp")
    assert isinstance(arrival, float) and before - 1 < arrival < time.time() + 1
    assert round(arrival, 3) == arrival  # epoch seconds with milliseconds
    assert record == {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "ключ",
            "sequenceNumber": sequence,
            "data": base64.b64encode("héllo".encode()).decode(),
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"shardId-000000000000:{sequence}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/fn-role",
        "awsRegion": AWS_REGION,
        "eventSourceARN": arn,
    }


async def test_at_timestamp_starts_at_the_first_record_of_that_time(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _stream(aws_env, "ts")
    await _put(aws_env, "ts", "early-1", "early-2")
    await asyncio.sleep(0.3)
    at = time.time()
    await asyncio.sleep(0.3)
    later = await _put(aws_env, "ts", "late-1", "late-2")
    h = _harness(
        aws_env,
        tmp_path,
        "ts",
        settings={"starting": StartAt("at_timestamp", timestamp=at)},
    )
    async with h.running():
        await until(lambda: len(h.handled()) >= 2, 20, "the later records handled")
        await asyncio.sleep(1.5)  # an idle poll or two: nothing earlier turns up
    assert [r["seq"] for r in h.handled()] == later


async def test_latest_skips_what_was_there_before(aws_env: AwsEnv, tmp_path: Path) -> None:
    await _stream(aws_env, "latest")
    await _put(aws_env, "latest", "old")
    h = _harness(aws_env, tmp_path, "latest", settings={"starting": LATEST})
    async with h.running() as runner:
        await until(lambda: runner.processors, 20, "the shard opened")
        await until(
            lambda: all(p.phase == "caught up" for p in runner.processors.values()),
            20,
            "the shard read to its tip",
        )
        new = await _put(aws_env, "latest", "new")
        await until(lambda: h.handled(), 20, "the new record handled")
    assert [r["seq"] for r in h.handled()] == new


async def test_a_restart_resumes_from_the_checkpoint(aws_env: AwsEnv, tmp_path: Path) -> None:
    await _stream(aws_env, "restart")
    first = await _put(aws_env, "restart", *[f"a{i}" for i in range(5)])
    h = _harness(aws_env, tmp_path, "restart", settings={"batch_size": 2})
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 5, 20, "first records")
        await until(
            lambda: runner.processors["shardId-000000000000"].checkpoint.position == first[-1],
            10,
            "checkpointed",
        )
    second = await _put(aws_env, "restart", "b0", "b1")
    async with h.running():
        await until(lambda: len(h.handled()) == 7, 20, "the records sent while stopped")
        await asyncio.sleep(1.5)
    assert [r["seq"] for r in h.handled()] == first + second


async def test_an_idle_shard_is_polled_about_once_a_second(aws_env: AwsEnv, tmp_path: Path) -> None:
    await _stream(aws_env, "idle")
    h = _harness(aws_env, tmp_path, "idle")
    calls: list[float] = []
    async with h.running() as runner:
        source = await _started(runner)
        source.aws._client.meta.events.register(
            "before-call.kinesis.GetRecords", lambda **_: calls.append(time.monotonic())
        )
        await asyncio.sleep(4)
    # About one a second: never faster than the 1 s pause allows (a busy machine only makes it
    # slower, so the lower bound is loose).
    assert 1 <= len(calls) <= 5
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.75 for gap in gaps), gaps


async def test_millis_behind_latest_is_exported_per_shard(aws_env: AwsEnv, tmp_path: Path) -> None:
    await _stream(aws_env, "behind")
    await _put(aws_env, "behind", "x", "y")
    h = _harness(aws_env, tmp_path, "behind")
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 2, 20, "records handled")
        processor = runner.processors["shardId-000000000000"]
        await until(lambda: processor.behind_ms == 0, 10, "caught up")
        gauge = runner.metrics.millis_behind("shardId-000000000000")
        assert gauge._value.get() == 0  # type: ignore[attr-defined]
        assert processor.status()["millisBehindLatest"] == 0


async def test_shards_are_listed_page_by_page(aws_env: AwsEnv) -> None:
    arn = await _stream(aws_env, "pages", shards=5)
    spec = parse(arn, DEFAULTS)
    stream = KinesisStream(
        spec,
        endpoint_url=aws_env.endpoint_url,
        profile=None,
        invoke_identity_arn="arn:aws:iam::123456789012:role/poller",
        list_page=2,
    )
    await stream.start()
    try:
        shards = await stream.shards()
    finally:
        await stream.close()
    assert [s.id for s in shards] == [f"shardId-00000000000{i}" for i in range(5)]


async def test_a_missing_stream_says_which_and_how_to_create_it(aws_env: AwsEnv) -> None:
    spec = parse("kinesis://nowhere", DEFAULTS)
    stream = KinesisStream(
        spec, endpoint_url=aws_env.endpoint_url, profile=None, invoke_identity_arn="x"
    )
    with pytest.raises(SourceError) as info:
        await stream.start()
    await stream.close()
    assert "Kinesis stream nowhere not found in us-east-1" in str(info.value)
    assert "aws kinesis create-stream --stream-name nowhere" in str(info.value)
    assert info.value.retryable


# -- what moto needs help with: expiry, throttles, resharding -------------------------------


async def test_an_expired_iterator_is_reopened_after_the_last_record_read(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    """A slow function holds the reader back longer than its iterator lives: it reads on after
    the last record it fetched, never from LATEST, and nothing is lost or read twice."""
    await _stream(aws_env, "expiry", **{ITERATOR_TTL_TAG: "1"})
    first = await _put(aws_env, "expiry", *[f"a{i}" for i in range(100)])
    h = _harness(
        aws_env,
        tmp_path,
        "expiry",
        environment={"SLEEP": "0.3"},
        settings={"batch_size": 10},
    )
    # One GetRecords fetches all 100; the next comes only once the engine has taken them all,
    # 8 batches of 0.3 s later: well past the iterator's second.
    async with h.running():
        await until(
            lambda: any("shard iterator expired" in r.get("message", "") for r in h.logs()),
            30,
            "the iterator expired",
        )
        second = await _put(aws_env, "expiry", *[f"b{i}" for i in range(10)])
        await until(lambda: len(h.handled()) >= 110, 60, "every record handled")
        await asyncio.sleep(1.5)
    assert [r["seq"] for r in h.handled()] == first + second
    expired = [r for r in h.logs() if "shard iterator expired" in r.get("message", "")]
    assert expired[0]["sequence"] == first[-1]


async def test_an_iterator_that_expires_before_any_record_reopens_where_latest_was(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    """LATEST with nothing read yet: the new iterator starts at the time the reader opened, so
    what arrived in between is read (reopening at LATEST would skip it)."""
    await _stream(aws_env, "expiry-latest", **{ITERATOR_TTL_TAG: "0.5"})
    await _put(aws_env, "expiry-latest", "before")
    h = _harness(aws_env, tmp_path, "expiry-latest", settings={"starting": LATEST})
    async with h.running() as runner:
        await until(lambda: runner.processors, 20, "the shard opened")
        await until(
            lambda: any("shard iterator expired" in r.get("message", "") for r in h.logs()),
            20,
            "the idle reader's iterator expired",
        )
        new = await _put(aws_env, "expiry-latest", "after")
        await until(lambda: h.handled(), 20, "the new record handled")
        await asyncio.sleep(1.5)
    assert [r["seq"] for r in h.handled()] == new


async def test_throttled_reads_back_off_without_using_an_attempt(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _stream(aws_env, "throttled", **{THROTTLE_TAG: "6"})
    sent = await _put(aws_env, "throttled", *[f"t{i}" for i in range(5)])
    h = _harness(aws_env, tmp_path, "throttled", destination=True, settings={"max_retries": 0})
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 5, 40, "records handled once throttling ends")
        counted = runner.metrics.source_error("read_throttled")._value.get()  # type: ignore[attr-defined]
        status = runner.health.status
    assert [r["seq"] for r in h.handled()] == sent
    assert counted >= 1 and h.given_up() == []
    assert not status.startswith("PROBLEM")  # a throttle is not an outage
    assert any("reads throttled" in r.get("message", "") for r in h.logs())


async def test_split_merge_and_update_shard_count_while_records_flow(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    """Children start only after their parents were read to the end and checkpointed there;
    nothing is lost and each key's order holds across every reshard."""
    await _stream(aws_env, "reshard", shards=2)
    h = _harness(aws_env, tmp_path, "reshard", handler="ordered", settings={"batch_size": 10})
    keys = [f"key-{k}" for k in range(12)]
    sent: dict[str, int] = dict.fromkeys(keys, 0)
    pause = asyncio.Lock()  # moto cannot put and reshard at the same moment; AWS can

    async def produce(source: KinesisStream, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with pause:
                for key in keys:
                    n = sent[key]
                    await source.send([f"{key}:{n}", f"{key}:{n + 1}"], partition_key=key)
                    sent[key] = n + 2
            await asyncio.sleep(0.05)

    async def reshard(when: int, operation: str, **params: Any) -> None:
        await until(lambda: len(h.handled()) >= when, 60, f"{when} records before {operation}")
        async with pause, _admin(aws_env) as kinesis:
            await getattr(kinesis, operation)(StreamName="reshard", **params)

    async with h.running() as runner:
        stop = asyncio.Event()
        producer = asyncio.create_task(produce(await _started(runner), stop))
        await reshard(
            100, "split_shard", ShardToSplit="shardId-000000000000", NewStartingHashKey=str(2**126)
        )
        await reshard(
            250,
            "merge_shards",
            ShardToMerge="shardId-000000000002",
            AdjacentShardToMerge="shardId-000000000003",
        )
        await reshard(400, "update_shard_count", TargetShardCount=3, ScalingType="UNIFORM_SCALING")
        await until(lambda: len(h.handled()) >= 550, 60, "records after the last reshard")
        stop.set()
        await producer
        total = sum(sent.values())
        await until(lambda: len(h.handled()) >= total, 60, "every record handled")
        shards = await runner.source.shards()
        await until(
            lambda: all(runner.processors.get(s.id) is None or not s.closed for s in shards),
            30,
            "closed shards finished",
        )
        checkpoints = await runner.store.list_checkpoints("m")
    assert h.disorder() == []
    records = h.handled()
    assert len(records) == total  # nothing lost, nothing twice
    for key, bodies in _first_deliveries(records).items():
        assert [_n(b) for b in bodies] == list(range(sent[key])), key
    closed = {s.id for s in shards if s.closed}
    assert len(closed) >= 5  # 0 split; 2 and 3 merged; 1 and 4 split by UpdateShardCount...
    assert {s for s, c in checkpoints.items() if c.position == SHARD_END} == closed
    # Each child started after every parent had been read to its end.
    order = [(r.get("message"), r.get("shard")) for r in h.logs()]
    for shard in shards:
        started = order.index(("shard processor started", shard.id))
        for parent in shard.parents:
            assert order.index(("shard read to its end", parent)) < started, (shard, parent)


# -- failures: partial responses, bisect, destinations, windows -----------------------------


async def test_partial_batch_response_names_sequence_numbers(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _stream(aws_env, "partial")
    good = await _put(aws_env, "partial", "g0", "g1", "g2")
    bad = await _put(aws_env, "partial", "bad3")
    rest = await _put(aws_env, "partial", "g4", "g5")
    h = _harness(
        aws_env,
        tmp_path,
        "partial",
        handler="partial",
        destination=True,
        settings={"batch_size": 10, "report_batch_item_failures": True, "max_retries": 2},
    )
    async with h.running() as runner:
        await until(lambda: h.given_up(), 20, "the failing record given up")
        await until(
            lambda: runner.processors["shardId-000000000000"].checkpoint.position == rest[-1],
            10,
            "the checkpoint at the end",
        )
    batches: dict[str, list[str]] = defaultdict(list)
    for record in h.handled():
        batches[record["request"]].append(record["seq"])
    assert list(batches.values()) == [good + bad + rest] + [bad + rest] * 2
    [failure] = h.given_up()
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (bad[0], rest[-1])
    assert failure["responseContext"]["functionError"] is None


async def test_a_poison_record_is_bisected_out_to_an_sqs_destination(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    arn = await _stream(aws_env, "poisoned")
    async with _admin(aws_env, "sqs") as sqs:
        url = (await sqs.create_queue(QueueName="failures"))["QueueUrl"]
    before = await _put(aws_env, "poisoned", *[f"m{i}" for i in range(9)])
    [poison] = await _put(aws_env, "poisoned", "poison")
    after = await _put(aws_env, "poisoned", *[f"m{i}" for i in range(9, 16)])
    h = _harness(
        aws_env,
        tmp_path,
        "poisoned",
        handler="poison",
        destination_uri=f"arn:aws:sqs:{AWS_REGION}:{ACCOUNT}:failures",
        settings={"batch_size": 16, "bisect": True, "max_retries": 1},
    )
    async with h.running() as runner:
        await until(lambda: len(h.handled()) >= 16, 30, "everything but the poison handled")
        await until(
            lambda: runner.processors["shardId-000000000000"].checkpoint.position == after[-1],
            20,
            "the checkpoint past the poison record",
        )
    assert sorted({r["seq"] for r in h.handled()}, key=int) == before + after
    async with _admin(aws_env, "sqs") as sqs:
        got = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    [message] = got["Messages"]
    failure = json.loads(message["Body"])
    info = failure["KinesisBatchInfo"]
    assert failure["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert failure["responseContext"]["functionError"] == "Unhandled"
    assert (info["shardId"], info["startSequenceNumber"], info["endSequenceNumber"]) == (
        "shardId-000000000000",
        poison,
        poison,
    )
    assert info["batchSize"] == 1 and info["streamArn"] == arn


async def test_tumbling_windows_carry_state_to_a_final_invoke(
    aws_env: AwsEnv, tmp_path: Path
) -> None:
    await _stream(aws_env, "windows")
    h = _harness(
        aws_env,
        tmp_path,
        "windows",
        handler="window",
        settings={"tumbling_window_s": 1, "batch_size": 2},
    )
    values = [1, 2, 3, 10, 20]
    await _put(aws_env, "windows", *map(str, values[:3]))
    await asyncio.sleep(1.1)  # the rest in a later window
    await _put(aws_env, "windows", *map(str, values[3:]))
    async with h.running() as runner:
        await until(
            lambda: sum(c["state"]["sum"] for c in h.handled() if c["final"]) == sum(values),
            20,
            "every window closed",
        )
        processor = runner.processors["shardId-000000000000"]
        await until(lambda: processor.checkpoint.window is None, 5, "the state dropped")
    per_window: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in h.handled():
        per_window[call["window"]["start"]].append(call)
        assert call["shard"] == "shardId-000000000000"
    assert len(per_window) >= 2
    for calls in per_window.values():
        # Only the last invoke of a window is final; the state grows from invoke to invoke.
        assert [c["final"] for c in calls] == [False] * (len(calls) - 1) + [True]
        sums = [c["state"]["sum"] for c in calls]
        assert sums == sorted(sums)
