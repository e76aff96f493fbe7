"""redis-queue acks (delete without delete_on_ack) and reads are XACKs and XREADGROUPs packed
by the source itself on connections it keeps (RedisLink.raw); what redis-py would otherwise
guarantee must still hold."""

from __future__ import annotations

import asyncio

from poller.sources.redis_queue.queue import ID_CHUNK
from tests.integration.test_redis_queue import KEY, _admin, _pending, _receive_all, _started
from tests.integration.test_redis_queue import _uri as _queue_uri
from tests.servers import RedisServer


async def test_delete_of_several_chunks_acks_them_all(redis_server: RedisServer) -> None:
    count = ID_CHUNK + ID_CHUNK // 2  # two XACKs in one write, two replies
    async with _started(_queue_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await admin.delete(KEY)
        await queue.start()
        assert await queue.send([f"m{i}" for i in range(count)]) == count
        messages = await _receive_all(queue, count)
        assert len(messages) == count
        await queue.delete(messages)
        assert await _pending(admin) == 0
        # The connection is still in step: the next command on it gets its own reply.
        assert len(queue._link._raw_idle) == 1
        await queue.send(["next"])
        [message] = await _receive_all(queue, 1)
        assert message.body == "next"
        assert len(queue._link._raw_idle) == 1


async def test_error_reply_leaves_no_reply_behind_for_the_next_command(
    redis_server: RedisServer,
) -> None:
    async with _started(_queue_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await admin.delete(KEY)
        await queue.start()
        await queue.send(["a", "b"])
        messages = await _receive_all(queue, 2)
        # The group vanishes. XACK to a missing group acks nothing (Redis answers 0); the
        # next XREADGROUP gets a NOGROUP error reply, the group is re-created at 0 and the
        # read retried.
        await admin.xgroup_destroy(KEY, "mapping-uuid")
        await queue.delete(messages * (ID_CHUNK // 2 + 1))  # several chunks in one write
        await queue.send(["c"])
        next_used = queue._link._raw_idle[-1]
        later = await _receive_all(queue, 3)
        # The connection that got the error reply was closed, not put back.
        assert all(c is not next_used for c in queue._link._raw_idle)
        assert sorted(m.body for m in later) == ["a", "b", "c"]  # re-created at 0
        await queue.delete(later)
        assert await _pending(admin) == 0


async def test_ack_queued_with_a_read_goes_out_in_the_same_round_trip(
    redis_server: RedisServer,
) -> None:
    async with _started(_queue_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await admin.delete(KEY)
        await queue.start()
        await queue.send(["a", "b"])
        [first] = await _receive_all(queue, 1)
        sent: list[bytes] = []
        raw = queue._link.raw

        async def spy(packed: bytes, replies: int, block_ms: int = 0) -> list[object]:
            sent.append(packed)
            return await raw(packed, replies, block_ms)

        queue._link.raw = spy  # type: ignore[method-assign]
        # A delete and a receive started in the same loop turn, as a poller's settle and its
        # next receive are.
        ack = asyncio.ensure_future(queue.delete([first]))
        [second] = await queue.receive(1, 1.0)
        await ack
        assert second.body == "b"
        assert len(sent) == 1 and b"XACK" in sent[0] and b"XREADGROUP" in sent[0]
        assert await _pending(admin) == 1  # only the second one, not acked yet
        # A read that carried acks and was cancelled gives them back; they still go out.
        stuck = asyncio.Event()
        stuck_acks: list[bytes] = []

        async def hang(packed: bytes, replies: int, block_ms: int = 0) -> list[object]:
            if b"XREADGROUP" in packed:
                stuck_acks.append(packed)
                queue._link.raw = raw  # type: ignore[method-assign]
                stuck.set()
                await asyncio.Event().wait()
            return await raw(packed, replies, block_ms)

        queue._link.raw = hang  # type: ignore[method-assign]
        ack = asyncio.ensure_future(queue.delete([second]))
        read = asyncio.ensure_future(queue.receive(1, 5.0))
        await stuck.wait()
        read.cancel()
        await asyncio.wait_for(ack, 5)
        assert b"XACK" in stuck_acks[0]
        assert await _pending(admin) == 0
