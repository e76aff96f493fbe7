"""Ordered mappings (Kinesis-like streams): Lambda's delivery contract, written once for every
ordered source.

A runner owns one mapping. It lists the source's shards (again every DISCOVER_INTERVAL_S and
whenever a shard is read to its end, so resharding needs no restart) and runs one
``ShardProcessor`` (engine/shard.py) per shard whose parents are finished: a child starts only
after every parent was read to its end and checkpointed there. Concurrency is shards x
ParallelizationFactor, bounded by the function's reserved concurrency and the memory budget
through the function's leases (a throttle holds the shard, it never uses an attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from poller.engine.checkpoints import startable
from poller.engine.destinations import Destination, open_destination
from poller.engine.filter_compiler import compile_filter_criteria
from poller.engine.filtering import RecordFilter, decode_base64_json
from poller.engine.health import SourceHealth
from poller.engine.lease_ownership import LeaseOwnership
from poller.engine.ownership import DAEMON_ID, Ownership, StoreOwnership
from poller.engine.runners import RunnerError, Services, source_context
from poller.engine.shard import ShardProcessor
from poller.logs import JsonLog
from poller.mappings import Mapping
from poller.metrics import MappingMetrics, leases_held
from poller.runtime.pool import FunctionPool
from poller.sources.base import (
    LATEST,
    TRIM_HORIZON,
    Family,
    Shard,
    SourceError,
    SourceSpec,
    StartAt,
    StreamRecord,
    StreamSource,
)
from poller.state.base import StateError, StateStore

DISCOVER_INTERVAL_S: Final = 10.0
KAFKA_RETRIES_WITH_DESTINATION: Final = 10
STATUS_INTERVAL_S: Final = 1.0
_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class StreamSettings:
    """What a runner needs from a mapping, resolved once."""

    uuid: str
    function_name: str
    function_arn: str
    batch_size: int
    batching_window_s: float
    max_payload_bytes: int
    starting: StartAt = LATEST
    parallelization_factor: int = 1
    bisect: bool = False
    max_retries: int = -1
    max_record_age_s: float | None = None
    tumbling_window_s: int = 0
    report_batch_item_failures: bool = False
    filter: RecordFilter | None = None
    record_shape: str = "kinesis"
    owner: str = ""
    # Backoff between retries of a failing batch (first, at most).
    retry_first_s: float = 0.5
    retry_most_s: float = 30.0
    # How long a shard taken away (rebalance, lease lost) may finish its batch in flight.
    handover_grace_s: float = 10.0


class StreamRunner:
    def __init__(
        self,
        settings: StreamSettings,
        source: StreamSource,
        pool: FunctionPool,
        store: StateStore,
        *,
        log: JsonLog,
        metrics: MappingMetrics,
        destination: Destination | None = None,
        ownership: Ownership | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.pool = pool
        self.store = store
        self.ownership = ownership or StoreOwnership(store, settings.uuid, settings.owner)
        self.log = log
        self.metrics = metrics
        self.destination = destination
        self.fields = {"mapping": settings.uuid, "function": settings.function_name}
        self.health = SourceHealth(log, metrics, self.fields, on_status)
        self.processors: dict[str, ShardProcessor] = {}
        self.finished: set[str] = set()
        # Shards let go because another owner claimed them since we did (for status; the
        # ownership decides whether they are taken again).
        self.lost: set[str] = set()
        self._shards: list[Shard] = []
        self._started = asyncio.Event()
        self._stopping = False
        self._wake = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()

    # -- the Runner interface -----------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started.is_set()

    def status(self) -> dict[str, Any]:
        ages = [p.iterator_age_s for p in self.processors.values() if p.iterator_age_s is not None]
        return {
            "state": "running" if self.started else "starting",
            "lastProcessingResult": self.health.status or None,
            "lastError": self.health.why,
            "iteratorAgeSeconds": round(max(ages), 3) if ages else None,
            "concurrency": self.metrics.running_batches,
            "concurrencyTarget": self._target(),
            "shards": [p.status() for p in self.processors.values()]
            + [{"shardId": shard, "state": "finished"} for shard in sorted(self.finished)]
            + [
                {"shardId": shard, "state": "lost"}
                for shard in sorted(self.lost - set(self.processors))
            ],
        }

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.source.start()
                break
            except SourceError as exc:
                self.health.failed("start", exc)
                await self._sleep(self.health.next_backoff())
        if self._stopping:
            return
        self.health.ok()
        self.metrics.running.set(1)
        self._started.set()
        self.log.info("mapping runner started", **self.fields, source=self.source.stream_arn)
        self._status_task = asyncio.get_running_loop().create_task(self._report_status())
        await self.ownership.start(self._wake.set)
        while not self._stopping:
            try:
                self._shards = await self.source.shards()
                self.health.ok()
            except SourceError as exc:
                self.health.failed("list_shards", exc)
                await self._sleep(self.health.next_backoff())
                continue
            self._reap()
            for shard_id in self.ownership.revoked() & set(self.processors):
                self._give_back(self.processors[shard_id])
            try:
                self.finished |= await self.ownership.finished()
            except StateError as exc:
                self.log.error(f"state store unavailable: {exc}", **self.fields)
                await self._sleep(self.health.next_backoff())
                continue
            taken = set(self.processors)
            for shard in await self.ownership.take(startable(self._shards, self.finished, taken)):
                processor = ShardProcessor(self, shard)
                self.processors[shard.id] = processor
                self.lost.discard(shard.id)
                processor.start()
                self.log.info(
                    "shard processor started",
                    **self.fields,
                    shard=shard.id,
                    parents=list(shard.parents),
                )
            self.metrics.concurrency_target.set(self._target())
            await self._sleep(DISCOVER_INTERVAL_S)

    async def stop(self, grace_s: float) -> None:
        """Stop reading; let batches in flight settle within grace_s (their checkpoints are
        written as they settle); what was read and not settled is read again next time."""
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self.ownership.leaving()
        await asyncio.gather(*(p.stop(grace_s) for p in list(self.processors.values())))
        await asyncio.gather(*self._giving_back, return_exceptions=True)
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(BaseException):
                await self._status_task
        with contextlib.suppress(Exception):
            await self._write_status()
        with contextlib.suppress(Exception):
            await self.ownership.close()
        self.metrics.running.set(0)
        self.metrics.running_batches = 0
        self.metrics.flush()
        if self.destination is not None:
            with contextlib.suppress(Exception):
                await self.destination.close()
        with contextlib.suppress(Exception):
            await self.source.close()

    # -- what shard processors call ---------------------------------------------------------
    def shard_done(self, processor: ShardProcessor) -> None:
        """A processor ended: read to its end (children may start now), or let go."""
        if processor.finished:
            self.finished.add(processor.shard.id)
        if processor.lost:
            self.lost.add(processor.shard.id)
        self._wake.set()

    def counts_throttle(self) -> None:
        self.metrics.throttles.inc()

    def observe_age(self, processor: ShardProcessor) -> None:
        age = processor.iterator_age_s or 0.0
        self.metrics.iterator_age(processor.shard.id).set(age)
        ages = [p.iterator_age_s for p in self.processors.values() if p.iterator_age_s is not None]
        self.metrics.iterator_age_max.set(max(ages, default=age))

    def matches(self, record_filter: RecordFilter, record: StreamRecord) -> bool:
        """Whether a record passes the mapping's filters (§11.3: Kinesis-shaped records on
        ``data``, decoded from base64, with the other ``kinesis`` members as metadata)."""
        decoded = _decode(record.encoded)
        shape = self.settings.record_shape
        if shape == "kinesis":
            return record_filter.matches_decoded(decoded["kinesis"], "data", decode_base64_json)
        if shape == "kafka":
            # §11.3-11.4: ``value`` as JSON or UTF-8 text; a value of the other form matches
            # on the record's metadata only, it is not dropped for that.
            return record_filter.matches_decoded(
                decoded, "value", decode_base64_json, on_mismatch="ignore"
            )
        return record_filter.matches(decoded)

    # -- internals ---------------------------------------------------------------------------
    def _give_back(self, processor: ShardProcessor) -> None:
        """Stop a shard this daemon no longer owns; its in-flight batches settle first."""
        if processor.stopping:
            return
        self.log.info("shard taken away: letting it go", **self.fields, shard=processor.shard.id)
        task = asyncio.get_running_loop().create_task(
            processor.stop(self.settings.handover_grace_s)
        )
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    def _target(self) -> int:
        return sum(len(p.lanes) for p in self.processors.values() if not p.finished)

    def _reap(self) -> None:
        for shard_id, processor in list(self.processors.items()):
            task = processor.task
            if task is None or not task.done():
                continue
            del self.processors[shard_id]
            if not task.cancelled() and task.exception() is not None:
                # A bug or an unexpected error: say so; the shard starts again from its
                # checkpoint on this pass.
                self.log.error(
                    f"shard processor crashed: {task.exception()!r}; restarting it",
                    **self.fields,
                    shard=shard_id,
                )

    async def _sleep(self, seconds: float) -> None:
        # Cleared once seen, not before waiting: a wake-up that came while the runner was busy
        # (the ownership handing a shard over, say) must not wait for the next round.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _report_status(self) -> None:
        """Each shard's checkpoint, iterator age and state, for `poller mappings get`."""
        last: Any = None
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            shards = self.status()["shards"]
            if shards != last:
                with contextlib.suppress(Exception):
                    await self._write_status()
                last = shards

    async def _write_status(self) -> None:
        await self.ownership.report(self.status()["shards"])


