"""Batch assembly limits and the partial batch response contract (pure logic)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

# {"Records":[ ... ]} around the records, plus a comma between each two.
EVENT_OVERHEAD = len(b'{"Records":[]}')

_decode = msgspec.json.Decoder().decode


class Sized(Protocol):
    """What a batch needs of a record: its encoded size (an upper bound is fine)."""

    size: int


R = TypeVar("R", bound=Sized)


class Batch(Generic[R]):
    """Records gathered for one invoke, bounded by count and by the encoded event's size.

    ``overhead`` is the envelope's size without records (``{"Records":[]}`` by default; a
    Kafka event's envelope differs); records are joined by one comma each.
    """

    __slots__ = ("max_bytes", "max_records", "overhead", "records", "size")

    def __init__(self, max_records: int, max_bytes: int, overhead: int = EVENT_OVERHEAD) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.overhead = overhead
        self.records: list[R] = []
        self.size = overhead

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        return bool(self.records)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.max_records

    def fits(self, record: R) -> bool:
        extra = record.size + (1 if self.records else 0)
        return len(self.records) < self.max_records and self.size + extra <= self.max_bytes

    def add(self, record: R) -> bool:
        """Add if it fits; False means the batch is complete and the record waits for the next."""
        if not self.fits(record):
            return False
        self.size += record.size + (1 if self.records else 0)
        self.records.append(record)
        return True

    def too_big_alone(self, record: R) -> bool:
        return self.overhead + record.size > self.max_bytes


# Turns an itemIdentifier of a source's own form into the id it names (None: not valid).
Identify = Callable[[Any], str | None]


def parse_batch_item_failures(
    payload: bytes, ids: set[str], identify: Identify | None = None
) -> set[str] | None:
    """The messageIds a ReportBatchItemFailures response lists as failed.

    Returns an empty set for complete success (null, {}, an empty or null list) and None when
    the response is invalid, which Lambda treats as a complete failure (ESM_SEMANTICS.md §3.4):
    not JSON, not an object, an itemIdentifier that is missing, empty, null, not a string, or
    not one of the batch's messageIds. ``identify`` reads identifiers that are not strings
    (Kafka's ``{"partition": "TOPIC-N", "offset": N}``, §5.3).
    """
    try:
        response: Any = _decode(payload) if payload.strip() else None
    except msgspec.DecodeError:
        return None
    if response is None:
        return set()
    if not isinstance(response, dict):
        return None
    failures = response.get("batchItemFailures")
    if failures is None:
        return set()
    if not isinstance(failures, list):
        return None
    failed: set[str] = set()
    for item in failures:
        if not isinstance(item, dict):
            return None
        identifier = item.get("itemIdentifier")
        if identify is not None:
            identifier = identify(identifier)
        if not isinstance(identifier, str) or not identifier or identifier not in ids:
            return None
        failed.add(identifier)
    return failed


MISSING = object()  # a response without the member asked for


def parse_stream_response(
    payload: bytes, sequences: set[str], *, with_state: bool, identify: Identify | None = None
) -> tuple[set[str] | None, Any]:
    """(failed sequence numbers, state) of an ordered mapping's response.

    The failures follow ``parse_batch_item_failures`` (None: the response is invalid, a
    complete failure). ``state`` is the tumbling window's new state when ``with_state``:
    MISSING when the response has none, which Lambda treats as a failure (§4.6).
    """
    failed = parse_batch_item_failures(payload, sequences, identify)
    if not with_state:
        return failed, None
    try:
        response: Any = _decode(payload) if payload.strip() else None
    except msgspec.DecodeError:
        return None, MISSING
    state = response.get("state", MISSING) if isinstance(response, dict) else MISSING
    if state is not MISSING and not isinstance(state, dict):
        return None, MISSING
    return failed, state
