"""Several stream runners of one mapping sharing a Redis state store (in-process, real
redis-server, real workers): leases split the shards, hand them over gracefully, and hold
parent-before-child across daemons."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from poller.engine.lease_ownership import LeaseOwnership
from poller.engine.stream import StreamRunner
from poller.logs import JsonLog
from poller.sources.base import ReadResult, Shard, StartAt
from poller.state.redis import RedisStore
from tests.integration.stream_harness import Harness, until
from tests.servers import RedisServer

KEYS = tuple(f"k{i}" for i in range(8))


class _Fleet:
    """Runners of mapping "m" over one Redis store, started and stopped one by one."""

    def __init__(self, h: Harness, server: RedisServer, duration_s: float = 3.0) -> None:
        self.h = h
        self.url = server.url
        self.prefix = f"fleet-{uuid.uuid4().hex[:8]}:"
        self.duration_s = duration_s
        self.runners: dict[str, StreamRunner] = {}
        self.ownerships: dict[str, LeaseOwnership] = {}
        self._stacks: dict[str, contextlib.AsyncExitStack] = {}
        self.wrap_source: Any = None

    async def start(self, name: str) -> StreamRunner:
        stack = contextlib.AsyncExitStack()
        store = RedisStore(self.url, key_prefix=self.prefix)
        await store.open()
        stack.push_async_callback(store.close)

        def ownership(store: Any, settings: Any) -> LeaseOwnership:
            made = LeaseOwnership(
                store,
                store.leases,
                settings.uuid,
                name,
                duration_s=self.duration_s,
                log=JsonLog(self.h.log_stream, level="debug"),
                fields={"mapping": settings.uuid, "daemon": name},
            )
            self.ownerships[name] = made
            return made

        runner = await stack.enter_async_context(
            self.h.running(store, ownership, owner=name, wrap_source=self.wrap_source)
        )
        self.runners[name] = runner
        self._stacks[name] = stack
        return runner

    async def stop(self, name: str) -> None:
        del self.runners[name]
        await self._stacks.pop(name).aclose()

    async def close(self) -> None:
        for name in list(self.runners):
            await self.stop(name)

    def load(self) -> dict[str, int]:
        return {
            name: len([p for p in r.processors.values() if not p.stopping])
            for name, r in self.runners.items()
        }

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.h.logs() if r.get("message") == message]


@contextlib.asynccontextmanager
async def _fleet(h: Harness, server: RedisServer, **kw: Any) -> AsyncIterator[_Fleet]:
    fleet = _Fleet(h, server, **kw)
    try:
        yield fleet
    finally:
        await fleet.close()


async def _fresh(server: RedisServer, *keys: str) -> None:
    client = aioredis.Redis(host=server.host, port=server.port)
    await client.delete(*keys)
    await client.aclose()


def _per_shard(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = defaultdict(list)
    for record in records:
        seen[record["shard"]].append(record["seq"])
    return seen


async def test_three_runners_split_eight_shards_and_hand_over_without_duplicates(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server, tmp_path, keys=KEYS, settings={"batch_size": 5}, environment={"SLEEP": "0.02"}
    )
    await _fresh(redis_server, *KEYS)
    expected = {key: await h.add(key, *[f"{key}-{i}" for i in range(60)]) for key in KEYS}
    async with _fleet(h, redis_server) as fleet:
        await fleet.start("a")
        await until(lambda: fleet.load() == {"a": 8}, 20, "a alone takes all eight")
        await fleet.start("b")
        await until(lambda: sorted(fleet.load().values()) == [4, 4], 30, "balanced over two")
        await fleet.start("c")
        await until(lambda: sorted(fleet.load().values()) == [2, 3, 3], 30, "balanced over three")
        await until(lambda: len(h.handled()) >= 8 * 60, 60, "every record handled")
        # Exactly the shards that had to move moved, one at a time: four to b, then one
        # from each of a and b to c.
        handed = [(r["daemon"], r["to"]) for r in fleet.logged("shard handed over")]
        assert sorted(handed) == sorted([("a", "b")] * 4 + [("a", "c"), ("b", "c")]), handed
        assert (
            fleet.logged("lease lost (expired, or taken by another daemon): letting the shard go")
            == []
        )
    # Shards handed over after their batches settled: each record exactly once, in order.
    assert _per_shard(h.handled()) == expected


async def test_a_runner_that_stops_hands_its_shards_over_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=KEYS, settings={"batch_size": 10})
    await _fresh(redis_server, *KEYS)
    # Leases of 30 s: a hand-over that waited for one to lapse would time out below.
    async with _fleet(h, redis_server, duration_s=30) as fleet:
        for name in ("a", "b", "c"):
            await fleet.start(name)
        await until(lambda: sorted(fleet.load().values()) == [2, 3, 3], 30, "balanced")
        before = {key: await h.add(key, f"{key}-before") for key in KEYS}
        await until(lambda: len(h.handled()) == 8, 20, "first records")
        held_by_c = set(fleet.runners["c"].processors)
        started = time.monotonic()
        await fleet.stop("c")
        await until(lambda: sorted(fleet.load().values()) == [4, 4], 10, "taken over")
        took = time.monotonic() - started
        after = {key: await h.add(key, f"{key}-after") for key in KEYS}
        await until(lambda: len(h.handled()) == 16, 20, "records after the hand-over")
        assert took < 5, took
        assert held_by_c and not held_by_c & set(fleet.ownerships["c"].held)
    assert _per_shard(h.handled()) == {k: before[k] + after[k] for k in KEYS}


class _Resharded:
    """redis-stream where key "p" is a closed parent (its reader ends once it read everything
    there is) and key "c" its child."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def shards(self) -> list[Shard]:
        return [Shard("p", closed=True), Shard("c", parents=("p",))]

    async def open_reader(self, shard: Shard, start: StartAt) -> Any:
        reader = await self.inner.open_reader(shard, start)
        return _Ending(reader) if shard.closed else reader