def _starting(mapping: Mapping) -> StartAt:
    position = mapping.starting_position
    if position == "TRIM_HORIZON":
        return TRIM_HORIZON
    if position == "AT_TIMESTAMP":
        return StartAt("at_timestamp", timestamp=mapping.starting_position_timestamp)
    return LATEST


def build_stream_runner(
    mapping: Mapping,
    spec: SourceSpec,
    pool: FunctionPool,
    services: Services,
    on_status: Callable[[str], None],
) -> StreamRunner:
    """The runner of an ordered mapping."""
    opener = spec.kind.open
    assert opener is not None, "build_runner starts only runnable kinds"
    context = source_context(services, mapping.uuid, mapping)
    try:
        source: StreamSource = opener(spec, context)
        record_filter = (
            compile_filter_criteria(
                mapping.filter_criteria, json_data_key=spec.kind.filter_json_key
            )
            if mapping.filter_criteria
            else None
        )
        target = mapping.on_failure_destination
        destination = open_destination(target, context, spec) if target else None
    except (SourceError, ValueError) as exc:
        raise RunnerError(str(exc)) from None
    age = mapping.maximum_record_age_in_seconds
    aws = services.config.aws
    retries = -1 if mapping.maximum_retry_attempts is None else mapping.maximum_retry_attempts
    if retries < 0 and destination is not None and spec.kind.family is Family.KAFKA:
        # Lambda's rule for Kafka: infinite retries with an on-failure destination means 10.
        retries = KAFKA_RETRIES_WITH_DESTINATION
    settings = StreamSettings(
        uuid=mapping.uuid,
        function_name=mapping.function_name,
        function_arn=mapping.function_arn(region=aws.region, account=aws.account),
        batch_size=mapping.batch_size,
        batching_window_s=mapping.batching_window_s,
        max_payload_bytes=services.config.daemon.max_request_bytes,
        starting=_starting(mapping),
        parallelization_factor=mapping.parallelization_factor or 1,
        bisect=bool(mapping.bisect_batch_on_function_error),
        max_retries=retries,
        max_record_age_s=None if age is None or age < 0 else float(age),
        tumbling_window_s=mapping.tumbling_window_in_seconds or 0,
        report_batch_item_failures=mapping.report_batch_item_failures,
        filter=record_filter,
        record_shape=spec.kind.record_shape,
        owner=DAEMON_ID,
    )
    store = services.store
    metrics = MappingMetrics(mapping.uuid, mapping.function_name)
    # A source whose service decides who processes which shard and keeps the checkpoints
    # (Kafka's consumer groups and committed offsets) brings its own ownership; otherwise a
    # store with leases (Redis) shares the shards among a fleet.
    own = getattr(source, "ownership", None)
    ownership: Ownership | None = None
    if own is not None:
        ownership = own(settings, metrics)
    elif store.leases is not None:
        ownership = LeaseOwnership(
            store,
            store.leases,
            mapping.uuid,
            DAEMON_ID,
            duration_s=services.config.fleet.lease_duration_s,
            log=services.log,
            fields={"mapping": mapping.uuid, "function": mapping.function_name},
            held_gauge=leases_held.labels(mapping.uuid, mapping.function_name),
        )
    return StreamRunner(
        settings,
        source,
        pool,
        store,
        log=services.log,
        metrics=metrics,
        destination=destination,
        ownership=ownership,
        on_status=on_status,
    )
