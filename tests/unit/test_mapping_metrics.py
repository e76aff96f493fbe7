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
