"""What happens to a stream batch after each invoke: the retry, bisect and record-age rules of
ordered mappings (ESM_SEMANTICS.md §4.3, §4.4, §13), as pure decisions.

A ``Work`` is a run of consecutive records of one shard still to be delivered, with the number
of counted failures and of invokes it went through. After an invoke the engine asks
``after_error`` or ``after_partial`` what to do; before one, ``split_expired`` takes off the
records too old to invoke again.

* A function error counts as an attempt, unless the batch is bisected: with
  BisectBatchOnFunctionError a failing batch of more than one record is split in halves,
  oldest half first, and splitting uses no attempt. A single record (or a batch without
  bisect) is retried until it has failed MaximumRetryAttempts + 1 times, then given up on.
* A partial batch response counts as an attempt: the records before the lowest failed one
  are done, and the batch is retried from that record (with bisect too: the batch is
  "bisected at the returned sequence number").
* Records older than MaximumRecordAgeInSeconds at an attempt are given up on without it.
* Throttles, source outages and shutdown are not attempts: the engine just waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

RETRIES_EXHAUSTED: Final = "RetryAttemptsExhausted"
RECORD_AGE_EXCEEDED: Final = "RecordAgeExceeded"
PAYLOAD_TOO_LARGE: Final = "MaximumPayloadSizeExceeded"


class Aged(Protocol):
    arrival: float


R = TypeVar("R", bound=Aged)


@dataclass(slots=True)
class Work(Generic[R]):
    records: list[R]
    failures: int = 0  # counted attempts that failed
    invokes: int = 0  # invokes the records went through (approximateInvokeCount)


@dataclass(slots=True)
class Decision(Generic[R]):
    done: list[R] = field(default_factory=list)  # settled: succeeded
    next: list[Work[R]] = field(default_factory=list)  # to invoke next, oldest first
    given_up: list[R] = field(default_factory=list)  # to the destination (or dropped)
    bisected: bool = False


def exhausted(failures: int, max_retries: int) -> bool:
    """-1 retries until the records expire; N allows N retries after the first attempt."""
    return max_retries >= 0 and failures > max_retries


def after_error(work: Work[R], *, bisect: bool, max_retries: int) -> Decision[R]:
    """The function failed (error, timeout, crash) on the whole batch."""
    if bisect and len(work.records) > 1:
        half = len(work.records) // 2
        return Decision(
            next=[
                Work(work.records[:half], work.failures, work.invokes),
                Work(work.records[half:], work.failures, work.invokes),
            ],
            bisected=True,
        )
    work.failures += 1
    if exhausted(work.failures, max_retries):
        return Decision(given_up=work.records)
    return Decision(next=[work])


def after_partial(work: Work[R], first_failed: int, *, max_retries: int) -> Decision[R]:
    """The function reported failures, the lowest at index ``first_failed`` of the batch."""
    done, rest = work.records[:first_failed], work.records[first_failed:]
    work.failures += 1
    if exhausted(work.failures, max_retries):
        return Decision(done=done, given_up=rest)
    return Decision(done=done, next=[Work(rest, work.failures, work.invokes)])


def split_expired(records: list[R], max_age_s: float | None, now: float) -> tuple[list[R], list[R]]:
    """(too old to invoke, the rest). Records arrive in order, so the old ones lead."""
    if max_age_s is None:
        return [], records
    oldest_allowed = now - max_age_s
    index = 0
    while index < len(records) and records[index].arrival < oldest_allowed:
        index += 1
    return records[:index], records[index:]


def retry_delay(failures: int, first_s: float, most_s: float) -> float:
    """Exponential backoff between retries of one batch."""
    return float(min(first_s * 2 ** max(failures - 1, 0), most_s))
