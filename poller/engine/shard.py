"""One shard of an ordered mapping, processed in order (engine/stream.py runs one per shard).

A reader task reads ahead from the checkpoint into up to ParallelizationFactor lanes (records
routed by a hash of their partition key, so one key's records keep their order); each lane
gathers a batch (BatchSize, the batching window, the 6 MB cap), invokes it, and follows the
retry rules of engine/attempts.py until every record is settled: done, filtered out, or given
up on (to the on-failure destination, or dropped and counted). The checkpoint then moves as
far as everything before it is settled (engine/checkpoints.py). Throttles, source outages, a
destination that is down and shutdown are waited out without using an attempt. A closed shard
read to its end is checkpointed at SHARD_END, which lets its children start.

Checkpoints are written behind the lanes (engine/shard_checkpoints.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from poller.engine import attempts
from poller.engine.attempts import Work
from poller.engine.batching import MISSING, Batch, Identify, parse_stream_response
from poller.engine.checkpoints import SHARD_END, ShardProgress
from poller.engine.destinations import failure_batch_info, send_failure
from poller.engine.health import FUNCTION_FAILED, invoke_failure
from poller.engine.shard_checkpoints import ShardCheckpoints, Stopped
from poller.engine.shard_reading import ShardReading
from poller.engine.windows import Window, too_big, window_of
from poller.events import envelope, invocation_record
from poller.logs import timestamp
from poller.runtime.pool import Lease
from poller.runtime.results import NOT_RUN, InvokeResult, Outcome, new_request_id
from poller.sources.base import TRIM_HORIZON, Shard, StartAt, StreamRecord
from poller.state.base import Checkpoint, StaleClaimError, StateError

if TYPE_CHECKING:
    from poller.engine.stream import StreamRunner

_decode = msgspec.json.Decoder().decode


class _Lane:
    __slots__ = ("queue", "wake")

    def __init__(self) -> None:
        self.queue: deque[StreamRecord] = deque()
        self.wake = asyncio.Event()


class ShardProcessor(ShardCheckpoints, ShardReading):
    def __init__(self, runner: StreamRunner, shard: Shard) -> None:
        self.runner = runner
        self.shard = shard
        settings = runner.settings
        self.windowed = settings.tumbling_window_s > 0
        # One aggregation per shard and window: a window's invokes run one after the other.
        lanes = 1 if self.windowed else settings.parallelization_factor
        self.lanes = [_Lane() for _ in range(lanes)]
        self.progress = ShardProgress()
        self.checkpoint = Checkpoint()
        self.window: Window | None = None
        self.phase = "starting"  # starting, reading, caught up, finished, lost, stopped
        self.waiting: str | None = None  # what a batch waits for, when it does
        self.iterator_age_s: float | None = None
        self.behind_ms: int | None = None
        self.finished = False
        self.lost = False  # another owner claimed the shard since we did
        self.stopping = False
        self.reading_done = False
        self.caught_up_at = 0.0  # wall time of the last read that found nothing new
        self.task: asyncio.Task[None] | None = None
        self._token = 0
        self._space = asyncio.Event()
        self._stopped = asyncio.Event()
        self._init_writer()
        self._reader: Any = None
        self._fields = {**runner.fields, "shard": shard.id}
        # What a source with events of its own shape (Kafka's, §7.5) says about them: the
        # event around one batch of the shard, its identifiers in batchItemFailures, its
        # description of records given up on.
        source = runner.source
        envelope = getattr(source, "envelope", None)
        self._head, self._tail = envelope(shard.id) if envelope else (b'{"Records":[', b"]")
        self._closing = b"" if envelope else b"}"
        item_sequence = getattr(source, "item_sequence", None)
        self._identify: Identify | None = (
            (lambda identifier: item_sequence(shard.id, identifier)) if item_sequence else None
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, grace_s: float) -> None:
        """Stop reading; let the batches in flight settle within grace_s, then cancel."""
        self.stopping = True
        self._wake_all()
        if self.task is None or self.task.done():
            return
        done, _ = await asyncio.wait([self.task], timeout=grace_s)
        if not done:
            self.runner.log.warning(
                "shutdown grace expired with a batch in flight; it is read again from the "
                "checkpoint",
                **self._fields,
            )
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task

    @property
    def state(self) -> str:
        if self.waiting is not None and self.phase in ("reading", "caught up"):
            return f"waiting for {self.waiting}"
        return self.phase

    def status(self) -> dict[str, Any]:
        return {
            "shardId": self.shard.id,
            "state": self.state,
            "checkpoint": self.checkpoint.position,
            "iteratorAgeSeconds": (
                None if self.iterator_age_s is None else round(self.iterator_age_s, 3)
            ),
            "millisBehindLatest": self.behind_ms,
        }

    async def run(self) -> None:
        runner = self.runner
        settings = runner.settings
        try:
            claim = await self._state("claim", lambda: runner.ownership.claim(self.shard))
            self._token, self.checkpoint = claim.token, claim.checkpoint
            self._latest = claim.checkpoint
            position = self.checkpoint.position
            if position == SHARD_END:
                self.finished, self.phase = True, "finished"
                return
            self.window = Window.restored(self.checkpoint.window)
            if position is not None:
                start = StartAt.after(position)
            else:
                # Children of a reshard read from their start, whatever the mapping's position.
                start = TRIM_HORIZON if self.shard.parents else settings.starting
            self._reader = await self._source(
                "open_reader", lambda: runner.source.open_reader(self.shard, start)
            )
            if position is None and self._reader.start_point is not None:
                # Pin LATEST / AT_TIMESTAMP where the service names the point: a restart before
                # the first record must not move the start.
                self._latest = Checkpoint(self._reader.start_point)
                await self._write(self._latest)
            self.phase = "reading"
            loop = asyncio.get_running_loop()
            writer = loop.create_task(self._checkpointer())
            lanes = [loop.create_task(self._lane(lane)) for lane in self.lanes]
            try:
                try:
                    await self._read()
                    await asyncio.gather(*lanes)
                finally:
                    for task in lanes:
                        task.cancel()
                    for task in lanes:
                        with contextlib.suppress(BaseException):
                            await task
                    # Whatever settled is checkpointed before the shard ends or is let go,
                    # unless the grace ran out (cancelled): then at once, what was not written
                    # is read again.
                    self._draining = True
                    self._drained.set()
                    self._want.set()
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        writer.cancel()
                    await writer
            finally:
                writer.cancel()
            if self.reading_done and not self.stopping and not len(self.progress):
                await self._write(Checkpoint(SHARD_END))
                self.finished = True
                runner.log.info("shard read to its end", **self._fields)
        except Stopped:
            pass
        finally:
            self.phase = "finished" if self.finished else "lost" if self.lost else "stopped"
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await self._reader.close()
            if self._token and not self.lost:
                with contextlib.suppress(Exception):
                    await runner.ownership.release(self.shard, self._token)
            runner.shard_done(self)

    def _wake_all(self) -> None:
        if self.stopping:
            self._stopped.set()
        self._space.set()
        for lane in self.lanes:
            lane.wake.set()

    # -- waiting out what is not an attempt ----------------------------------------------------
    async def _pause(self, seconds: float) -> None:
        """Sleep, unless the shard is let go first."""
        if not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), seconds)
        if self.stopping:
            raise Stopped

    async def _state(self, operation: str, call: Any) -> Any:
        runner = self.runner
        held: str | None = None
        while True:
            try:
                result = await call()
            except StaleClaimError:
                raise
            except StateError as exc:
                held = f"PROBLEM: state store unavailable: {exc}"
                runner.health.hold(held, str(exc))
                runner.log.error(
                    f"state store unavailable: {exc}", **self._fields, operation=operation
                )
                await self._pause(runner.health.next_backoff())
                continue
            if held is not None:
                runner.health.release(held)
            return result

    # -- batches -------------------------------------------------------------------------------
    async def _lane(self, lane: _Lane) -> None:
        while True:
            collected = await self._collect(lane)
            if collected is None:
                return
            records, final = collected
            await self._deliver(records, final)

    def _window_over(self) -> bool:
        window = self.window
        return window is not None and time.time() >= window.end and self.caught_up_at >= window.end

    async def _collect(self, lane: _Lane) -> tuple[list[StreamRecord], bool] | None:
        """The lane's next batch and whether it is its window's final invoke; None when the
        lane is done."""
        settings = self.runner.settings
        length = settings.tumbling_window_s
        if self.stopping:
            return None  # what is read and not started is read again from the checkpoint
        while not lane.queue:
            if self.stopping:
                return None
            if (
                self.windowed
                and self.window is not None
                and (self.reading_done or self._window_over())
            ):
                return [], True  # the window is over and no record of it is left
            if self.reading_done:
                return None
            lane.wake.clear()
            timeout = None
            if self.window is not None:
                timeout = max(self.window.end - time.time(), 0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), timeout)
        batch: Batch[StreamRecord] = Batch(
            settings.batch_size,
            settings.max_payload_bytes,
            len(self._head) + len(self._tail) + len(self._closing),
        )
        deadline = time.monotonic() + settings.batching_window_s
        while True:
            queue = lane.queue
            if not self.windowed:
                await self._fill(batch, queue)
            while self.windowed and queue and not batch.full:
                record = queue[0]
                if self.windowed:
                    if self.window is None:
                        self.window = Window(*window_of(record.arrival, length))
                    elif not self.window.holds(record.arrival, length):
                        self._space.set()
                        return batch.records, True  # the next record opens a later window
                if batch.too_big_alone(record):
                    queue.popleft()
                    await self._give_up(
                        [record], attempts.PAYLOAD_TOO_LARGE, Work([record]), None, invoked=False
                    )
                    continue
                if not batch.add(record):
                    break
                queue.popleft()
            self._space.set()
            remaining = deadline - time.monotonic()
            if (
                batch.full
                or (queue and batch)
                or remaining <= 0
                or self.reading_done
                or self.stopping
            ):
                break
            lane.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), remaining)
        if not batch and self.windowed and self.window is not None and self._window_over():
            return [], True
        return (batch.records, False) if batch else await self._collect(lane)

    async def _fill(self, batch: Batch[StreamRecord], queue: deque[StreamRecord]) -> None:
        """Move records from the lane into the batch while they fit (Batch.add, inlined: this
        runs for every record)."""
        records = batch.records
        size, count = batch.size, len(records)
        limit, cap = batch.max_records, batch.max_bytes
        while queue and count < limit:
            record = queue[0]
            extra = len(record.encoded) + (1 if count else 0)
            if size + extra > cap:
                if not batch.too_big_alone(record):
                    break
                queue.popleft()
                await self._give_up(
                    [record], attempts.PAYLOAD_TOO_LARGE, Work([record]), None, invoked=False
                )
                continue
            size += extra
            count += 1
            records.append(queue.popleft())
        batch.size = size

    async def _deliver(self, records: list[StreamRecord], final: bool) -> None:
        """Invoke until every record is settled."""
        runner = self.runner
        settings = runner.settings
        works: list[Work[StreamRecord]] = [Work(records)]
        while works:
            work = works[0]
            expired, work.records = attempts.split_expired(
                work.records, settings.max_record_age_s, time.time()
            )
            if expired:
                await self._give_up(
                    expired, attempts.RECORD_AGE_EXCEEDED, work, None, invoked=work.invokes > 0
                )
            if not work.records and not (final and len(works) == 1):
                works.pop(0)
                continue
            last = final and len(works) == 1
            result = await self._invoke(work, last)
            if result.outcome in NOT_RUN and result.outcome is not Outcome.INVALID_REQUEST:
                continue  # throttled: nothing ran, no attempt used
            decision = self._decide(work, result, last)
            if decision is None:
                await self._advance()
                works.pop(0)
                continue
            if decision.bisected:
                runner.metrics.bisected.inc()
            if decision.done:
                self.progress.settle(decision.done)
            if decision.given_up:
                error = "Unhandled" if result.outcome is not Outcome.OK else None
                await self._give_up(
                    decision.given_up,
                    attempts.RETRIES_EXHAUSTED,
                    work,
                    error,
                    invoked=True,
                    request_id=result.request_id,
                )
            await self._advance()
            works[0:1] = decision.next
            if works and works[0] is work and work.failures:
                self.waiting = "a retry"
                await self._pause(
                    attempts.retry_delay(
                        work.failures, settings.retry_first_s, settings.retry_most_s
                    )
                )

    async def _invoke(self, work: Work[StreamRecord], final: bool) -> InvokeResult:
        runner = self.runner
        pool = runner.pool
        metrics = runner.metrics
        lease: Lease | None = pool.try_acquire()
        while lease is None:
            runner.counts_throttle()
            if self.stopping:
                raise Stopped
            self.waiting = "a function slot"
            lease = await pool.acquire(timeout=1.0)
        self.waiting = None
        records = work.records
        members = b""
        if self.window is not None:
            members = self.window.event_members(
                shard_id=self.shard.id,
                stream_arn=runner.source.stream_arn,
                final=final,
                terminated_early=False,
            )
        event = envelope(
            self._head, [r.encoded for r in records], self._tail + members + self._closing
        )
        count = len(records)
        metrics.invoked_count += count
        metrics.batch_size.observe(count)
        if records:
            self.iterator_age_s = max(time.time() - records[-1].arrival, 0.0)
            runner.observe_age(self)
        metrics.running_batches += 1
        started = time.perf_counter()
        try:
            result = await lease.invoke(event)
        finally:
            metrics.running_batches -= 1
        metrics.duration.observe(time.perf_counter() - started)
        if result.outcome is Outcome.OK:
            metrics.ok_count += 1
        else:
            metrics.outcome(result.outcome).inc()
        if result.outcome in NOT_RUN and result.outcome is not Outcome.INVALID_REQUEST:
            runner.counts_throttle()
            return result
        work.invokes += 1
        return result

    def _decide(
        self, work: Work[StreamRecord], result: InvokeResult, final: bool
    ) -> attempts.Decision[StreamRecord] | None:
        """What the invoke's result means for the work; None: all of it is done."""
        runner = self.runner
        settings = runner.settings
        metrics = runner.metrics
        records = work.records
        if result.outcome is Outcome.INVALID_REQUEST:
            return attempts.Decision(given_up=records)
        if result.outcome is not Outcome.OK:
            metrics.errors.inc()
            metrics.failed_invoke.inc(len(records))
            self._failed(result, len(records))
            return attempts.after_error(
                work, bisect=settings.bisect, max_retries=settings.max_retries
            )
        failed: set[str] | None = set()
        state: Any = None
        if settings.report_batch_item_failures or self.windowed:
            failed, state = parse_stream_response(
                result.payload,
                {r.sequence for r in records},
                with_state=self.windowed,
                identify=self._identify,
            )
            if not settings.report_batch_item_failures and failed is not None:
                failed = set()
        if failed is None or state is MISSING:
            why = "a response without state" if state is MISSING else "an invalid response"
            runner.log.warning(
                f"{why} fails the whole batch",
                **self._fields,
                requestId=result.request_id,
                response=result.payload[:500].decode(errors="replace"),
            )
            metrics.failed_invoke.inc(len(records))
            return attempts.after_error(
                work, bisect=settings.bisect, max_retries=settings.max_retries
            )
        if self.window is not None and state is not None:
            self.window.state = state
        runner.health.set_status("OK")
        if not failed:
            self.progress.settle(records)
            self._close_window_if(final, state)
            return None
        metrics.failed_invoke.inc(len(failed))
        first = next(i for i, r in enumerate(records) if r.sequence in failed)
        runner.log.info(
            "batch partly failed; retrying from the first failed record",
            **self._fields,
            requestId=result.request_id,
            records=len(records),
            failed=len(failed),
            done=first,
        )
        return attempts.after_partial(work, first, max_retries=settings.max_retries)

    def _close_window_if(self, final: bool, state: Any) -> None:
        window = self.window
        if window is None:
            return
        if final:
            self.window = None
        elif isinstance(state, dict) and too_big(state):
            # Over 1 MB: the window ends here; the next record starts a new one.
            self.runner.log.warning("window state over 1 MB: the window ends early", **self._fields)
            self.window = None

    def _failed(self, result: InvokeResult, records: int) -> None:
        runner = self.runner
        runner.health.set_status(FUNCTION_FAILED, invoke_failure(result))
        error = result.error or {}
        runner.log.warning(
            "invoke failed",
            **self._fields,
            requestId=result.request_id,
            outcome=result.outcome.value,
            errorType=error.get("errorType"),
            errorMessage=error.get("errorMessage"),
            records=records,
        )

    # -- giving up -----------------------------------------------------------------------------
    async def _give_up(
        self,
        records: list[StreamRecord],
        condition: str,
        work: Work[StreamRecord],
        function_error: str | None,
        *,
        invoked: bool,
        request_id: str | None = None,
    ) -> None:
        """Send the batch's record to the on-failure destination (waiting while it is down),
        or drop and count; then the records are settled."""
        runner = self.runner
        settings = runner.settings
        first, last = records[0], records[-1]
        record = invocation_record(
            request_id=request_id or new_request_id(),
            function_arn=settings.function_arn,
            condition=condition,
            invoke_count=max(work.invokes, 1),
            function_error=function_error,
            invoked=invoked,
            batch_info_key=runner.source.batch_info_key,
            batch_info=failure_batch_info(runner.source, self.shard.id, records),
            timestamp=timestamp(),
        )
        destination = runner.destination
        if getattr(destination, "wants_payload", False):
            # A destination that writes the records themselves (a Kafka topic, §5.4).
            record["payload"] = _decode(
                envelope(self._head, [r.encoded for r in records], self._tail + self._closing)
            )
        if destination is None:
            runner.metrics.dropped(condition).inc(len(records))
            runner.log.error(
                "records given up on and dropped (no on-failure destination)",
                **self._fields,
                condition=condition,
                records=len(records),
                first=first.sequence,
                last=last.sequence,
            )
        else:
            self.waiting = "the on-failure destination"
            await send_failure(destination, record, runner, self._fields, self._pause)
            self.waiting = None
            runner.metrics.on_failure_delivered(condition).inc(len(records))
            runner.log.warning(
                "records given up on, sent to the on-failure destination",
                **self._fields,
                condition=condition,
                records=len(records),
                first=first.sequence,
                last=last.sequence,
                destination=destination.shown,
            )
        self.progress.settle(records)
