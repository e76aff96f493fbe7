"""The Kafka adapter the stream engine drives: partitions are shards, the consumer group's
assignment decides which this daemon processes, committed offsets are the checkpoints.

``KafkaStream`` is the StreamSource (I/O only) and the loop's side of the consumer thread
(``consumer.py``); ``KafkaOwnership`` is the engine's Ownership for it: it takes the partitions
the group assigned, gives up those it revokes (a revocation waits until their batches in flight
settled and were committed, or the handover grace ran out), claims a partition at its committed
offset and writes a checkpoint by committing the next offset. Nothing goes to the state store.

A slow handler never causes a rebalance: the consumer thread polls all the time (so
``max_poll_interval_ms`` never runs out, whatever the function timeout), and a partition whose
reader has enough records buffered is paused, not left unpolled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import kafka

from poller.sources.base import ReadResult, Shard, SourceContext, SourceError, StartAt
from poller.sources.kafka import records as kafka_records
from poller.sources.kafka.client import connection_options, consumer_timings, settings_for
from poller.sources.kafka.consumer import Committer, ConsumerThread
from poller.sources.kafka.records import RecordEncoder
from poller.state.base import Checkpoint, Claim, StateError

if TYPE_CHECKING:
    from poller.metrics import MappingMetrics
    from poller.sources.base import StreamRecord
    from poller.sources.kafka import KafkaSpec

# A reader pauses its partition with this many batches buffered (at least MIN_BUFFER records),
# and resumes it below half: enough left that the batches keep flowing while the consumer
# thread gets to the resume (it applies commands between polls) and the next fetch comes back.
BUFFERED_BATCHES: Final = 8
MIN_BUFFER: Final = 2000
RESTART_BACKOFF_S: Final = 2.0
MIN_WAIT_S: Final = 0.05
# What is left of the group's rebalance timeout (max_poll_interval_ms) for the handover: a
# revocation that waits longer gets the member thrown out of the group.
HANDOVER_SHARE: Final = 0.5
KAFKA_DEFAULT_MAX_POLL_INTERVAL_MS: Final = 300_000


@dataclass(slots=True)
class _Partition:
    generation: int  # the assignment it came with: the claim token
    committed: int | None  # the group's committed offset (the next to read), if any
    start: int  # where reading starts when nothing is committed (StartingPosition)


class KafkaStream:
    batch_info_key = "KafkaBatchInfo"
    idle_poll_s = 0.0  # reads wait for the consumer thread

    def __init__(self, spec: KafkaSpec, context: SourceContext) -> None:
        mapping = context.mapping
        self.spec = spec
        self.log = context.log
        self.topics = list(getattr(mapping, "topics", None) or spec.topics)
        self.group_id = getattr(mapping, "consumer_group_id", None) or context.mapping_uuid or ""
        self.settings = settings_for(context)
        self.stream_arn = spec.display_uri
        self.bootstrap = spec.bootstrap
        self.starting = StartAt("latest")
        self.metrics: MappingMetrics | None = None
        self.assigned: dict[str, _Partition] = {}
        self.revoking: set[str] = set()
        self.claimed: dict[str, int] = {}
        self.readers: dict[str, KafkaReader] = {}
        self.handover_grace_s = 10.0
        self._release: list[tuple[set[str], Callable[[], None]]] = []
        self._on_change: Callable[[], None] = lambda: None
        self._thread: ConsumerThread | None = None
        self._committer: Committer | None = None
        self._started: asyncio.Future[BaseException | None] | None = None
        self._broken: BaseException | None = None
        self._epochs = 0
        self._restart: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"KafkaStream({self.stream_arn!r}, group={self.group_id!r})"

    # -- the engine's hooks ---------------------------------------------------------------------
    def ownership(self, settings: Any, metrics: MappingMetrics) -> KafkaOwnership:
        """The consumer group decides which partitions this daemon processes."""
        self.starting = settings.starting
        self.metrics = metrics
        interval = self.settings.max_poll_interval_ms or KAFKA_DEFAULT_MAX_POLL_INTERVAL_MS
        settings.handover_grace_s = min(settings.handover_grace_s, interval / 1000 * HANDOVER_SHARE)
        self.handover_grace_s = settings.handover_grace_s
        return KafkaOwnership(self)

    def envelope(self, shard: str) -> tuple[bytes, bytes]:
        return kafka_records.envelope(self.bootstrap, shard)

    def item_sequence(self, shard: str, identifier: Any) -> str | None:
        return kafka_records.item_sequence(shard, identifier)

    def batch_info(self, shard: str, records: list[StreamRecord]) -> dict[str, Any]:
        head, tail = self.envelope(shard)
        return kafka_records.batch_info(
            self.bootstrap, self.stream_arn, shard, records, len(head) + len(tail)
        )

    # -- StreamSource ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        options = {
            **connection_options(self.settings, list(self.spec.bootstrap_servers), self.stream_arn),
            **consumer_timings(self.settings),
        }
        if not self.topics:
            raise SourceError(f"{self.stream_arn}: no topic to read", retryable=False)
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        thread = ConsumerThread(
            options=options,
            topics=self.topics,
            group_id=self.group_id,
            starting=self.starting,
            encoder=RecordEncoder(),
            loop=loop,
            sink=self,
        )
        thread.start()
        error = await self._started
        if error is not None:
            await asyncio.to_thread(thread.join, 10)
            raise SourceError(f"{self.stream_arn}: cannot connect to Kafka: {error!r}")
        self._thread = thread
        self._broken = None
        self._committer = Committer(thread, loop)
        if not thread.decoded:
            self.log.warning(
                "this kafka-python's fetcher is not the one poller decodes record batches "
                "for: records are taken as ConsumerRecords, which costs about twice the CPU; "
                f"install kafka-python 3.0 (found {kafka.__version__})",
                source=self.stream_arn,
            )

    async def shards(self) -> list[Shard]:
        return [Shard(shard) for shard in sorted(self.assigned) if shard not in self.revoking]

    async def open_reader(self, shard: Shard, start: StartAt) -> KafkaReader:
        partition = self.assigned.get(shard.id)
        if self._thread is None or partition is None:
            raise SourceError(f"{self.stream_arn}: partition {shard.id} is not assigned here")
        offset = int(start.sequence or "-1") + 1 if start.kind == "after" else partition.start
        self._epochs += 1
        reader = KafkaReader(self, shard.id, offset, self._epochs)
        self.readers[shard.id] = reader
        self._thread.open(shard.id, reader.epoch, offset)
        return reader

    async def close(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
        await self._stop_threads()
        self._release_all()

    async def _stop_threads(self) -> None:
        thread, committer = self._thread, self._committer
        self._thread = self._committer = None
        if committer is not None:
            committer.stop()
            await asyncio.to_thread(committer.join, 10)
        if thread is not None:
            thread.stop()
            await asyncio.to_thread(thread.join, 30)

    # -- what the ownership does through the threads ---------------------------------------------
    async def commit(self, shard: str, offset: int) -> None:
        committer = self._committer
        if committer is None:
            raise StateError(f"{self.stream_arn}: not connected; offset of {shard} not committed")
        try:
            await committer.commit(shard, offset)
        except Exception as exc:
            raise StateError(
                f"offset commit of {shard} at {offset} to group {self.group_id!r} failed: {exc!r}"
            ) from exc
        partition = self.assigned.get(shard)
        if partition is not None:
            partition.committed = offset

    def released(self, shard: str) -> None:
        self.claimed.pop(shard, None)
        self._check_released()

    # -- the consumer thread's reports (on the loop) ----------------------------------------------
    def on_started(self, error: BaseException | None) -> None:
        if self._started is not None and not self._started.done():
            self._started.set_result(error)

    def on_assigned(self, generation: int, starts: dict[str, tuple[int | None, int]]) -> None:
        self.assigned = {
            shard: _Partition(generation, committed, start)
            for shard, (committed, start) in starts.items()
        }
        if self.metrics is not None:
            self.metrics.rebalances.inc()
        self.log.info(
            "Kafka partitions assigned",
            source=self.stream_arn,
            group=self.group_id,
            partitions=sorted(starts),
        )
        self._on_change()

    def on_revoking(self, shards: set[str], release: Callable[[], None], lost: bool) -> None:
        if self.metrics is not None:
            self.metrics.rebalances.inc()
        self.log.info(
            "Kafka partitions lost (the group moved on without us)"
            if lost
            else "Kafka partitions revoked: settling their batches before handing them over",
            source=self.stream_arn,
            group=self.group_id,
            partitions=sorted(shards),
        )
        self.revoking |= shards
        if lost:
            for shard in shards:
                self.assigned.pop(shard, None)
        self._release.append((set(shards), release))
        asyncio.get_running_loop().call_later(
            self.handover_grace_s + 2.0, self._force_release, release
        )
        self._check_released()
        self._on_change()

    def on_records(self, batches: list[tuple[str, int, list[StreamRecord]]]) -> None:
        readers = self.readers
        for shard, epoch, records in batches:
            reader = readers.get(shard)
            if reader is not None and reader.epoch == epoch:
                reader.feed(records)

    def on_end_offsets(self, ends: dict[str, int]) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        lags = []
        for shard, end in ends.items():
            partition = self.assigned.get(shard)
            if partition is None:
                continue
            done = partition.committed if partition.committed is not None else partition.start
            lag = max(end - done, 0)
            lags.append(lag)
            metrics.offset_lag(shard).set(lag)
        metrics.offset_lag_sum.set(sum(lags))
        metrics.offset_lag_max.set(max(lags, default=0))

    def on_failed(self, error: BaseException) -> None:
        """The consumer thread stopped on an error: every partition is let go (uncommitted
        work is read again), and the consumer starts over after a pause."""
        self.log.error(
            f"Kafka consumer failed: {error!r}; reconnecting",
            source=self.stream_arn,
            group=self.group_id,
        )
        self._broken = error
        shards = set(self.assigned)
        self.revoking |= shards
        self.assigned.clear()
        self._release_all()
        for reader in self.readers.values():
            reader.wake()
        self._on_change()
        self._restart = asyncio.get_running_loop().create_task(self._start_over())

    async def _start_over(self) -> None:
        await self._stop_threads()
        while True:
            await asyncio.sleep(RESTART_BACKOFF_S)
            try:
                await self.start()
                return
            except SourceError as exc:
                self.log.error(str(exc), source=self.stream_arn, group=self.group_id)

    # -- internals ----------------------------------------------------------------------------
    def _check_released(self) -> None:
        for entry in list(self._release):
            shards, release = entry
            if not shards & set(self.claimed):
                self._release.remove(entry)
                self._let_go(shards)
                release()

    def _force_release(self, release: Callable[[], None]) -> None:
        for entry in list(self._release):
            if entry[1] is release:
                self._release.remove(entry)
                self.log.warning(
                    "handover grace expired: partitions released with batches unsettled; they "
                    "are read again by their next owner",
                    source=self.stream_arn,
                    partitions=sorted(entry[0]),
                )
                self._let_go(entry[0])
                release()

    def _release_all(self) -> None:
        for shards, release in self._release:
            self._let_go(shards)
            release()
        self._release.clear()

    def _let_go(self, shards: set[str]) -> None:
        for shard in shards:
            self.revoking.discard(shard)
            self.assigned.pop(shard, None)
            if self.metrics is not None:
                self.metrics.drop_offset_lag(shard)


class KafkaReader:
    """One partition, read from the offset it was opened at (records arrive from the
    consumer thread; the partition is paused while enough are buffered)."""

    def __init__(self, stream: KafkaStream, shard: str, offset: int, epoch: int) -> None:
        self._stream = stream
        self.shard = shard
        self.epoch = epoch
        self.start_point: str | None = str(offset - 1)
        self._next = offset
        self._buffer: deque[StreamRecord] = deque()
        self._arrived = asyncio.Event()
        self._paused = False
        self._high = MIN_BUFFER

    def feed(self, records: list[StreamRecord]) -> None:
        buffer = self._buffer
        if records and int(records[0].sequence) >= self._next:
            # The usual case: a poll's records of a partition are in offset order, all new.
            buffer.extend(records)
            self._next = int(records[-1].sequence) + 1
        else:
            for record in records:
                offset = int(record.sequence)
                if offset < self._next:
                    continue  # fetched before a seek
                buffer.append(record)
                self._next = offset + 1
        self._arrived.set()
        if not self._paused and len(buffer) >= self._high:
            self._paused = True
            thread = self._stream._thread
            if thread is not None:
                thread.pause(self.shard)

    def wake(self) -> None:
        self._arrived.set()

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        if self._stream._broken is not None:
            raise SourceError(
                f"{self._stream.stream_arn}: consumer failed: {self._stream._broken!r}"
            )
        self._high = max(limit * BUFFERED_BATCHES, MIN_BUFFER)
        buffer = self._buffer
        if not buffer:
            # Records come from the consumer thread, not a call of ours: even a read that may
            # not block waits a moment for them, so the engine's reading never spins.
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), max(wait_s, MIN_WAIT_S))
        count = min(limit, len(buffer))
        records = [buffer.popleft() for _ in range(count)]
        if self._paused and len(buffer) < self._high // 2:
            self._paused = False
            thread = self._stream._thread
            if thread is not None:
                thread.resume(self.shard)
        return ReadResult(records)

    async def close(self) -> None:
        stream = self._stream
        if stream.readers.get(self.shard) is self:
            del stream.readers[self.shard]
        if stream._thread is not None:
            stream._thread.close_partition(self.shard, self.epoch)


class KafkaOwnership:
    """The engine's Ownership for a Kafka mapping: the consumer group's."""

    def __init__(self, stream: KafkaStream) -> None:
        self.stream = stream

    async def start(self, on_change: Callable[[], None]) -> None:
        self.stream._on_change = on_change

    async def finished(self) -> set[str]:
        return set()  # a partition never ends

    async def take(self, startable: Sequence[Shard]) -> list[Shard]:
        stream = self.stream
        return [s for s in startable if s.id in stream.assigned and s.id not in stream.revoking]

    def revoked(self) -> set[str]:
        return set(self.stream.revoking)

    async def claim(self, shard: Shard) -> Claim:
        partition = self.stream.assigned.get(shard.id)
        if partition is None:
            raise StateError(f"partition {shard.id} is no longer assigned to this daemon")
        self.stream.claimed[shard.id] = partition.generation
        committed = partition.committed
        position = None if committed is None else str(committed - 1)
        return Claim(partition.generation, Checkpoint(position))

    async def write(self, shard: Shard, token: int, checkpoint: Checkpoint) -> None:
        partition = self.stream.assigned.get(shard.id)
        if partition is None or partition.generation != token:
            # Revoked and handed over: committing now could overwrite the next owner's work.
            raise StateError(
                f"partition {shard.id} was handed over in a rebalance; its offset is not "
                "committed (the next owner reads the unsettled records again)"
            )
        assert checkpoint.position is not None
        await self.stream.commit(shard.id, int(checkpoint.position) + 1)

    async def release(self, shard: Shard, token: int) -> None:
        if self.stream.claimed.get(shard.id) == token:
            self.stream.released(shard.id)

    async def close(self) -> None:
        """The consumer leaves the group when the source closes."""
