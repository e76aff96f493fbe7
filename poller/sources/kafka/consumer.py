"""The thread that owns one mapping's kafka-python consumer.

kafka-python blocks, so each mapping's consumer lives in a thread of its own that polls and
hands records (already encoded as §7.5 records, so each payload is read once) to the event loop;
pauses, resumes and seeks come back to it through a queue and are applied between two polls.
Nothing here decides anything: it reports assignments and revocations, applies what the loop
asks and reads.

Why the revocation waits and commits do not go through the queue: kafka-python 3 runs the
group protocol, heartbeats and the rebalance listener on an IO thread of its own, and calls the
listener from inside ``poll()``. A revocation must let the batches in flight settle and their
offsets be committed *before* the partitions are released (else the next owner reads them
again, or its progress is overwritten), so the listener is asynchronous: it tells the loop and
waits, while kafka-python's IO thread goes on heartbeating. Meanwhile this thread is inside
``poll()``, so offset commits are made by a second, small thread (``Committer``) whose blocking
``commit()`` runs on kafka-python's IO thread like any other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.future import Future as KafkaFuture
from kafka.structs import OffsetAndMetadata

from poller.sources.base import StartAt, StreamRecord
from poller.sources.kafka import batches
from poller.sources.kafka.records import RecordEncoder

POLL_TIMEOUT_MS: Final = 20  # how long a poll waits; commands wait at most this long
LAG_INTERVAL_S: Final = 2.0
UNLIMITED_POLL_RECORDS: Final = 1 << 30  # how often the log end offsets are asked for (OffsetLag)


class Sink(Protocol):
    """The loop side: every call arrives on the event loop (call_soon_threadsafe)."""

    def on_started(self, error: BaseException | None) -> None: ...

    def on_assigned(self, generation: int, starts: dict[str, tuple[int | None, int]]) -> None: ...

    def on_revoking(self, shards: set[str], release: Callable[[], None], lost: bool) -> None: ...

    def on_records(self, batches: list[tuple[str, int, list[StreamRecord]]]) -> None: ...

    def on_end_offsets(self, ends: dict[str, int]) -> None: ...

    def on_failed(self, error: BaseException) -> None: ...


def _tp(shard: str) -> TopicPartition:
    topic, _, partition = shard.rpartition("-")
    return TopicPartition(topic, int(partition))


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread; never blocks it."""

    def __init__(self, owner: ConsumerThread) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.revoke(revoked, lost=False)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self.owner.revoke(lost, lost=True)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.assign(assigned)


