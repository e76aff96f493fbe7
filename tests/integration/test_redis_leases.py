"""Shard leases in the Redis state store (state/redis_leases.py), against a real redis-server:
take, renew, expiry on the server's clock, fencing of checkpoint writes, hand-over, nudges,
membership and reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from poller.state.base import Checkpoint, StaleClaimError
from poller.state.redis import RedisStore
from poller.state.redis_leases import RedisLeases

U = "mapping-1"


@asynccontextmanager
async def _leases(url: str) -> AsyncIterator[RedisLeases]:
    store = RedisStore(url, key_prefix="lease-test:")
    await store.open()
    try:
        yield store.leases
    finally:
        await store.close()


async def test_a_lease_is_taken_once_until_it_expires_on_the_servers_clock(
    redis_url: str,
) -> None:
    async with _leases(redis_url) as leases:
        token = await leases.take(U, "s0", "a", 300)
        assert token == 1
        assert await leases.take(U, "s0", "b", 300) == 0  # a holds it
        again = await leases.take(U, "s0", "a", 300)  # its own: taken again, a new token
        assert again == 2
        await asyncio.sleep(0.4)
        assert await leases.take(U, "s0", "b", 10_000) == 3  # expired: anyone may take it
        lease = (await leases.leases(U))["s0"]
        assert (lease.owner, lease.counter, lease.taken) == ("b", 3, 3)


async def test_renewing_bumps_the_counter_and_keeps_the_token(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        token = await leases.take(U, "s0", "a", 300)
        for _ in range(3):
            await asyncio.sleep(0.15)
            result = await leases.lease_pass(U, "a", 300, {"s0": token}, member=True)
            assert result.renewed["s0"] > 0
        lease = (await leases.leases(U))["s0"]
        # 0.45 s after a 0.3 s take: alive only because it was renewed.
        assert lease.held_at(result.view.now_ms) and lease.counter == token + 3
        assert lease.taken == token
        await leases.write_checkpoint(U, "s0", "a", token, Checkpoint("5-0"))
        assert await leases.read_checkpoint(U, "s0") == Checkpoint("5-0")


async def test_checkpoint_writes_are_refused_once_the_lease_expired_or_moved(
    redis_url: str,
) -> None:
    async with _leases(redis_url) as leases:
        token = await leases.take(U, "s0", "a", 200)
        await leases.write_checkpoint(U, "s0", "a", token, Checkpoint("1-0", {"n": 1}))
        await asyncio.sleep(0.3)
        # Paused past its lease, nobody took it yet: refused all the same.
        with pytest.raises(StaleClaimError, match="its lease expired"):
            await leases.write_checkpoint(U, "s0", "a", token, Checkpoint("2-0"))
        renewed = await leases.lease_pass(U, "a", 200, {"s0": token}, member=True)
        assert renewed.renewed == {"s0": 0}  # an expired lease is not renewed either
        theirs = await leases.take(U, "s0", "b", 10_000)
        with pytest.raises(StaleClaimError, match="moved to b"):
            await leases.write_checkpoint(U, "s0", "a", token, Checkpoint("2-0"))
        await leases.write_checkpoint(U, "s0", "b", theirs, Checkpoint("3-0"))
        # The old holder taking it back later gets a new token: its old one stays fenced.
        await leases.release(U, "s0", "b", theirs, 10_000)
        mine = await leases.take(U, "s0", "a", 10_000)
        with pytest.raises(StaleClaimError, match="taken again"):
            await leases.write_checkpoint(U, "s0", "a", token, Checkpoint("9-0"))
        await leases.write_checkpoint(U, "s0", "a", mine, Checkpoint("4-0"))
        assert await leases.read_checkpoint(U, "s0") == Checkpoint("4-0")
        with pytest.raises(StaleClaimError, match="nobody holds its lease"):
            await leases.write_checkpoint(U, "never", "a", 1, Checkpoint("1-0"))


async def test_a_lease_asked_for_goes_to_the_asker_on_release(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        nudges = await leases.subscribe(U)
        try:
            token = await leases.take(U, "s0", "a", 10_000)
            await leases.lease_pass(U, "b", 10_000, {}, member=True)  # b runs the mapping
            assert await leases.ask(U, "s0", "a", "b")
            assert await nudges.wait(5)
            assert not await leases.ask(U, "s0", "a", "c")  # one request at a time
            assert (await leases.leases(U))["s0"].handoff == "b"
            assert await leases.release(U, "s0", "a", token, 10_000) == "b"
            assert await nudges.wait(5)
            lease = (await leases.leases(U))["s0"]
            assert (lease.owner, lease.handoff, lease.taken) == ("b", None, lease.counter)
            assert lease.taken > token
            # Released again with a stale token: refused.
            assert await leases.release(U, "s0", "a", token, 10_000) is None
        finally:
            await nudges.close()


async def test_a_lease_asked_for_by_a_daemon_gone_since_is_freed(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        token = await leases.take(U, "s0", "a", 10_000)
        await leases.lease_pass(U, "b", 200, {}, member=True)
        assert await leases.ask(U, "s0", "a", "b")
        await asyncio.sleep(0.3)  # b's membership lapses
        assert await leases.release(U, "s0", "a", token, 10_000) == ""
        lease = (await leases.leases(U))["s0"]
        assert lease.owner is None and lease.handoff is None


async def test_the_pass_lists_live_members_and_forgets_lapsed_ones(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        await leases.lease_pass(U, "a", 10_000, {}, member=True)
        await leases.lease_pass(U, "gone", 200, {}, member=True)
        await leases.report(U, "a", [{"shardId": "s0", "state": "reading"}])
        await leases.report(U, "gone", [{"shardId": "s1", "state": "reading"}])
        assert set(await leases.reports(U)) == {"a", "gone"}
        await asyncio.sleep(0.3)
        result = await leases.lease_pass(U, "b", 10_000, {}, member=True)
        assert result.view.members == {"a", "b"}
        assert set(await leases.reports(U)) == {"a"}  # a lapsed member's report is gone
        # Leaving: not counted any more, at once.
        await leases.leave(U, "a", drop_report=True)
        result = await leases.lease_pass(U, "b", 10_000, {}, member=True)
        assert result.view.members == {"b"}
        # A member that is leaving keeps renewing what it holds without being counted.
        token = await leases.take(U, "s0", "c", 10_000)
        result = await leases.lease_pass(U, "c", 10_000, {"s0": token}, member=False)
        assert result.view.members == {"b"} and result.renewed["s0"] > 0


async def test_shard_reports_come_from_the_lease_holder(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        for owner in ("a", "b"):
            await leases.lease_pass(U, owner, 10_000, {}, member=True)
        await leases.take(U, "s0", "b", 10_000)
        await leases.report(U, "a", [{"shardId": "s0", "state": "stopped"}])
        await leases.report(
            U,
            "b",
            [
                {"shardId": "s0", "state": "reading", "iteratorAgeSeconds": 1.5},
                {"shardId": "s1", "state": "finished"},
            ],
        )
        assert await leases.shard_reports(U) == [
            {"shardId": "s0", "state": "reading", "iteratorAgeSeconds": 1.5},
            {"shardId": "s1", "state": "finished"},
        ]


async def test_fleet_membership(redis_url: str) -> None:
    async with _leases(redis_url) as leases:
        await leases.heartbeat("a", 10_000, {"host": "h1", "pid": 1})
        await leases.heartbeat("b", 200, {"host": "h2", "pid": 2})
        now, members = await leases.members()
        assert {m.owner: m.info for m in members} == {
            "a": {"host": "h1", "pid": 1},
            "b": {"host": "h2", "pid": 2},
        }
        assert all(m.expires_ms > now for m in members)
        await asyncio.sleep(0.3)
        assert [m.owner for m in (await leases.members())[1]] == ["a"]
        await leases.leave_fleet("a")
        assert (await leases.members())[1] == []


async def test_leases_go_with_the_mapping(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix="lease-test:")
    await store.open()
    try:
        await store.put_mapping({"uuid": U, "function_name": "f", "event_source_arn": "x"})
        token = await store.leases.take(U, "s0", "a", 10_000)
        await store.leases.write_checkpoint(U, "s0", "a", token, Checkpoint("1-0"))
        await store.leases.lease_pass(U, "a", 10_000, {"s0": token}, member=True)
        await store.leases.report(U, "a", [])
        assert await store.delete_mapping(U)
        assert await store.leases.leases(U) == {}
        assert await store.list_checkpoints(U) == {}
        assert await store.leases.reports(U) == {}
        raw = store._client()
        assert await raw.keys("lease-test:*" + U + "*") == []
    finally:
        await store.close()
