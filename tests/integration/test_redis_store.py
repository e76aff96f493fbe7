"""RedisStore against a real redis-server (the session fixture): the StateStore contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from poller.state.base import Checkpoint, StateError, open_store
from poller.state.redis import RedisStore
from tests.servers import TlsRedisServer, free_port
from tests.state_contract import check_checkpoints


@asynccontextmanager
async def _store(url: str, prefix: str = "poller:") -> AsyncIterator[RedisStore]:
    store = RedisStore(url, key_prefix=prefix)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _mapping(uuid: str, **extra: Any) -> dict[str, Any]:
    return {"uuid": uuid, "function_name": "fn", "event_source_arn": "local://q", **extra}


async def test_open_store_picks_redis(redis_url: str) -> None:
    store = open_store(redis_url, key_prefix="x:")
    assert isinstance(store, RedisStore)
    await store.open()
    try:
        assert await store.ping() is True
    finally:
        await store.close()


async def test_tls_url_with_the_ca_in_the_query(tls_redis: TlsRedisServer) -> None:
    # rediss:// plus redis-py's ssl_ca_certs option: a store on a TLS-only server.
    url = f"{tls_redis.url}?ssl_ca_certs={tls_redis.ca_file}"
    async with _store(url, prefix="tls-test:") as store:
        await store.put_mapping(_mapping("t"))
        assert await store.get_mapping("t") == _mapping("t")
        assert await store.delete_mapping("t") is True


async def test_registry_crud_and_revision(redis_url: str) -> None:
    async with _store(redis_url) as store:
        assert await store.revision() == 0
        assert await store.list_mappings() == []
        assert await store.get_mapping("a") is None

        await store.put_mapping(_mapping("a", batch_size=10))
        await store.put_mapping(_mapping("b"))
        assert await store.revision() == 2
        assert await store.get_mapping("a") == _mapping("a", batch_size=10)

        # An update replaces the document, keeps its place in the listing, bumps the revision.
        await store.put_mapping(_mapping("a", batch_size=99))
        assert await store.revision() == 3
        assert [m["uuid"] for m in await store.list_mappings()] == ["a", "b"]
        assert (await store.get_mapping("a") or {})["batch_size"] == 99

        assert await store.delete_mapping("a") is True
        assert await store.revision() == 4
        assert await store.delete_mapping("a") is False
        assert await store.revision() == 4  # nothing changed: no bump
        assert [m["uuid"] for m in await store.list_mappings()] == ["b"]

        with pytest.raises(StateError, match="uuid"):
            await store.put_mapping({"function_name": "fn"})


async def test_registry_change_is_published(redis_url: str) -> None:
    async with _store(redis_url) as store:
        client = aioredis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(store.channel)
            await pubsub.get_message(timeout=1)  # the subscribe confirmation
            await store.put_mapping(_mapping("a"))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None and message["data"] == b"1"
        finally:
            await pubsub.aclose()
            await client.aclose()


async def test_two_instances_see_each_others_writes(redis_url: str) -> None:
    async with _store(redis_url) as one, _store(redis_url) as two:
        await one.put_mapping(_mapping("a"))
        assert await two.revision() == 1
        assert await two.get_mapping("a") == _mapping("a")
        await two.put_mapping(_mapping("b"))
        assert [m["uuid"] for m in await one.list_mappings()] == ["a", "b"]
        claim = await one.claim_shard("a", "shard-0", "daemon")
        await one.set_checkpoint("a", "shard-0", claim.token, Checkpoint("42"))
        assert await two.list_checkpoints("a") == {"shard-0": Checkpoint("42")}
        assert await two.delete_mapping("a") is True
        assert await one.revision() == 3
        assert await one.get_mapping("a") is None


async def test_status_merges_and_does_not_bump_revision(redis_url: str) -> None:
    async with _store(redis_url) as store:
        await store.put_mapping(_mapping("a"))
        revision = await store.revision()
        assert await store.get_status("a") == {}
        await store.set_status("a", {"LastProcessingResult": "OK", "Count": 3})
        await store.set_status("a", {"State": "Enabled", "Count": None})
        assert await store.get_status("a") == {"LastProcessingResult": "OK", "State": "Enabled"}
        assert await store.revision() == revision


async def test_checkpoints(redis_url: str) -> None:
    async with _store(redis_url) as store:
        await check_checkpoints(store, _mapping("a"))


async def test_prefix_isolation(redis_url: str) -> None:
    async with _store(redis_url, "blue:") as blue, _store(redis_url, "green:") as green:
        await blue.put_mapping(_mapping("a"))
        claim = await blue.claim_shard("a", "s", "daemon")
        await blue.set_checkpoint("a", "s", claim.token, Checkpoint("1"))
        assert await green.revision() == 0
        assert await green.list_mappings() == []
        assert await green.list_checkpoints("a") == {}
        await green.put_mapping(_mapping("b"))
        assert [m["uuid"] for m in await blue.list_mappings()] == ["a"]
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = {k.decode() for k in await client.keys("*")}
    finally:
        await client.aclose()
    assert keys and all(k.startswith(("blue:", "green:")) for k in keys)


async def test_unreachable_redis_is_a_state_error_with_redacted_url() -> None:
    url = f"redis://admin:s3cret@127.0.0.1:{free_port()}/0"
    store = RedisStore(url)
    with pytest.raises(StateError) as caught:
        await store.open()
    text = str(caught.value)
    assert "s3cret" not in text
    assert f"redis://admin:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in text
    assert "[state] url" in text  # the hint names what to change
    assert await store.ping() is False
    await store.close()


async def test_wrong_password_is_a_state_error(redis_url: str) -> None:
    host_port = redis_url.removeprefix("redis://").rsplit("/", 1)[0]
    store = RedisStore(f"redis://nobody:wrong@{host_port}/0")
    with pytest.raises(StateError, match="credentials") as caught:
        await store.open()
    assert ":wrong@" not in str(caught.value)
    assert "nobody:***@" in str(caught.value)
