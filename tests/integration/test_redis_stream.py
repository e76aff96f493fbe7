"""redis-stream:// on the stream engine, against a real redis-server with real workers."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from poller.engine.ownership import StoreOwnership
from poller.sources.base import LATEST, TRIM_HORIZON, Shard, StartAt
from poller.state.sqlite import SqliteStore
from tests.integration.stream_harness import Harness, until
from tests.servers import RedisServer


async def _fresh(server: RedisServer, *keys: str) -> None:
    client = aioredis.Redis(host=server.host, port=server.port)
    await client.delete(*keys)
    await client.aclose()


async def test_records_are_delivered_in_order_per_shard(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("a", "b"), settings={"batch_size": 7})
    await _fresh(redis_server, *h.keys)
    ids = {
        "a": await h.add("a", *[f"a{i}" for i in range(50)]),
        "b": await h.add("b", *[f"b{i}" for i in range(30)]),
    }
    async with h.running():
        await until(lambda: len(h.handled()) >= 80, 20, "every record handled")
    seen = defaultdict(list)
    for record in h.handled():
        seen[record["shard"]].append(record["seq"])
        assert record["source"] == "aws:kinesis"
    assert seen == ids


async def test_order_per_key_holds_across_parallel_lanes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """ParallelizationFactor 4: batches of one shard run at once, each key's records in order,
    and the checkpoint never passes a record that is not done."""
    h = Harness(
        redis_server,
        tmp_path,
        keys=("p",),
        environment={"SLEEP": "0.01"},
        settings={"batch_size": 5, "parallelization_factor": 4},
    )
    await _fresh(redis_server, "p")
    expected: dict[str, list[str]] = defaultdict(list)
    for i in range(400):
        key = f"k{i % 13}"
        [entry] = await h.add("p", f"{key}-{i}", pk=key)
        expected[key].append(entry)
    async with h.running() as runner:
        await until(lambda: len(h.handled()) >= 400, 60, "every record handled")
        await until(
            lambda: (
                runner.processors["p"].checkpoint.position
                == max((e for entries in expected.values() for e in entries), key=_id)
            ),
            10,
            "checkpoint",
        )
    per_key: dict[str, list[str]] = defaultdict(list)
    requests: dict[str, set[str]] = defaultdict(set)
    for record in h.handled():
        per_key[record["pk"]].append(record["seq"])
        requests[record["request"]].add(record["pk"])
    assert per_key == expected
    # Several batches ran in parallel: records of different lanes were in different invokes.
    assert len(requests) >= 400 / 5


def _position(runner: Any, shard: str) -> str | None:
    processor = runner.processors.get(shard)
    return None if processor is None else processor.checkpoint.position


def _id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)


async def test_a_poison_record_is_bisected_out_and_sent_to_the_destination(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        handler="poison",
        keys=("q", "other"),
        destination=True,
        settings={"batch_size": 16, "bisect": True, "max_retries": 1},
    )
    await _fresh(redis_server, *h.keys)
    before = await h.add("q", *[f"m{i}" for i in range(9)])
    [poison] = await h.add("q", "poison")
    after = await h.add("q", *[f"m{i}" for i in range(9, 16)])
    others = await h.add("other", *[f"o{i}" for i in range(20)])
    async with h.running() as runner:
        await until(
            lambda: len(h.given_up()) == 1 and len(h.handled()) >= 35,
            30,
            "the poison record given up and the rest handled",
        )
        await until(
            lambda: runner.processors["q"].checkpoint.position == after[-1],
            10,
            "the checkpoint past the poison record",
        )
    handled = [r["seq"] for r in h.handled() if r["shard"] == "q"]
    assert sorted(set(handled), key=_id) == before + after  # everything but the poison
    assert [r["seq"] for r in h.handled() if r["shard"] == "other"] == others
    [failure] = h.given_up()
    context, info = failure["requestContext"], failure["KinesisBatchInfo"]
    assert context["condition"] == "RetryAttemptsExhausted"
    assert context["functionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:f"
    # The first invoke (16 records), then halves down to the record alone, and one retry.
    assert context["approximateInvokeCount"] >= 3
    assert failure["responseContext"]["functionError"] == "Unhandled"
    assert (info["shardId"], info["startSequenceNumber"], info["endSequenceNumber"]) == (
        "q",
        poison,
        poison,
    )
    assert info["batchSize"] == 1 and info["streamArn"] == h.uri
    assert runner.metrics.bisected._value.get() >= 1  # type: ignore[attr-defined]


async def test_partial_batch_response_retries_from_the_first_failure(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        handler="partial",
        keys=("r",),
        destination=True,
        settings={"batch_size": 10, "report_batch_item_failures": True, "max_retries": 2},
    )
    await _fresh(redis_server, "r")
    good = await h.add("r", "g0", "g1", "g2")
    bad = await h.add("r", "bad3")
    rest = await h.add("r", "g4", "g5")
    async with h.running() as runner:
        await until(lambda: h.given_up(), 20, "the failing record given up")
        await until(
            lambda: runner.processors["r"].checkpoint.position == rest[-1],
            10,
            "the checkpoint at the end",
        )
    batches: dict[str, list[str]] = defaultdict(list)
    for record in h.handled():
        batches[record["request"]].append(record["seq"])
    # First the whole batch; then the two retries MaximumRetryAttempts allows, from the failed
    # record on: the records before it count as done. A partial failure uses an attempt, so
    # the record is given up after 3 invokes, as AWS reports (§4.3).
    assert list(batches.values()) == [good + bad + rest] + [bad + rest] * 2
    [failure] = h.given_up()
    assert failure["requestContext"]["approximateInvokeCount"] == 3
    assert failure["responseContext"]["functionError"] is None  # it did not throw
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (bad[0], rest[-1])


async def test_an_identifier_not_in_the_batch_fails_the_whole_batch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        handler="bogus",
        keys=("r2",),
        destination=True,
        settings={"report_batch_item_failures": True, "max_retries": 0},
    )
    await _fresh(redis_server, "r2")
    ids = await h.add("r2", "x", "y")
    async with h.running():
        await until(lambda: h.given_up(), 10, "the batch given up")
    [failure] = h.given_up()
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (ids[0], ids[-1])
    assert any("invalid response" in r.get("message", "") for r in h.logs())


async def test_records_too_old_are_given_up_without_an_invoke(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        keys=("old",),
        destination=True,
        settings={"max_record_age_s": 60.0},
    )
    await _fresh(redis_server, "old")
    long_ago = int(time.time() * 1000) - 120_000
    stale = await h.add("old", "s1", "s2", at_ms=long_ago)
    fresh = await h.add("old", "f1")
    async with h.running():
        await until(lambda: h.given_up() and h.handled(), 10, "old given up, new handled")
    assert [r["seq"] for r in h.handled()] == fresh
    [failure] = h.given_up()
    assert failure["requestContext"]["condition"] == "RecordAgeExceeded"
    assert failure["requestContext"]["approximateInvokeCount"] == 1
    assert "responseContext" not in failure  # never invoked
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (stale[0], stale[-1])


async def test_a_record_over_the_payload_cap_is_given_up_and_its_neighbours_delivered(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        keys=("big",),
        destination=True,
        settings={"max_payload_bytes": 4096, "batch_size": 10},
    )
    await _fresh(redis_server, "big")
    before = await h.add("big", "a", "b")
    [huge] = await h.add("big", "x" * 8192)
    after = await h.add("big", "c", "d")
    async with h.running() as runner:
        await until(lambda: h.given_up() and len(h.handled()) == 4, 10, "huge given up")
        await until(
            lambda: runner.processors["big"].checkpoint.position == after[-1],
            10,
            "the checkpoint past the huge record",
        )
    assert [r["seq"] for r in h.handled()] == before + after
    [failure] = h.given_up()
    assert failure["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert "responseContext" not in failure  # never invoked
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"]) == (huge, huge)


async def test_records_that_age_out_while_retrying_are_given_up(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """MaximumRetryAttempts -1 retries until the records are too old (the 60 s minimum is the
    mapping's rule; the engine takes any age, which keeps this test short)."""
    h = Harness(
        redis_server,
        tmp_path,
        handler="failing",
        keys=("aging",),
        destination=True,
        settings={"max_record_age_s": 1.0, "max_retries": -1},
    )
    await _fresh(redis_server, "aging")
    await h.add("aging", "x")
    async with h.running():
        await until(lambda: h.given_up(), 10, "the record aged out")
    [failure] = h.given_up()
    assert failure["requestContext"]["condition"] == "RecordAgeExceeded"
    assert failure["requestContext"]["approximateInvokeCount"] == len(h.handled()) > 1
    assert failure["responseContext"]["functionError"] is None


async def test_tumbling_windows_carry_state_to_a_final_invoke(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        handler="window",
        keys=("w",),
        settings={"tumbling_window_s": 2, "batch_size": 2},
    )
    await _fresh(redis_server, "w")
    base = (int(time.time()) // 2 * 2 - 10) * 1000
    await h.add("w", "1", "2", "3", at_ms=base)
    await h.add("w", "10", "20", at_ms=base + 2000)
    async with h.running() as runner:
        await until(lambda: sum(r["final"] for r in h.handled()) == 2, 15, "both windows closed")
        await until(lambda: runner.processors["w"].checkpoint.window is None, 5, "state dropped")
    calls = h.handled()
    first, second = calls[0]["window"], calls[-1]["window"]
    assert first["start"] != second["start"]
    assert [(c["window"] == first, c["records"], c["state"]["sum"], c["final"]) for c in calls] == [
        (True, 2, 3, False),
        (True, 1, 6, True),  # the next record opens a later window
        (False, 2, 30, False),
        (False, 0, 30, True),  # read up to now past the window's end: closed, no records
    ]


async def test_window_state_is_kept_in_the_checkpoint_across_restarts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server, tmp_path, handler="window", keys=("w2",), settings={"tumbling_window_s": 900}
    )
    await _fresh(redis_server, "w2")
    await h.add("w2", "5", "7")
    async with h.running() as runner:
        await until(lambda: h.handled(), 10, "first invoke")
        await until(lambda: runner.processors["w2"].checkpoint.window is not None, 5, "saved")
    await h.add("w2", "100")
    async with h.running():
        await until(lambda: len(h.handled()) == 2, 10, "second invoke")
    assert [c["state"]["sum"] for c in h.handled()] == [12, 112]


async def test_a_destination_that_is_down_holds_the_shard(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the destination's directory should be")
    h = Harness(
        redis_server,
        tmp_path,
        handler="poison",
        keys=("d",),
        destination=True,
        destination_path=blocker / "failures.jsonl",
        settings={"max_retries": 0, "batch_size": 1},
    )
    await _fresh(redis_server, "d")
    await h.add("d", "poison")
    later = await h.add("d", "fine")
    async with h.running() as runner:
        processor = runner.processors
        await until(
            lambda: "d" in processor and "destination" in processor["d"].state,
            10,
            "the shard waiting for its destination",
        )
        await asyncio.sleep(1)
        assert h.handled() == []  # nothing after the poison record runs meanwhile
        assert runner.health.status.startswith("PROBLEM: on-failure destination")
        assert "failures.jsonl" in runner.status()["lastError"]  # why, for `poller status`
        assert runner.metrics.destination_failures._value.get() >= 1  # type: ignore[attr-defined]
        blocker.unlink()  # the destination comes back
        await until(lambda: h.handled(), 30, "the shard flowing again")
        assert runner.status()["lastProcessingResult"] == "OK"
        assert runner.status()["lastError"] is None
    assert len(h.given_up()) == 1
    assert [r["seq"] for r in h.handled()] == later


async def test_a_restart_resumes_from_the_checkpoint(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("c",), settings={"batch_size": 10})
    await _fresh(redis_server, "c")
    first = await h.add("c", *[f"a{i}" for i in range(25)])
    async with h.running() as runner:
        await until(lambda: _position(runner, "c") == first[-1], 10, "done")
    second = await h.add("c", *[f"b{i}" for i in range(5)])
    async with h.running() as runner:
        await until(lambda: _position(runner, "c") == second[-1], 10, "done")
    assert [r["seq"] for r in h.handled()] == first + second  # each once


async def test_latest_is_pinned_when_the_mapping_starts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("l",), settings={"starting": LATEST})
    await _fresh(redis_server, "l")
    await h.add("l", "before")
    async with h.running() as runner:
        await until(
            lambda: (
                "l" in runner.processors and runner.processors["l"].checkpoint.position is not None
            ),
            5,
            "pinned",
        )
    # Records added while no runner runs are not skipped by a later start at LATEST.
    meanwhile = await h.add("l", "meanwhile")
    async with h.running():
        await until(lambda: h.handled(), 10, "handled")
    assert [r["seq"] for r in h.handled()] == meanwhile


async def test_at_timestamp_starts_at_the_first_record_of_that_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("t",))
    await _fresh(redis_server, "t")
    now_ms = int(time.time() * 1000)
    await h.add("t", "old", at_ms=now_ms - 5000)
    wanted = await h.add("t", "at", at_ms=now_ms - 2000)
    wanted += await h.add("t", "new")
    h.settings["starting"] = StartAt("at_timestamp", timestamp=(now_ms - 2000) / 1000)
    async with h.running():
        await until(lambda: len(h.handled()) == 2, 10, "handled")
    assert [r["seq"] for r in h.handled()] == wanted