class _Ending:
    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.start_point = reader.start_point

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        result: ReadResult = await self.reader.read(limit, 0)
        return result if result.records else ReadResult([], end=True)

    async def close(self) -> None:
        await self.reader.close()


async def test_a_child_waits_for_its_parent_on_whichever_daemon_holds_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(
        redis_server,
        tmp_path,
        keys=("p", "c"),
        settings={"batch_size": 2},
        environment={"SLEEP": "0.2"},
    )
    await _fresh(redis_server, "p", "c")
    parent = await h.add("p", *[f"p{i}" for i in range(8)])
    child = await h.add("c", *[f"c{i}" for i in range(4)])
    async with _fleet(h, redis_server) as fleet:
        fleet.wrap_source = _Resharded
        await fleet.start("a")
        await fleet.start("b")
        await until(lambda: len(h.handled()) == 12, 40, "parent and child handled")
        holders = {r["shard"]: r["daemon"] for r in fleet.logged("lease taken")}
    handled = h.handled()
    assert _per_shard(handled) == {"p": parent, "c": child}
    # Every record of the parent before any of the child, wherever each ran.
    assert [r["shard"] for r in handled] == ["p"] * 8 + ["c"] * 4
    assert set(holders) == {"p", "c"}


async def test_leases_held_and_reports_show_where_shards_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    h = Harness(redis_server, tmp_path, keys=KEYS[:4])
    await _fresh(redis_server, *KEYS[:4])
    async with _fleet(h, redis_server) as fleet:
        await fleet.start("a")
        await fleet.start("b")
        await until(lambda: sorted(fleet.load().values()) == [2, 2], 30, "balanced")
        store = RedisStore(redis_server.url, key_prefix=fleet.prefix)
        await store.open()
        try:
            leases = await store.leases.leases("m")
            assert Counter(lease.owner for lease in leases.values()) == {"a": 2, "b": 2}

            async def reported() -> dict[str, str]:
                return {
                    s["shardId"]: owner
                    for owner, shards in (await store.leases.reports("m")).items()
                    for s in shards
                }

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if await reported() == {s: lease.owner for s, lease in leases.items()}:
                    break
                await asyncio.sleep(0.1)
            assert await reported() == {s: lease.owner for s, lease in leases.items()}
        finally:
            await store.close()


