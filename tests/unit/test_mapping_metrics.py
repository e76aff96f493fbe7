"""Per-batch counts are kept locally by MappingMetrics; a scrape must still see all of them."""

from __future__ import annotations

from prometheus_client import generate_latest

from poller import metrics


def _value(text: str, name: str, mapping: str) -> float:
    prefix = f'{name}{{function="fn",mapping="{mapping}"'
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {mapping} not exported")


def test_scrape_sees_counts_added_since_the_last_flush() -> None:
    m = metrics.MappingMetrics("m-scrape", "fn")
    m.polled_count += 7
    m.invoked_count += 5
    m.deleted_count += 4
    m.ok_count += 2
    m.running_batches += 3
    text = generate_latest(metrics.REGISTRY).decode()
    assert _value(text, "poller_polled_events_total", "m-scrape") == 7
    assert _value(text, "poller_invoked_events_total", "m-scrape") == 5
    assert _value(text, "poller_deleted_events_total", "m-scrape") == 4
    assert _value(text, "poller_concurrent_executions", "m-scrape") == 3
    assert 'outcome="ok"} 2.0' in text

    m.polled_count += 1
    m.running_batches -= 3
    m.flush()
    m.flush()  # nothing new: nothing added twice
    text = generate_latest(metrics.REGISTRY).decode()
    assert _value(text, "poller_polled_events_total", "m-scrape") == 8
    assert _value(text, "poller_invoked_events_total", "m-scrape") == 5
    assert _value(text, "poller_concurrent_executions", "m-scrape") == 0


def test_scrape_sees_histogram_observations_as_prometheus_would_bucket_them() -> None:
    m = metrics.MappingMetrics("m-hist", "fn")
    reference = metrics.Histogram(
        "reference_seconds",
        "",
        buckets=metrics.invoke_duration._upper_bounds[:-1],
        registry=metrics.CollectorRegistry(),
    )
    values = [0.0, 0.001, 0.0011, 0.0025, 0.3, 1.0, 7.5, 1e9]
    for value in values:
        m.duration.observe(value)
        reference.observe(value)
    m.batch_size.observe(1)
    m.batch_size.observe(100)
    m.batch_size.observe(101)
    text = generate_latest(metrics.REGISTRY).decode()
    name = "poller_invoke_duration_seconds"
    buckets = {
        s.labels["le"]: s.value
        for s in reference.collect()[0].samples
        if s.name == "reference_seconds_bucket"
    }
    for le, value in buckets.items():
        assert f'{name}_bucket{{function="fn",le="{le}",mapping="m-hist"}} {value}' in text
    assert _value(text, f"{name}_count", "m-hist") == len(values)
    assert _value(text, f"{name}_sum", "m-hist") == sum(values)
    assert 'poller_batch_size_events_bucket{function="fn",le="100.0",mapping="m-hist"} 2.0' in text
    assert _value(text, "poller_batch_size_events_count", "m-hist") == 3

    m.flush()  # nothing new: nothing added twice
    m.duration.observe(0.002)
    text = generate_latest(metrics.REGISTRY).decode()
    assert _value(text, f"{name}_count", "m-hist") == len(values) + 1