async def test_resuming_from_the_start_of_an_untrimmed_key_reports_nothing_lost(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """TRIM_HORIZON pins "0-0" as the checkpoint; a shard resumed from there (a restart, or a
    fleet handing it over, before its first record) has lost nothing if Redis never removed
    an entry of the key."""
    h = Harness(redis_server, tmp_path, keys=("pinned",))
    await _fresh(redis_server, "pinned")
    async with h.running() as runner:
        await until(lambda: _position(runner, "pinned") == "0-0", 5, "the start pinned")
    ids = await h.add("pinned", "one", "two")
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 2, 10, "both handled")
        assert runner.metrics.records_lost._value.get() == 0  # type: ignore[attr-defined]
    assert [r["seq"] for r in h.handled()] == ids
    assert not any("dropped by the source" in r.get("message", "") for r in h.logs())


async def test_trimmed_history_is_reported_and_reading_goes_on(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("trim",))
    await _fresh(redis_server, "trim")
    first = await h.add("trim", "a")
    async with h.running() as runner:
        await until(lambda: _position(runner, "trim") == first[-1], 5, "a")
    lost = await h.add("trim", "lost1", "lost2")
    kept = await h.add("trim", "kept")
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    await client.xtrim("trim", minid=kept[0], approximate=False)
    await client.aclose()
    async with h.running() as runner:
        await until(lambda: len(h.handled()) == 2, 10, "the record still there handled")
        assert runner.metrics.records_lost._value.get() == 1  # type: ignore[attr-defined]
    assert [r["seq"] for r in h.handled()] == first + kept
    assert lost[0] not in {r["seq"] for r in h.handled()}
    assert any("dropped by the source" in r.get("message", "") for r in h.logs())


