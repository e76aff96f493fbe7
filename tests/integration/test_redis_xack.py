"""redis-queue acks (delete without delete_on_ack) and reads are XACKs and XREADGROUPs packed
by the source itself on connections it keeps (RedisLink.raw); what redis-py would otherwise
guarantee must still hold."""

from __future__ import annotations

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