class ConsumerThread:
    def __init__(
        self,
        *,
        options: dict[str, Any],
        topics: list[str],
        group_id: str,
        starting: StartAt,
        encoder: RecordEncoder,
        loop: asyncio.AbstractEventLoop,
        sink: Sink,
    ) -> None:
        self.options = options
        self.topics = topics
        self.group_id = group_id
        self.starting = starting
        self.encoder = encoder
        self.loop = loop
        self.sink = sink
        self.consumer: KafkaConsumer | None = None
        # Polls return StreamRecords (batches.py), not ConsumerRecords to encode here.
        self.decoded = False
        self.closing = False
        self.generation = 0
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._pending: set[TopicPartition] | None = None  # assigned, offsets not resolved yet
        self._opened: dict[TopicPartition, int] = {}  # partitions read, with the reader's epoch
        self._next_lag = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"kafka-consumer-{group_id}", daemon=True
        )

    # -- the loop's side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def open(self, shard: str, epoch: int, offset: int) -> None:
        """Read ``shard`` from ``offset`` on; its records carry ``epoch``."""
        self._commands.put(("open", _tp(shard), epoch, offset))

    def close_partition(self, shard: str, epoch: int) -> None:
        self._commands.put(("close", _tp(shard), epoch))

    def pause(self, shard: str) -> None:
        self._commands.put(("pause", _tp(shard)))

    def resume(self, shard: str) -> None:
        self._commands.put(("resume", _tp(shard)))

    def stop(self) -> None:
        self.closing = True
        self._commands.put(("stop",))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- kafka-python's IO thread (the listener) -----------------------------------------------
    async def revoke(self, partitions: set[TopicPartition], *, lost: bool) -> None:
        if not partitions or self.closing:
            return  # closing: the runner has let every partition go already
        consumer = self.consumer
        assert consumer is not None
        done = KafkaFuture()
        # The IO loop of kafka-python 3 the listener runs on: resolving the future through it
        # wakes the listener at once (resolving it from another thread would not).
        net = consumer._net

        def release() -> None:
            with contextlib.suppress(Exception):  # the consumer closed meanwhile: nobody waits
                net.call_soon_with_future(lambda: done.is_done or done.success(None))

        shards = {f"{tp.topic}-{tp.partition}" for tp in partitions}
        self.loop.call_soon_threadsafe(self.sink.on_revoking, shards, release, lost)
        if not lost:
            await done

    def assign(self, partitions: set[TopicPartition]) -> None:
        consumer = self.consumer
        assert consumer is not None
        # Nothing is fetched until a reader opens the partition at its checkpoint.
        consumer.pause(*partitions)
        self.generation += 1
        self._pending = set(partitions)

    # -- this thread -------------------------------------------------------------------------
    def _post(self, method: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            self.loop.call_soon_threadsafe(method, *args)

    def _run(self) -> None:
        try:
            self.consumer = KafkaConsumer(
                group_id=self.group_id,
                enable_auto_commit=False,
                # Used only when a committed offset is gone (retention): the oldest still
                # there, as Kinesis does with expired records.
                auto_offset_reset="earliest",
                # Every poll takes all the fetcher holds: kafka-python 3.0 parks the records of
                # a partition paused while half-read, and once any poll has returned records it
                # never gives them back, so with a limit here a paused partition stalled for good.
                max_poll_records=UNLIMITED_POLL_RECORDS,
                **self.options,
            )
            self.decoded = batches.install(self.consumer, self.encoder)
            self.consumer.subscribe(self.topics, listener=_Listener(self))
        except Exception as exc:
            self._post(self.sink.on_started, exc)
            self._close()
            return
        self._post(self.sink.on_started, None)
        try:
            while self._apply_commands():
                polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                if self._pending is not None:
                    self._resolve_assignment()
                if polled:
                    self._hand_over(polled)
                if time.monotonic() >= self._next_lag:
                    self._report_lag()
        except Exception as exc:
            if not self.closing:
                self._post(self.sink.on_failed, exc)
        finally:
            self._close()

    def _apply_commands(self) -> bool:
        consumer = self.consumer
        assert consumer is not None
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            name = command[0]
            if name == "stop":
                return False
            tp = command[1]
            if tp not in consumer.assignment():
                self._opened.pop(tp, None)
                continue
            if name == "open":
                self._opened[tp] = command[2]
                consumer.seek(tp, command[3])
                consumer.resume(tp)
            elif name == "close" and self._opened.get(tp) == command[2]:
                del self._opened[tp]
                consumer.pause(tp)
            elif name == "pause":
                consumer.pause(tp)
            elif name == "resume" and tp in self._opened:
                consumer.resume(tp)

    def _hand_over(self, polled: dict[TopicPartition, list[Any]]) -> None:
        handed = []
        for tp, raw in polled.items():
            epoch = self._opened.get(tp)
            if epoch is None:
                continue  # not open (yet): read again from the offset it is opened at
            shard = f"{tp.topic}-{tp.partition}"
            handed.append((shard, epoch, raw if self.decoded else self.encoder.encode(raw)))
        if handed:
            self._post(self.sink.on_records, handed)

    def _resolve_assignment(self) -> None:
        """Committed offsets of the partitions just assigned, and where the others start
        (StartingPosition applies only to partitions the group has no offset for)."""
        consumer = self.consumer
        assert consumer is not None and self._pending is not None
        partitions, generation = sorted(self._pending), self.generation
        self._pending = None
        committed = {tp: consumer.committed(tp) for tp in partitions}
        fresh = [tp for tp in partitions if committed[tp] is None]
        starts: dict[TopicPartition, int] = {}
        if fresh:
            kind = self.starting.kind
            if kind == "trim_horizon":
                starts = consumer.beginning_offsets(fresh)
            else:
                starts = consumer.end_offsets(fresh)
                if kind == "at_timestamp":
                    ms = int((self.starting.timestamp or 0) * 1000)
                    found = consumer.offsets_for_times(dict.fromkeys(fresh, ms))
                    for tp, at in found.items():
                        if at is not None:
                            starts[tp] = at.offset
        result: dict[str, tuple[int | None, int]] = {}
        for tp in partitions:
            shard = f"{tp.topic}-{tp.partition}"
            offset = committed[tp]
            result[shard] = (offset, offset if offset is not None else starts[tp])
        self._post(self.sink.on_assigned, generation, result)

    def _report_lag(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        self._next_lag = time.monotonic() + LAG_INTERVAL_S
        assigned = list(consumer.assignment())
        if not assigned:
            return
        # Both are the log end offset as seen at some moment, never past the true one: the
        # highwater comes with every fetch (stale while a partition is paused), end_offsets asks
        # the broker (tansu answers it with the base offset of the last batch + 1).
        ends = consumer.end_offsets(assigned)
        for tp in assigned:
            ends[tp] = max(ends.get(tp) or 0, consumer.highwater(tp) or 0)
        self._post(
            self.sink.on_end_offsets, {f"{tp.topic}-{tp.partition}": e for tp, e in ends.items()}
        )

    def _close(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.close(autocommit=False)


class Committer:
    """Commits offsets on a thread of its own (see the module's docstring): each commit waits
    for the broker's answer, and commits queued meanwhile go out together."""

    def __init__(self, consumer_thread: ConsumerThread, loop: asyncio.AbstractEventLoop) -> None:
        self._source = consumer_thread
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[str, int, asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(
            target=self._run, name=f"kafka-commit-{consumer_thread.group_id}", daemon=True
        )
        self._thread.start()

    def commit(self, shard: str, offset: int) -> asyncio.Future[None]:
        """Commit ``offset`` (the next offset to read) for ``shard``; the future says how it
        went."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put((shard, offset, done))
        return done

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _settle(self, done: asyncio.Future[None], error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            waiting = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                waiting.append(more)
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for shard, offset, _ in waiting:
                tp = _tp(shard)
                current = offsets.get(tp)
                if current is None or current.offset < offset:
                    offsets[tp] = OffsetAndMetadata(offset, "", -1)
            error: BaseException | None = None
            consumer = self._source.consumer
            try:
                if consumer is None:
                    raise RuntimeError("the consumer is not connected")
                consumer.commit(offsets)
            except Exception as exc:
                error = exc
            for _, _, done in waiting:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._settle, done, error)