async def test_a_later_claim_fences_an_earlier_owner(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The checkpoint write of an owner whose claim is stale is refused: it lets the shard go
    and can never move the checkpoint back or forward (the base of fleet leases)."""
    store = SqliteStore(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    h = Harness(redis_server, tmp_path, keys=("f",))
    await _fresh(redis_server, "f")
    try:
        async with h.running(store) as runner:
            await h.add("f", "one")
            await until(lambda: h.handled(), 10, "first record")
            await store.claim_shard("m", "f", "someone-else")  # another owner takes the shard
            await h.add("f", "two")
            await until(lambda: "f" in runner.lost, 10, "the shard let go")
            assert runner.processors.get("f") is None
            # Not taken back: its new owner has it.
            assert await runner.ownership.take([Shard("f")]) == []
        assert any("refused" in r.get("message", "") for r in h.logs())
        checkpoints = await store.list_checkpoints("m")
        assert checkpoints["f"].position == h.handled()[0]["seq"]
    finally:
        await store.close()


async def test_entries_become_kinesis_records_and_nothing_is_lost(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Every shape of entry a Redis user may write is delivered faithfully (§7.2)."""
    h = Harness(redis_server, tmp_path, keys=("shape",))
    await _fresh(redis_server, "shape")
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    entries = [
        {"body": "plain"},
        {"body": "keyed", "pk": "user-1"},
        {"pk": "user-2", "body": "key first"},
        {"body": "odd key", "pk": 'a "quoted" \\ key'},
        {"body": "unicode key", "pk": "clé"},
        {"body": b"\xff\xfe binary"},
        {"body": "more", "pk": "k", "trace": "t-1", "blob": b"\xff"},
        {"note": "no body at all"},
    ]
    ids = [(await client.xadd("shape", fields)).decode() for fields in entries]
    await client.aclose()
    source = h.uri
    async with h.running() as runner:
        reader = await runner.source.open_reader(Shard("shape"), TRIM_HORIZON)
        result = await reader.read(100, 0)
    records = [json.loads(r.encoded) for r in result.records]
    assert [r.sequence for r in result.records] == ids
    ms = [int(i.split("-")[0]) for i in ids]
    for record, entry_id, arrival in zip(records, ids, ms, strict=True):
        assert record["eventSource"] == "aws:kinesis" and record["eventVersion"] == "1.0"
        assert record["eventName"] == "aws:kinesis:record"
        assert record["eventID"] == f"shape:{entry_id}"
        assert record["eventSourceARN"] == source
        assert record["kinesis"]["sequenceNumber"] == entry_id
        assert record["kinesis"]["kinesisSchemaVersion"] == "1.0"
        assert record["kinesis"]["approximateArrivalTimestamp"] == arrival / 1000
        assert record["invokeIdentityArn"] == "arn:aws:iam::000000000000:role/poller"
    data = [base64.b64decode(r["kinesis"]["data"]) for r in records]
    assert data == [
        b"plain",
        b"keyed",
        b"key first",
        b"odd key",
        b"unicode key",
        b"\xff\xfe binary",
        b"more",
        b"",
    ]
    keys = [r["kinesis"]["partitionKey"] for r in records]
    assert keys == [ids[0], "user-1", "user-2", 'a "quoted" \\ key', "clé", ids[5], "k", ids[7]]
    assert [r.partition_key for r in result.records] == keys
    assert records[6]["fields"] == {"trace": "t-1"}
    assert records[6]["binaryFields"] == {"blob": base64.b64encode(b"\xff").decode()}
    assert records[7]["fields"] == {"note": "no body at all"}
    assert all("fields" not in r for r in records[:6])


class _Revoking(StoreOwnership):
    """Single-node ownership that can take a shard away, as a rebalance or a lost lease does."""

    def __init__(self, store: Any, settings: Any) -> None:
        super().__init__(store, settings.uuid, settings.owner)
        self.taken_away: set[str] = set()
        self.released: list[str] = []
        self._on_change: Any = None

    async def start(self, on_change: Any) -> None:
        self._on_change = on_change

    async def take(self, startable: Any) -> list[Any]:
        return [s for s in startable if s.id not in self.taken_away]

    def revoked(self) -> set[str]:
        return set(self.taken_away)

    def take_away(self, shard: str) -> None:
        self.taken_away.add(shard)
        self._on_change()

    async def release(self, shard: Any, token: int) -> None:
        self.released.append(shard.id)


async def test_a_shard_taken_away_settles_its_batch_and_is_released(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        keys=("x", "y"),
        environment={"SLEEP": "0.5"},
        settings={"batch_size": 2},
    )
    await _fresh(redis_server, "x", "y")
    xs = await h.add("x", "x0", "x1", "x2", "x3")
    ys = await h.add("y", "y0", "y1")
    made: list[_Revoking] = []

    def ownership(store: Any, settings: Any) -> _Revoking:
        made.append(_Revoking(store, settings))
        return made[0]

    async with h.running(ownership=ownership) as runner:
        # Taken away while its second batch sleeps in the handler.
        await until(lambda: any(r["shard"] == "x" for r in h.handled()), 10, "x started")
        made[0].take_away("x")
        await until(lambda: "x" not in runner.processors, 10, "x let go")
        await until(lambda: len([r for r in h.handled() if r["shard"] == "y"]) == 2, 10, "y")
    assert made[0].released[0] == "x"
    done_x = [r["seq"] for r in h.handled() if r["shard"] == "x"]
    assert done_x == xs[: len(done_x)] and done_x  # what ran, ran in order; then it stopped
    checkpoints = await _checkpoints(tmp_path)
    assert checkpoints["x"] == done_x[-1]  # the batch in flight settled and was checkpointed
    assert checkpoints["y"] == ys[-1]


async def _checkpoints(tmp: Path) -> dict[str, str | None]:
    store = SqliteStore(f"sqlite:///{tmp}/state.db")
    await store.open()
    try:
        return {k: v.position for k, v in (await store.list_checkpoints("m")).items()}
    finally:
        await store.close()


class _RevokingMidPass(StoreOwnership):
    """Takes a shard away while the runner is busy in its pass (inside take()), as a lease
    pass running beside it does."""

    def __init__(self, store: Any, settings: Any) -> None:
        super().__init__(store, settings.uuid, settings.owner)
        self.to_take_away: set[str] = set()
        self.taken_away: set[str] = set()
        self._on_change: Any = None

    async def start(self, on_change: Any) -> None:
        self._on_change = on_change

    async def take(self, startable: Any) -> list[Any]:
        if self.to_take_away:
            self.taken_away |= self.to_take_away
            self.to_take_away = set()
            self._on_change()
        return [s for s in startable if s.id not in self.taken_away]

    def revoked(self) -> set[str]:
        return set(self.taken_away)


async def test_a_change_signalled_while_the_runner_is_busy_is_acted_on_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("w",))
    await _fresh(redis_server, "w")
    made: list[_RevokingMidPass] = []

    def ownership(store: Any, settings: Any) -> _RevokingMidPass:
        made.append(_RevokingMidPass(store, settings))
        return made[0]

    async with h.running(ownership=ownership) as runner:
        await until(lambda: "w" in runner.processors, 10, "w started")
        made[0].to_take_away.add("w")
        made[0]._on_change()
        # Well within the runner's 10 s round: the wake-up from inside the pass was kept.
        await until(lambda: "w" not in runner.processors, 3, "w let go")


