"""Reading a shard ahead of its batches (part of ShardProcessor, engine/shard.py): records go
from the reader into the lanes by a hash of their partition key, at most READ_AHEAD_BATCHES
batches per lane ahead, read again once half of that is left (so a busy shard is read in reads
of two batches per lane or more, rather than one read per batch); filtered records are settled
at once; what the source says about retention gaps and lag is reported."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any, Final

from poller.engine.checkpoints import lane_of
from poller.sources.base import SourceError, StreamRecord

if TYPE_CHECKING:
    import asyncio

    from poller.engine.checkpoints import ShardProgress
    from poller.engine.stream import StreamRunner
    from poller.sources.base import Shard

# A shard reads ahead at most this many batches per lane.
READ_AHEAD_BATCHES: Final = 4
# An idle shard's blocking read waits this long (sources that cannot block poll instead).
IDLE_WAIT_S: Final = 1.0
# Pauses of a shard whose reads the service throttles (first, at most).
THROTTLE_FIRST_S: Final = 0.5
THROTTLE_MOST_S: Final = 10.0


class ShardReading:
    """The reading half of a shard processor."""

    runner: StreamRunner
    shard: Shard
    lanes: list[Any]
    progress: ShardProgress
    phase: str
    windowed: bool
    stopping: bool
    reading_done: bool
    caught_up_at: float
    behind_ms: int | None
    _reader: Any
    _space: asyncio.Event
    _fields: dict[str, Any]

    async def _pause(self, seconds: float) -> None: ...

    async def _advance(self) -> None: ...

    def _wake_all(self) -> None: ...

    async def _source(self, operation: str, call: Any) -> Any:
        health = self.runner.health
        throttled_for = 0.0
        while True:
            try:
                result = await call()
            except SourceError as exc:
                if exc.throttled:
                    # The service is fine and wants this shard read more slowly: no outage, no
                    # attempt, a backoff of the shard's own.
                    throttled_for = self._throttled(operation, exc, throttled_for)
                    await self._pause(throttled_for)
                    continue
                health.failed(operation, exc)
                await self._pause(health.next_backoff())
                continue
            health.ok()
            return result

    def _throttled(self, operation: str, exc: SourceError, delay: float) -> float:
        """The next pause of a shard the service throttles (counted, logged once a spell)."""
        self.runner.metrics.source_error(f"{operation}_throttled").inc()
        if not delay:
            self.runner.log.info(
                f"reads throttled by the source; backing off: {exc}",
                **self._fields,
                operation=operation,
            )
        return min(max(delay * 2, THROTTLE_FIRST_S), THROTTLE_MOST_S) * random.uniform(0.8, 1.2)

    # -- reading -------------------------------------------------------------------------------
    async def _read(self) -> None:
        settings = self.runner.settings
        metrics = self.runner.metrics
        source = self.runner.source
        cap = settings.batch_size * len(self.lanes) * READ_AHEAD_BATCHES
        low = cap // 2
        while not self.stopping:
            buffered = sum(len(lane.queue) for lane in self.lanes)
            if buffered > low:
                self._space.clear()
                await self._space.wait()
                continue
            limit = cap - buffered
            wait = 0.0 if buffered else IDLE_WAIT_S
            reader = self._reader
            result = await self._source("read", lambda: reader.read(limit, wait))  # noqa: B023
            if result.lost:
                metrics.records_lost.inc(result.lost)
                self.runner.log.warning(
                    "records the mapping had not read were dropped by the source (retention or "
                    "trimming); reading goes on at the oldest record still there",
                    **self._fields,
                )
            if result.behind_ms is not None:
                self.behind_ms = result.behind_ms
                metrics.millis_behind(self.shard.id).set(result.behind_ms)
            if result.records:
                await self._accept(result.records)
            else:
                self.caught_up_at = time.time()
                self.phase = "caught up"
                if self.windowed:
                    self._wake_all()
                if source.idle_poll_s and not result.end:
                    await self._pause(source.idle_poll_s)
            if result.end:
                self.reading_done = True
                self._wake_all()
                return

    async def _accept(self, records: list[StreamRecord]) -> None:
        runner = self.runner
        metrics = runner.metrics
        metrics.polled_count += len(records)
        self.phase = "reading"
        self.progress.add(records)
        record_filter = runner.settings.filter
        if record_filter is not None:
            kept: list[StreamRecord] = []
            skipped: list[StreamRecord] = []
            for record in records:
                (kept if runner.matches(record_filter, record) else skipped).append(record)
            if skipped:
                metrics.filtered_out.inc(len(skipped))
                self.progress.settle(skipped)
                await self._advance()
            records = kept
        lanes = self.lanes
        count = len(lanes)
        if count == 1:
            lanes[0].queue.extend(records)
            lanes[0].wake.set()
            return
        for record in records:
            lane = lanes[lane_of(record.partition_key, count)]
            lane.queue.append(record)
            lane.wake.set()
