"""Queue mappings (SQS-like sources): Lambda's delivery contract, written once for every source.

A runner owns one mapping. It keeps ``target`` poller tasks; each poller loops:

1. take a function slot (a lease) first, so a batch is never received with nowhere to run it
   (a throttle must not burn receive counts);
2. receive until BatchSize, the batching window or the 6 MB payload cap, removing messages
   that match no filter and dead-lettering those past maxReceiveCount (for sources without
   native redrive);
3. invoke, extending the messages' visibility while the invoke outlives it;
4. settle: delete on success, all but the reported ``batchItemFailures`` on a partial
   response, nothing on a failure (the messages reappear after their visibility timeout).
   The delete runs in its own task while the poller goes on to its next batch, so an
   acknowledgement's round trip overlaps the next receive and invoke (at most two deletes
   per poller in flight).

Without a batching window, the receive for a poller's next batch is sent while its invoke
runs (``Carry.prefetch``, engine/queue_receiving.py), so a slot's cycle costs the longer of
the two round trips rather than their sum. Only with a backlog (the last depth reading), and
when the function timeout leaves those messages well inside their visibility timeout (they
wait for at most the invoke before theirs starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poller.engine.batching import Batch, parse_batch_item_failures
from poller.engine.concurrency import (
    ConcurrencyPolicy,
    OutcomeCounts,
    ScaledConcurrency,
    concurrency_bound,
)
from poller.engine.deletes import Deletes
from poller.engine.filter_compiler import compile_filter_criteria
from poller.engine.filtering import RecordFilter
from poller.engine.health import FUNCTION_FAILED, SourceHealth, invoke_failure
from poller.engine.queue_receiving import Carry, QueueReceiving, abandon
from poller.engine.runners import RunnerError, Services, source_context
from poller.engine.scaling import ScalingController
from poller.engine.visibility import Heartbeat
from poller.events import sqs_event
from poller.logs import JsonLog
from poller.mappings import Mapping
from poller.metrics import MappingMetrics
from poller.runtime.pool import FunctionPool, Lease
from poller.runtime.results import NOT_RUN, Outcome
from poller.sources.base import (
    Depth,
    Message,
    QueueSource,
    SourceError,
    SourceSpec,
)

DEFAULT_CONCURRENCY = 2
DEPTH_INTERVAL_S = 1.0
MANAGE_INTERVAL_S = 0.25


@dataclass(slots=True)
class QueueSettings:
    """What a runner needs from a mapping, resolved once."""

    uuid: str
    function_name: str
    batch_size: int
    batching_window_s: float
    report_batch_item_failures: bool
    maximum_concurrency: int | None
    max_payload_bytes: int
    filter: RecordFilter | None = None


class QueueRunner(QueueReceiving):
    def __init__(
        self,
        settings: QueueSettings,
        source: QueueSource,
        pool: FunctionPool,
        *,
        log: JsonLog,
        metrics: MappingMetrics,
        policy: ConcurrencyPolicy | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.pool = pool
        self.log = log
        self.metrics = metrics
        self.policy = policy or ConcurrencyPolicy(
            settings.maximum_concurrency or DEFAULT_CONCURRENCY
        )
        self.fields = {"mapping": settings.uuid, "function": settings.function_name}
        self.health = SourceHealth(log, metrics, self.fields, on_status)
        self.target = 0
        self.in_flight = 0
        self.depth: Depth | None = None
        # Wakes _watch_depth before its next regular read: set by _manage on every tick while
        # the mapping is busy, and by a receive that shows the last reading is stale.
        self._depth_wanted = asyncio.Event()
        self._depth_read_at = -DEPTH_INTERVAL_S
        # Wakes _manage before its next regular tick: set when a reading shows a backlog on a
        # queue that was empty, so scale-up starts at once rather than up to a tick later.
        self._tick_wanted = asyncio.Event()
        self.counts = OutcomeCounts()
        self._pollers: dict[int, asyncio.Task[None]] = {}
        self._invoking: set[int] = set()
        self._stopping = False
        self._started = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.deletes = Deletes(self)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def status(self) -> dict[str, Any]:
        depth = self.depth
        return {
            "state": "running" if self.started else "starting",
            "lastProcessingResult": self.health.status or None,
            "lastError": self.health.why,
            "backlog": depth.backlog if depth is not None else None,
            "visible": depth.visible if depth is not None else None,
            "inFlight": depth.in_flight if depth is not None else None,
            "concurrency": self.in_flight,
            "concurrencyTarget": self.target,
        }

    async def run(self) -> None:
        """Start the source (retrying while it is unreachable), then keep the pollers going."""
        while not self._stopping:
            try:
                await self.source.start()
                break
            except SourceError as exc:
                self.health.failed("start", exc)
                await self.health.backoff()
        if self._stopping:
            return
        self.health.ok()
        self.metrics.running.set(1)
        self._started.set()
        self.log.info(
            "mapping runner started",
            **self.fields,
            visibility_timeout_s=self.source.visibility_timeout_s,
        )
        if self.pool.config.timeout_s > self.source.visibility_timeout_s:
            # Lambda refuses this mapping; the heartbeat makes it safe here, so only warn.
            self.log.warning(
                f"Queue visibility timeout: {self.source.visibility_timeout_s:g} seconds is less "
                f"than Function timeout: {self.pool.config.timeout_s:g} seconds; poller extends "
                "visibility while invokes run, but consider raising the queue's timeout",
                **self.fields,
            )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_depth()))
        await self._manage()

    async def stop(self, grace_s: float) -> None:
        """Stop receiving; let in-flight invokes finish and settle within grace_s."""
        self._stopping = True
        for index, task in list(self._pollers.items()):
            if index not in self._invoking:
                task.cancel()
        pending = [t for t in self._pollers.values() if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            if still:
                self.log.warning(
                    "shutdown grace expired with invokes in flight; their messages will be "
                    "redelivered after the visibility timeout",
                    **self.fields,
                    in_flight=len(still),
                )
                for task in still:
                    task.cancel()
                await asyncio.wait(still, timeout=5)
        await self.deletes.wait(max(grace_s, 1))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.metrics.running.set(0)
        self.metrics.running_batches = 0
        self.metrics.flush()
        with contextlib.suppress(Exception):
            await self.source.close()

    async def _manage(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            counts = self.counts.take()
            target = self.policy.tick(time.monotonic(), self.depth, self.in_flight, counts)
            if target != self.target:
                self.log.debug(
                    "concurrency target changed",
                    **self.fields,
                    previous=self.target,
                    target=target,
                    reason=self.policy.reason,
                )
                self.target = target
                self.metrics.concurrency_target.set(target)
            for index in range(target):
                task = self._pollers.get(index)
                if task is not None and task.done():
                    self._report_crash(index, task, "restarting it")
                if task is None or task.done():
                    self._pollers[index] = loop.create_task(self._poll_loop(index))
            for index in [i for i in self._pollers if i >= target]:
                if self._pollers[index].done():
                    self._report_crash(index, self._pollers.pop(index), "not needed any more")
            busy = self.in_flight > 0 or (self.depth is not None and self.depth.backlog > 0)
            if busy and not self.health.in_outage:
                # Busy: one fresh depth reading per tick. The controller estimates arrivals as
                # the backlog's change plus the messages done since the last tick; a reading
                # up to DEPTH_INTERVAL_S old would make it count each tick's deletions as new
                # arrivals (a phantom rate while a backlog drains) and see a burst late.
                # During a source outage the regular DEPTH_INTERVAL_S retry is enough.
                self._depth_wanted.set()
            # Counts kept per batch reach /metrics at every scrape; this keeps them current for
            # other readers of the registry too.
            self.metrics.flush()
            self._tick_wanted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick_wanted.wait(), MANAGE_INTERVAL_S)

    def _report_crash(self, index: int, task: asyncio.Task[None], then: str) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug or an unexpected client error: say so (its messages come back after their
        # visibility timeout), rather than leave asyncio to print a bare traceback.
        self.log.error(f"poller crashed: {task.exception()!r}; {then}", **self.fields, poller=index)

    async def _watch_depth(self) -> None:
        while True:
            self._depth_wanted.clear()
            self._depth_read_at = time.monotonic()
            try:
                depth = await self.source.depth()
            except SourceError as exc:
                self.health.failed("depth", exc)
            else:
                previous, self.depth = self.depth, depth
                if depth.backlog > 0 and (previous is None or previous.backlog == 0):
                    self._tick_wanted.set()  # a burst on an idle queue: decide now (§12.4)
                self.metrics.visible.set(depth.visible)
                self.metrics.in_flight.set(depth.in_flight)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._depth_wanted.wait(), DEPTH_INTERVAL_S)

    def _depth_looks_stale(self) -> None:
        """A receive came back full although the last reading showed nothing visible.

        A burst arrived since that reading. Without a fresh one the controller would see the
        backlog only at the next regular read, up to DEPTH_INTERVAL_S later, and scale-up
        (§12.4) would start that much later. At most one early read per MANAGE_INTERVAL_S,
        and only while readings keep showing an empty queue.
        """
        depth = self.depth
        if (
            depth is not None
            and depth.visible == 0
            and time.monotonic() - self._depth_read_at >= MANAGE_INTERVAL_S
        ):
            self._depth_wanted.set()

    # -- the poller loop ---------------------------------------------------------------------

    async def _poll_loop(self, index: int) -> None:
        pool = self.pool
        carry = Carry()
        settling: asyncio.Task[None] | None = None
        try:
            # A poller past the target still runs the batch it prefetched (it holds those
            # messages), then stops.
            while not self._stopping and (index < self.target or carry.prefetch is not None):
                lease = pool.try_acquire()
                if lease is None:
                    self.counts.throttles += 1
                    self.metrics.throttles.inc()
                    lease = await pool.acquire(timeout=1.0)  # wait for a slot; never receive
                    if lease is None:
                        continue
                heartbeat = Heartbeat(self)
                try:
                    batch = await self._collect(carry, heartbeat)
                except SourceError as exc:
                    heartbeat.cancel()
                    lease.release()
                    self.health.failed("receive", exc)
                    await self.health.backoff()
                    continue
                except BaseException:
                    heartbeat.cancel()
                    lease.release()
                    raise
                if not batch:
                    heartbeat.cancel()
                    lease.release()
                    self.counts.empty_polls += 1
                    continue
                self._invoking.add(index)
                if self._may_prefetch(index, carry):
                    # Runs once this task waits for the worker's reply: the invoke goes first.
                    carry.prefetch = asyncio.get_running_loop().create_task(self._prefetch())
                try:
                    done = await self._process(batch, lease, heartbeat, carry)
                except BaseException:
                    heartbeat.cancel()
                    raise
                finally:
                    self._invoking.discard(index)
                if not done:
                    heartbeat.cancel()
                    continue
                # The delete task owns the heartbeat now (it stops it once the delete is done)
                # and outlives a cancel of this poller; stop() waits for it.
                previous, settling = settling, self.deletes.start(done, heartbeat)
                if previous is not None and not previous.done():
                    # A source slower to delete than to deliver must not pile up deletes:
                    # wait for the one before (shielded: cancelling this poller must not
                    # cancel a delete; _settled reports its errors).
                    with contextlib.suppress(Exception):
                        await asyncio.shield(previous)
        finally:
            if carry.prefetch is not None:
                carry.messages.extend(await abandon(carry.prefetch))
                carry.prefetch = None
            if carry.messages:
                # Held back by the size cap, or prefetched for a batch that will not run: let
                # another consumer have them now.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.source.change_visibility(carry.messages, 0))

    # -- invoke and settle -------------------------------------------------------------------

    async def _process(
        self, batch: Batch[Message], lease: Lease, heartbeat: Heartbeat, carry: Carry
    ) -> list[Message] | None:
        """Invoke the batch; return the messages to delete (None: nothing to delete)."""
        metrics = self.metrics
        filtered, carry.filtered = carry.filtered, 0
        dead_lettered, carry.dead_lettered = carry.dead_lettered, 0
        messages = batch.records
        count = len(messages)
        event = sqs_event([m.encoded for m in messages])
        metrics.invoked_count += count
        metrics.batch_size.observe(count)
        self.in_flight += 1
        metrics.running_batches += 1
        heartbeat.cover(messages, time.monotonic())
        started = time.perf_counter()
        try:
            result = await lease.invoke(event)
        finally:
            # The heartbeat keeps going until the batch's delete is done (_delete).
            self.in_flight -= 1
            metrics.running_batches -= 1
        elapsed = time.perf_counter() - started
        metrics.duration.observe(elapsed)
        if result.outcome is Outcome.OK:
            metrics.ok_count += 1
        else:
            metrics.outcome(result.outcome).inc()
        counts = self.counts
        # A cold start's spawn and init are paid once per environment, not per batch. Counted
        # as batch time they would make batches look slow, so the controller would add
        # environments whose own cold starts look slower still: scaling on its own overhead.
        counts.batch_seconds += elapsed if result.init_ms is None else result.duration_ms / 1000
        counts.batches_completed += 1
        counts.messages += count

        if result.outcome is Outcome.OK:
            failed: set[str] | None = set()
            if self.settings.report_batch_item_failures:
                failed = parse_batch_item_failures(result.payload, {m.id for m in messages})
                if failed is None:
                    self.log.warning(
                        "invalid batchItemFailures response: the whole batch will be retried",
                        **self.fields,
                        requestId=result.request_id,
                        response=result.payload[:500].decode(errors="replace"),
                    )
                    failed = {m.id for m in messages}
                    counts.errors += 1
                elif failed:
                    counts.partials += 1
                else:
                    counts.ok += 1
            else:
                counts.ok += 1
            done = [m for m in messages if m.id not in failed] if failed else messages
            if failed:
                metrics.failed_invoke.inc(len(failed))
            if failed or filtered or dead_lettered or self.log.enabled("debug"):
                # One line per batch that did not simply succeed: a partial failure is
                # otherwise invisible until its messages are dead-lettered, minutes later.
                self.log.log(
                    "info" if failed or filtered or dead_lettered else "debug",
                    "batch settled",
                    **self.fields,
                    requestId=result.request_id,
                    records=count,
                    deleted=len(done),
                    failed=len(failed or ()),
                    filtered=filtered,
                    deadLettered=dead_lettered,
                )
            self.health.set_status("OK")
            return done

        metrics.failed_invoke.inc(count)
        if result.outcome in NOT_RUN:
            counts.throttles += 1
        else:
            counts.errors += 1
            metrics.errors.inc()
        self.health.set_status(FUNCTION_FAILED, invoke_failure(result))
        error = result.error or {}
        self.log.warning(
            "invoke failed; the batch returns to the queue after its visibility timeout",
            **self.fields,
            requestId=result.request_id,
            outcome=result.outcome.value,
            errorType=error.get("errorType"),
            errorMessage=error.get("errorMessage"),
            records=count,
            filtered=filtered,
            deadLettered=dead_lettered,
        )
        return None


def build_queue_runner(
    mapping: Mapping,
    spec: SourceSpec,
    pool: FunctionPool,
    services: Services,
    on_status: Callable[[str], None],
) -> QueueRunner:
    """The runner of a queue mapping, with concurrency that follows the backlog."""
    opener = spec.kind.open
    assert opener is not None, "build_runner starts only runnable kinds"
    try:
        source: QueueSource = opener(spec, source_context(services, mapping.uuid))
        record_filter = (
            compile_filter_criteria(mapping.filter_criteria) if mapping.filter_criteria else None
        )
    except (SourceError, ValueError) as exc:
        raise RunnerError(str(exc)) from None
    settings = QueueSettings(
        uuid=mapping.uuid,
        function_name=mapping.function_name,
        batch_size=mapping.batch_size,
        batching_window_s=mapping.batching_window_s,
        report_batch_item_failures=mapping.report_batch_item_failures,
        maximum_concurrency=mapping.maximum_concurrency,
        max_payload_bytes=services.config.daemon.max_request_bytes,
        filter=record_filter,
    )
    controller = ScalingController(
        maximum=concurrency_bound(mapping.maximum_concurrency, pool),
        batch_size=mapping.batch_size,
    )
    return QueueRunner(
        settings,
        source,
        pool,
        log=services.log,
        metrics=MappingMetrics(mapping.uuid, mapping.function_name),
        policy=ScaledConcurrency(controller),
        on_status=on_status,
    )