async def test_a_store_gone_past_the_lease_lets_shards_go_and_they_resume_after(
    persistent_redis: RedisServer, tmp_path: Path
) -> None:
    keys = KEYS[:4]
    h = Harness(persistent_redis, tmp_path, keys=keys, settings={"batch_size": 5})
    first = {key: await h.add(key, *[f"{key}-{i}" for i in range(20)]) for key in keys}
    async with _fleet(h, persistent_redis, duration_s=2) as fleet:
        await fleet.start("a")
        await fleet.start("b")
        await until(lambda: sorted(fleet.load().values()) == [2, 2], 30, "balanced")
        await until(lambda: len(h.handled()) >= 80, 30, "the first records")
        persistent_redis.kill()
        lapsed = "shard leases lapsed while the state store was unreachable: letting every shard go"
        await until(lambda: len(fleet.logged(lapsed)) == 2, 20, "both daemons letting go")
        persistent_redis.start()
        second = {key: await h.add(key, *[f"{key}-late-{i}" for i in range(20)]) for key in keys}
        await until(
            lambda: (
                {(r["shard"], r["seq"]) for r in h.handled()}
                >= {(k, s) for k in keys for s in first[k] + second[k]}
            ),
            40,
            "every record handled after the restart",
        )
        await until(lambda: sorted(fleet.load().values()) == [2, 2], 30, "balanced again")
    # At least once, in order: the first delivery of each record in stream order per shard.
    for key in keys:
        firsts = list(dict.fromkeys(r["seq"] for r in h.handled() if r["shard"] == key))
        assert firsts == first[key] + second[key]


async def test_a_lease_handed_to_a_daemon_as_it_stops_is_passed_on(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = RedisStore(redis_server.url, key_prefix=f"fleet-{uuid.uuid4().hex[:8]}:")
    await store.open()
    try:
        leases = store.leases
        log = JsonLog(io.BytesIO())
        stopping = LeaseOwnership(store, leases, "m", "a", duration_s=30, log=log, fields={})
        token = await leases.take("m", "s0", "b", 30_000)
        await leases.lease_pass("m", "a", 30_000, {}, member=True)
        assert await leases.ask("m", "s0", "b", "a")
        # b hands it over just before a leaves: a now holds a lease no processor of it has.
        assert await leases.release("m", "s0", "b", token, 30_000) == "a"
        await stopping.leaving()
        await stopping.close()
        lease = (await leases.leases("m"))["s0"]
        assert lease.owner is None  # free for the daemons that stay, not left to lapse
    finally:
        await store.close()


async def test_the_lease_pass_goes_on_after_an_unexpected_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = RedisStore(redis_server.url, key_prefix=f"fleet-{uuid.uuid4().hex[:8]}:")
    await store.open()

    class Flaky:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.passes = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def lease_pass(self, *args: Any, **kw: Any) -> Any:
            self.passes += 1
            if self.passes == 1:
                raise RuntimeError("a bug")
            return await self.inner.lease_pass(*args, **kw)

    logged = io.BytesIO()
    flaky = Flaky(store.leases)
    ownership = LeaseOwnership(store, flaky, "m", "a", duration_s=1, log=JsonLog(logged), fields={})
    try:
        await ownership.start(lambda: None)
        await until(lambda: flaky.passes >= 3, 5, "passes after the error")
        members = (await store.leases.lease_pass("m", "b", 1000, {}, member=True)).view.members
        assert "a" in members
        assert b"lease pass failed: RuntimeError('a bug')" in logged.getvalue()
    finally:
        await ownership.close()
        await store.close()
