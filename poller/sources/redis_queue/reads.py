"""The receive side of redis-queue: merged XREADGROUPs for new entries and XAUTOCLAIM scans
for redeliveries (see queue.py's docstring for why they are merged)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis

from poller.sources.base import Message, SourceError
from poller.sources.redis_connection import MAX_BLOCK_S, pack

if TYPE_CHECKING:
    from poller.sources.redis_queue.queue import RedisQueue

# Redelivery scans run every visibility_timeout/4, within these bounds: often enough that an
# expired entry waits about a quarter of its timeout more, rarely enough to cost nothing.
CLAIM_INTERVAL_MIN_S: Final = 0.05
CLAIM_INTERVAL_MAX_S: Final = 30.0
# XAUTOCLAIM scans up to 10 x COUNT PEL entries per call; the script repeats it this often
# before giving up until the next turn, so a large PEL is covered in few round trips.
CLAIM_ROUNDS: Final = 10


@dataclass(slots=True)
class _ReadRequest:
    """One receive() call waiting for a share of a merged XREADGROUP."""

    limit: int
    deadline: float  # loop time after which it is answered, with nothing if need be
    future: asyncio.Future[list[Message]]


class Receiver:
    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue
        self.closing = False
        self._claim_interval = min(
            max(queue.visibility_timeout_s / 4, CLAIM_INTERVAL_MIN_S), CLAIM_INTERVAL_MAX_S
        )
        # Redelivery bookkeeping (loop time; 0 = due now, so a new instance first picks up
        # what a crashed predecessor left pending).
        self.next_claim = 0.0
        self._claim_cursor = b"0-0"
        self._claiming = False
        self._read_queue: deque[_ReadRequest] = deque()
        self._read_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._read_head = (b"XREADGROUP", b"GROUP", queue._group_b, queue._consumer_b, b"COUNT")
        self._read_tail = (b"STREAMS", queue._key, b">")

    async def close(self) -> None:
        """Answer waiting receives with nothing and stop the reads in flight."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        while self._read_queue:
            request = self._read_queue.popleft()
            if not request.future.done():
                request.future.set_result([])

    def read_coming(self) -> bool:
        """Whether a read goes out later in this loop turn (acks may ride along with it)."""
        return self._read_scheduled

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages: redelivered (expired) entries first, then new ones; waits up
        to wait_s for the first. Concurrent calls share round trips (module docstring)."""
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        request = _ReadRequest(
            limit=min(max_messages, self._queue.max_receive_batch),
            deadline=loop.time() + max(wait_s, 0.0),
            future=loop.create_future(),
        )
        self._read_queue.append(request)
        if self._read_scheduled:
            # Someone collects this tick's receive() calls: ride along with them.
            return await request.future
        # Lead: let the other receive() calls of this tick join, then read for all of them
        # from this task (no extra task, no extra loop iteration on the hot path).
        self._read_scheduled = True
        try:
            await asyncio.sleep(0)
        except BaseException:
            self._read_scheduled = False
            request.future.cancel()
            if self._read_queue:
                self._schedule_read(loop)
            raise
        self._read_scheduled = False
        requests = self._take_requests()
        if requests:
            await self._read(requests, loop, own=request)
        return await request.future

    # -- merged reads ----------------------------------------------------------------------
    def _enqueue(self, request: _ReadRequest, loop: asyncio.AbstractEventLoop) -> None:
        """Queue a request that has no caller to lead its read (it is waiting again)."""
        self._read_queue.append(request)
        if not self._read_scheduled:
            self._schedule_read(loop)

    def _schedule_read(self, loop: asyncio.AbstractEventLoop) -> None:
        self._read_scheduled = True
        # At the end of this loop iteration, so every request queued in the same tick joins
        # the same round trip.
        loop.call_soon(self._start_read, loop)

    def _take_requests(self) -> list[_ReadRequest]:
        requests = [r for r in self._read_queue if not r.future.done()]
        self._read_queue.clear()
        return requests

    def _start_read(self, loop: asyncio.AbstractEventLoop) -> None:
        self._read_scheduled = False
        requests = self._take_requests()
        if not requests:
            return
        task = loop.create_task(self._read(requests, loop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(
        self,
        requests: list[_ReadRequest],
        loop: asyncio.AbstractEventLoop,
        own: _ReadRequest | None = None,
    ) -> None:
        """One round of reads for ``requests``; ``own`` is the leading caller's request."""
        try:
            waiting = requests
            if loop.time() >= self.next_claim and not self._claiming:
                entries = await self._claim(sum(r.limit for r in waiting), loop)
                waiting = self._hand_out(waiting, entries)
            if waiting:
                now = loop.time()
                # Block no longer than the most impatient caller, and wake for the next
                # redelivery scan (if one is running elsewhere now, for the one after it).
                claim_at = self.next_claim
                if claim_at <= now and self._claiming:
                    claim_at = now + self._claim_interval
                until = min(min(r.deadline for r in waiting), claim_at)
                block_ms = int(min(until - now, MAX_BLOCK_S) * 1000)
                entries = await self._read_new(sum(r.limit for r in waiting), block_ms)
                waiting = self._hand_out(waiting, entries)
        except Exception as exc:
            # SourceError (or a bug): every caller of this round trip sees it.
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        except BaseException:
            # Cancelled (the leading caller, or close()). What the interrupted command read
            # returns to the queue after the visibility timeout; the other callers wait on
            # in a new round, or get nothing if the source is closing.
            if own is not None:
                future = own.future
                if (
                    future.done()
                    and not future.cancelled()
                    and future.exception() is None
                    and not self.closing
                ):
                    # Handed entries by the redelivery scan just before the cancel: nobody
                    # will process them, so let someone else have them now.
                    self._release_later([m.receipt for m in future.result()])
                future.cancel()
            for request in requests:
                if not request.future.done():
                    if self.closing:
                        request.future.set_result([])
                    else:
                        self._enqueue(request, loop)
            raise
        now = loop.time()
        for request in waiting:
            if request.future.done():
                continue
            if request.deadline - now > 0.001:
                # Nothing yet and time left: wait again (with whoever else is waiting) rather
                # than answer empty, which the engine would count as an idle poll.
                self._enqueue(request, loop)
            else:
                request.future.set_result([])

    def _hand_out(self, requests: list[_ReadRequest], entries: list[Message]) -> list[_ReadRequest]:
        """Give each caller at most its limit, in order; return those that got nothing."""
        index = 0
        waiting: list[_ReadRequest] = []
        for request in requests:
            if request.future.done():  # cancelled meanwhile
                continue
            if index >= len(entries):
                waiting.append(request)
                continue
            share = entries[index : index + request.limit]
            index += len(share)
            request.future.set_result(share)
        if index < len(entries):
            # Read for callers that were cancelled: let someone else have them now instead of
            # after the visibility timeout.
            self._release_later([m.receipt for m in entries[index:]])
        return waiting

    def _release_later(self, ids: list[str]) -> None:
        async def release() -> None:
            try:
                await self._queue._extend(ids, self._queue._visibility_ms)
            except SourceError as exc:
                self._queue.log.warning(
                    "could not release entries; they return after the visibility timeout",
                    source=self._queue.display_uri,
                    entries=len(ids),
                    error=str(exc),
                )
            self.next_claim = 0.0

        task = asyncio.get_running_loop().create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_new(self, count: int, block_ms: int) -> list[Message]:
        queue = self._queue
        ack_ids, acks = queue._acks.take()
        replies = 1
        if acks:
            # Queued acks ride along, ahead of the read: one write and one round trip for both.
            # The read does not block then (the acks must not wait for new entries); if it
            # finds nothing, _read asks again with a blocking read.
            packed, replies = queue._pack_ack(ack_ids)
            packed += pack((*self._read_head, count, *self._read_tail))
            replies += 1
            block_ms = 0
        elif block_ms >= 1:
            packed = pack((*self._read_head, count, b"BLOCK", block_ms, *self._read_tail))
        else:  # BLOCK 0 would mean forever
            packed = pack((*self._read_head, count, *self._read_tail))

        async def go(_: aioredis.Redis) -> Any:
            return (await queue._link.raw(packed, replies, block_ms))[-1]

        try:
            reply = await queue._call("receive", go)
        except Exception as exc:
            queue._acks.done(acks, exc)
            raise
        except BaseException:
            # Cancelled: whether the acks reached the server is unknown; an XACK may be sent
            # again safely.
            queue._acks.give_back(ack_ids, acks)
            raise
        queue._acks.done(acks)
        if not reply:
            return []
        # RESP2: [[key, entries]]
        return self._queue._records.first_deliveries(reply[0][1])

    async def _claim(self, count: int, loop: asyncio.AbstractEventLoop) -> list[Message]:
        """Entries idle past the visibility timeout, now ours, with their delivery counts."""
        self._claiming = True
        self.next_claim = loop.time() + self._claim_interval
        try:
            script = self._queue._script("claim")

            async def go(client: aioredis.Redis) -> Any:
                return await script(
                    keys=[self._queue._key],
                    args=[
                        self._queue._group_b,
                        self._queue._consumer_b,
                        self._queue._visibility_ms,
                        self._claim_cursor,
                        count,
                        CLAIM_ROUNDS,
                    ],
                    client=client,
                )

            cursor, entries, counts = await self._queue._call("receive", go)
        finally:
            self._claiming = False
        self._claim_cursor = cursor
        if cursor != b"0-0":
            # The scan stopped part-way through the PEL: continue at the next receive.
            self.next_claim = 0.0
        if not entries:
            return []
        now_ms = int(time.time() * 1000)
        build = self._queue._records.message
        return [
            build(entry_id, fields, int(delivered), now_ms)
            for (entry_id, fields), delivered in zip(entries, counts, strict=True)
        ]
