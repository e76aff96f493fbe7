"""Every Prometheus metric poller exports, defined in one place.

Names follow Prometheus conventions (`poller_..._total` counters, `_seconds` histograms) and map
to Lambda's CloudWatch metrics (ESM_SEMANTICS.md §10): the EventCount group per mapping, and
the function-level Invocations / Errors / Throttles / Duration / ConcurrentExecutions.
Labels: `mapping` is the EventSourceMappingUUID, `function` the function name.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


class _FlushMappingCounts(Collector):
    """Adds every mapping's locally kept counts (MappingMetrics.flush) to the metrics when the
    registry is read. Registered before any metric: a registry collects in registration
    order, so a scrape sees every count up to that moment."""

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        for mapping_metrics in list(_live):
            mapping_metrics.flush()
        return ()


_live: weakref.WeakSet[MappingMetrics] = weakref.WeakSet()
REGISTRY.register(_FlushMappingCounts())

_M = ("mapping", "function")

polled_events = Counter(
    "poller_polled_events_total",
    "Events read from the source (PolledEventCount).",
    _M,
    registry=REGISTRY,
)
filtered_out_events = Counter(
    "poller_filtered_out_events_total",
    "Events that matched no filter pattern and were removed without an invoke "
    "(FilteredOutEventCount).",
    _M,
    registry=REGISTRY,
)
invoked_events = Counter(
    "poller_invoked_events_total",
    "Events handed to the function; retries count again (InvokedEventCount).",
    _M,
    registry=REGISTRY,
)
failed_invoke_events = Counter(
    "poller_failed_invoke_events_total",
    "Events whose invoke failed or that were reported in batchItemFailures "
    "(FailedInvokeEventCount).",
    _M,
    registry=REGISTRY,
)
deleted_events = Counter(
    "poller_deleted_events_total",
    "Events deleted/acknowledged after processing (DeletedEventCount).",
    _M,
    registry=REGISTRY,
)
dropped_events = Counter(
    "poller_dropped_events_total",
    "Events given up on without an on-failure destination, by reason: RetryAttemptsExhausted, "
    "RecordAgeExceeded, MaximumPayloadSizeExceeded (DroppedEventCount).",
    (*_M, "reason"),
    registry=REGISTRY,
)
dead_lettered_events = Counter(
    "poller_dead_lettered_events_total",
    "Events moved to a dead-letter target by poller (sources without native redrive).",
    _M,
    registry=REGISTRY,
)
invocations = Counter(
    "poller_invocations_total",
    "Function invocations by outcome (ok, function_error, timeout, out_of_memory, crashed, "
    "init_error, invalid_request).",
    (*_M, "outcome"),
    registry=REGISTRY,
)
invoke_errors = Counter(
    "poller_invoke_errors_total",
    "Invocations that ended in a function error (Errors).",
    _M,
    registry=REGISTRY,
)
throttles = Counter(
    "poller_throttles_total",
    "Times a mapping found no free function slot and waited instead of receiving (Throttles).",
    _M,
    registry=REGISTRY,
)
invoke_duration = Histogram(
    "poller_invoke_duration_seconds",
    "Invoke round-trip time (Duration).",
    _M,
    buckets=(
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
        900,
    ),
    registry=REGISTRY,
)
batch_size = Histogram(
    "poller_batch_size_events",
    "Events per invoked batch.",
    _M,
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500, 5000, 10000),
    registry=REGISTRY,
)
concurrent_executions = Gauge(
    "poller_concurrent_executions",
    "Batches being processed now (ConcurrentExecutions).",
    _M,
    registry=REGISTRY,
)
concurrency_target = Gauge(
    "poller_mapping_concurrency_target",
    "Concurrent batches the mapping's scaling controller aims for.",
    _M,
    registry=REGISTRY,
)
queue_visible = Gauge(
    "poller_queue_visible_messages",
    "Messages waiting in the source queue.",
    _M,
    registry=REGISTRY,
)
queue_in_flight = Gauge(
    "poller_queue_in_flight_messages",
    "Messages received and not yet deleted.",
    _M,
    registry=REGISTRY,
)
source_errors = Counter(
    "poller_source_errors_total",
    "Failed calls to the event source.",
    (*_M, "operation"),
    registry=REGISTRY,
)
source_connected = Gauge(
    "poller_source_connected",
    "1 while the mapping's source is reachable, 0 during an outage.",
    _M,
    registry=REGISTRY,
)
mapping_running = Gauge(
    "poller_mapping_running",
    "1 for each mapping with a running runner.",
    _M,
    registry=REGISTRY,
)
environments = Gauge(
    "poller_environments",
    "Execution environments alive, by function.",
    ("function",),
    registry=REGISTRY,
)
memory_used = Gauge(
    "poller_memory_reserved_megabytes",
    "Memory counted against the daemon budget by live environments.",
    registry=REGISTRY,
)

# -- functions ---------------------------------------------------------------------------------
cold_starts = Counter(
    "poller_cold_starts_total",
    "Invokes that started a new execution environment (they report an Init Duration).",
    ("function",),
    registry=REGISTRY,
)
init_duration = Histogram(
    "poller_init_duration_seconds",
    "Init phase of a new execution environment: spawn, import, module code (Init Duration).",
    ("function",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)

# -- mapping health ----------------------------------------------------------------------------
mapping_problem = Gauge(
    "poller_mapping_problem",
    "1 while the mapping's last result is a PROBLEM (source unreachable, function cannot start, "
    "destination down); `poller status` says why.",
    _M,
    registry=REGISTRY,
)
daemon_ready = Gauge(
    "poller_daemon_ready",
    "1 while /readyz answers ready.",
    registry=REGISTRY,
)

# -- ordered sources (streams, Kafka) ----------------------------------------------------------
iterator_age = Gauge(
    "poller_iterator_age_seconds",
    "Age of the last record of the batch just invoked, per shard (IteratorAge).",
    (*_M, "shard"),
    registry=REGISTRY,
)
iterator_age_max = Gauge(
    "poller_iterator_age_max_seconds",
    "The largest iterator age over the mapping's shards.",
    _M,
    registry=REGISTRY,
)
millis_behind_latest = Gauge(
    "poller_millis_behind_latest",
    "How far a Kinesis shard's reader is behind the tip of the shard (MillisBehindLatest).",
    (*_M, "shard"),
    registry=REGISTRY,
)
checkpoints = Counter(
    "poller_checkpoints_total",
    "Checkpoints written (or offsets committed).",
    _M,
    registry=REGISTRY,
)
on_failure_delivered = Counter(
    "poller_on_failure_destination_delivered_events_total",
    "Records sent to the on-failure destination (OnFailureDestinationDeliveredEventCount).",
    (*_M, "reason"),
    registry=REGISTRY,
)
destination_failures = Counter(
    "poller_destination_delivery_failures_total",
    "Failed sends to the on-failure destination; the shard waits and retries "
    "(DestinationDeliveryFailures).",
    _M,
    registry=REGISTRY,
)
batches_bisected = Counter(
    "poller_batches_bisected_total",
    "Failing batches split in two (BisectBatchOnFunctionError).",
    _M,
    registry=REGISTRY,
)
records_expired = Counter(
    "poller_records_lost_to_retention_total",
    "Records the source dropped (retention, trimming) before the mapping read them; a gap "
    "whose size the source cannot tell (Redis streams) counts as 1.",
    _M,
    registry=REGISTRY,
)
kafka_offset_lag = Gauge(
    "poller_kafka_offset_lag",
    "Log end offset minus committed offset, per partition (OffsetLag).",
    (*_M, "partition"),
    registry=REGISTRY,
)
kafka_offset_lag_sum = Gauge(
    "poller_kafka_offset_lag_sum",
    "Offset lag summed over the mapping's partitions (SumOffsetLag).",
    _M,
    registry=REGISTRY,
)
kafka_offset_lag_max = Gauge(
    "poller_kafka_offset_lag_max",
    "The largest offset lag over the mapping's partitions (MaxOffsetLag).",
    _M,
    registry=REGISTRY,
)
kafka_rebalances = Counter(
    "poller_kafka_rebalances_total",
    "Partition assignments and revocations received.",
    _M,
    registry=REGISTRY,
)
leases_held = Gauge(
    "poller_leases_held",
    "Shard leases this daemon holds (fleet mode).",
    _M,
    registry=REGISTRY,
)


# Every metric labelled exactly (mapping, function).
_PER_MAPPING: tuple[Counter | Gauge | Histogram, ...] = (
    polled_events,
    filtered_out_events,
    invoked_events,
    failed_invoke_events,
    deleted_events,
    dead_lettered_events,
    invoke_errors,
    throttles,
    invoke_duration,
    batch_size,
    concurrent_executions,
    concurrency_target,
    queue_visible,
    queue_in_flight,
    source_connected,
    mapping_running,
    mapping_problem,
    iterator_age_max,
    checkpoints,
    destination_failures,
    batches_bisected,
    records_expired,
    kafka_offset_lag_sum,
    kafka_offset_lag_max,
    kafka_rebalances,
    leases_held,
)


class LocalHistogram:
    """A histogram child's observations, kept as plain numbers until ``flush`` hands them on.

    prometheus_client takes a lock for the sum and another for the bucket on every
    ``observe``; a mapping observes two histograms per batch, so at one record per batch those
    locks were a visible share of the engine's cost. Only the event loop's thread observes;
    ``flush`` (under the owner's lock) reads the totals and adds what is new to the child.
    """

    __slots__ = ("_bounds", "_child", "_counts", "_flushed", "_flushed_sum", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        # The child's own upper bounds, +Inf last; a value goes to the first bound >= it, as
        # in Histogram.observe.
        self._bounds = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._flushed = [0] * len(self._bounds)
        self._sum = 0.0
        self._flushed_sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        # Private parts of prometheus_client's Histogram (its per-bucket values and sum): the
        # public observe() cannot add many observations at once.
        child = self._child
        counts, flushed = self._counts, self._flushed
        for index, count in enumerate(counts):
            if count != flushed[index]:
                child._buckets[index].inc(count - flushed[index])
                flushed[index] = count
        total = self._sum
        if total != self._flushed_sum:
            child._sum.inc(total - self._flushed_sum)
            self._flushed_sum = total


class MappingMetrics:
    """The label children of one mapping, resolved once: label lookups are off the hot path.

    The counts that change with every batch (events polled, invoked, deleted, successful
    invocations, batches running, and the duration and batch-size histograms) are plain numbers
    the engine adds to; ``flush()`` hands them to the metrics, one locked update per metric, on
    every scrape and every engine tick.
    (prometheus_client takes a lock per update: one update per batch and metric was a
    noticeable share of the cost of a one-record batch.) Only the event loop's thread adds;
    ``flush()`` writes nothing the adders write, so a scrape from another thread loses nothing.
    """

    __slots__ = (
        "__weakref__",
        "_extra",
        "_flush_lock",
        "_flushed",
        "batch_size",
        "bisected",
        "checkpoints",
        "concurrency_target",
        "concurrent",
        "dead_lettered",
        "deleted",
        "deleted_count",
        "destination_failures",
        "duration",
        "errors",
        "failed_invoke",
        "filtered_out",
        "function",
        "in_flight",
        "invoked",
        "invoked_count",
        "iterator_age_max",
        "mapping",
        "offset_lag_max",
        "offset_lag_sum",
        "ok_count",
        "polled",
        "polled_count",
        "problem",
        "rebalances",
        "records_lost",
        "running",
        "running_batches",
        "source_connected",
        "throttles",
        "visible",
    )

    def __init__(self, mapping: str, function: str) -> None:
        self.mapping = mapping
        self.function = function
        labels = (mapping, function)
        self.polled = polled_events.labels(*labels)
        self.filtered_out = filtered_out_events.labels(*labels)
        self.invoked = invoked_events.labels(*labels)
        self.failed_invoke = failed_invoke_events.labels(*labels)
        self.deleted = deleted_events.labels(*labels)
        self.dead_lettered = dead_lettered_events.labels(*labels)
        self.errors = invoke_errors.labels(*labels)
        self.throttles = throttles.labels(*labels)
        self.duration = LocalHistogram(invoke_duration.labels(*labels))
        self.batch_size = LocalHistogram(batch_size.labels(*labels))
        self.concurrent = concurrent_executions.labels(*labels)
        self.concurrency_target = concurrency_target.labels(*labels)
        self.visible = queue_visible.labels(*labels)
        self.in_flight = queue_in_flight.labels(*labels)
        self.source_connected = source_connected.labels(*labels)
        self.running = mapping_running.labels(*labels)
        self.problem = mapping_problem.labels(*labels)
        self.iterator_age_max = iterator_age_max.labels(*labels)
        self.checkpoints = checkpoints.labels(*labels)
        self.destination_failures = destination_failures.labels(*labels)
        self.bisected = batches_bisected.labels(*labels)
        self.records_lost = records_expired.labels(*labels)
        self.offset_lag_sum = kafka_offset_lag_sum.labels(*labels)
        self.offset_lag_max = kafka_offset_lag_max.labels(*labels)
        self.rebalances = kafka_rebalances.labels(*labels)
        # Children with one more label (outcome, operation, shard, reason), made when first used.
        self._extra: dict[tuple[Any, str], Any] = {}
        # Totals since creation (the engine adds to them) and what flush() has handed on.
        self.polled_count = 0
        self.invoked_count = 0
        self.deleted_count = 0
        self.ok_count = 0  # invocations with outcome "ok"
        self.running_batches = 0  # poller_concurrent_executions
        self._flushed = [0, 0, 0, 0]
        self._flush_lock = threading.Lock()
        _live.add(self)

    def flush(self) -> None:
        """Hand the locally kept counts to the metrics."""
        with self._flush_lock:
            flushed = self._flushed
            totals = (self.polled_count, self.invoked_count, self.deleted_count, self.ok_count)
            for index, (total, counter) in enumerate(
                zip(
                    totals,
                    (self.polled, self.invoked, self.deleted, self.outcome("ok")),
                    strict=True,
                )
            ):
                if total != flushed[index]:
                    counter.inc(total - flushed[index])
                    flushed[index] = total
            self.concurrent.set(self.running_batches)
            self.duration.flush()
            self.batch_size.flush()

    def _labelled(self, metric: Counter | Gauge, extra: str) -> Any:
        """The child of a metric with one label beyond (mapping, function), resolved once."""
        child = self._extra.get((metric, extra))
        if child is None:
            child = self._extra[(metric, extra)] = metric.labels(self.mapping, self.function, extra)
        return child

    def outcome(self, outcome: str) -> Counter:
        """The invocations counter of one outcome (resolved once: it is counted per batch)."""
        child: Counter = self._labelled(invocations, str(outcome))
        return child

    def source_error(self, operation: str) -> Counter:
        child: Counter = self._labelled(source_errors, operation)
        return child

    def iterator_age(self, shard: str) -> Gauge:
        child: Gauge = self._labelled(iterator_age, shard)
        return child

    def millis_behind(self, shard: str) -> Gauge:
        child: Gauge = self._labelled(millis_behind_latest, shard)
        return child

    def offset_lag(self, partition: str) -> Gauge:
        child: Gauge = self._labelled(kafka_offset_lag, partition)
        return child

    def drop_offset_lag(self, partition: str) -> None:
        """Stop exporting a partition's lag: it went to another member of the group."""
        if self._extra.pop((kafka_offset_lag, partition), None) is not None:
            with contextlib.suppress(KeyError):
                kafka_offset_lag.remove(self.mapping, self.function, partition)

    def on_failure_delivered(self, reason: str) -> Counter:
        child: Counter = self._labelled(on_failure_delivered, reason)
        return child

    def dropped(self, reason: str) -> Counter:
        child: Counter = self._labelled(dropped_events, reason)
        return child

    def remove(self) -> None:
        """Drop every series of this mapping: it was deleted (or disabled), and a series that
        stays exported would keep dashboards and alerts on a mapping that is gone."""
        _live.discard(self)
        labels = (self.mapping, self.function)
        for metric in _PER_MAPPING:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        for metric, extra in self._extra:
            with contextlib.suppress(KeyError):
                metric.remove(*labels, extra)
        self._extra.clear()