class _SlowWrites(StoreOwnership):
    """Checkpoint writes that take a while; each notes its position and how many records the
    handler had been given when it started and when it ended."""

    def __init__(self, store: Any, settings: Any, handled: Any) -> None:
        super().__init__(store, settings.uuid, settings.owner)
        self.handled = handled
        self.writes: list[tuple[str, int, int]] = []

    async def write(self, shard: Any, token: int, checkpoint: Any) -> None:
        started = len(self.handled())
        await asyncio.sleep(0.2)
        await super().write(shard, token, checkpoint)
        self.writes.append((checkpoint.position, started, len(self.handled())))


async def test_checkpoints_are_written_behind_the_lanes_and_drained_on_stop(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=("w",), settings={"batch_size": 5})
    await _fresh(redis_server, "w")
    ids = await h.add("w", *[f"w{i}" for i in range(60)])
    made: list[_SlowWrites] = []

    def ownership(store: Any, settings: Any) -> _SlowWrites:
        made.append(_SlowWrites(store, settings, h.handled))
        return made[0]

    async with h.running(ownership=ownership):
        await until(lambda: len(h.handled()) >= 30, 20, "half the records handled")
    # Stopped with a write out and a newer position queued behind it: both were written.
    assert (await _checkpoints(tmp_path))["w"] == h.handled()[-1]["seq"]
    # (The first write pins TRIM_HORIZON's start, "0-0", before anything is read.)
    writes = [w for w in made[0].writes if w[0] in ids]
    positions = [ids.index(w[0]) + 1 for w in writes]
    assert positions == sorted(positions)
    # The lane invoked its next batch while a write was out...
    assert all(ended > done for done, (_, _, ended) in zip(positions[:-1], writes, strict=False))
    # ...but went no further than one batch queued behind it and one in the handler: a crash
    # repeats at most a batch more than when every batch waited for its own write.
    assert all(seen <= done + 2 * 5 for done, (_, seen, _) in zip(positions, writes, strict=True))
