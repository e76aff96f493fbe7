"""redis-queue acks (delete without delete_on_ack) are XACKs packed by the source itself and
written on a pooled connection; what redis-py would otherwise guarantee must still hold."""

from __future__ import annotations

from poller.sources.redis import ID_CHUNK
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
        # The connection is still in step: the next command gets its own reply.
        assert (await queue.depth()).in_flight == 0


async def test_error_reply_leaves_no_reply_behind_for_the_next_command(
    redis_server: RedisServer,
) -> None:
    async with _started(_queue_uri(redis_server)) as queue, _admin(redis_server) as admin:
        await admin.delete(KEY)
        await queue.start()
        await queue.send(["a", "b"])
        messages = await _receive_all(queue, 2)
        # The group vanishes (NOGROUP to the XACK): it is re-created and the ack retried.
        await admin.xgroup_destroy(KEY, "mapping-uuid")
        await queue.delete(messages * (ID_CHUNK // 2 + 1))  # several chunks, each refused
        await queue.send(["c"])
        later = await _receive_all(queue, 3)
        assert sorted(m.body for m in later) == ["a", "b", "c"]  # re-created at 0
        await queue.delete(later)
        assert await _pending(admin) == 0
