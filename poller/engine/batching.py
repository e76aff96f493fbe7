"""Batch assembly limits and the partial batch response contract (pure logic)."""

from __future__ import annotations

from typing import Any

import msgspec

from poller.sources.base import Message

# {"Records":[ ... ]} around the records, plus a comma between each two.
EVENT_OVERHEAD = len(b'{"Records":[]}')

_decode = msgspec.json.Decoder().decode


class Batch:
    """Messages gathered for one invoke, bounded by count and by encoded event size."""

    __slots__ = ("max_bytes", "max_records", "messages", "size")

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.messages: list[Message] = []
        self.size = EVENT_OVERHEAD

    def __len__(self) -> int:
        return len(self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)

    @property
    def full(self) -> bool:
        return len(self.messages) >= self.max_records

    def fits(self, message: Message) -> bool:
        extra = message.size + (1 if self.messages else 0)
        return len(self.messages) < self.max_records and self.size + extra <= self.max_bytes

    def add(self, message: Message) -> bool:
        """Add if it fits; False means the batch is complete and the message waits for the next."""
        if not self.fits(message):
            return False
        self.size += message.size + (1 if self.messages else 0)
        self.messages.append(message)
        return True

    def too_big_alone(self, message: Message) -> bool:
        return EVENT_OVERHEAD + message.size > self.max_bytes


def parse_batch_item_failures(payload: bytes, ids: set[str]) -> set[str] | None:
    """The messageIds a ReportBatchItemFailures response lists as failed.

    Returns an empty set for complete success (null, {}, an empty or null list) and None when
    the response is invalid, which Lambda treats as a complete failure (ESM_SEMANTICS.md §3.4):
    not JSON, not an object, an itemIdentifier that is missing, empty, null, not a string, or
    not one of the batch's messageIds.
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
        if not isinstance(identifier, str) or not identifier or identifier not in ids:
            return None
        failed.add(identifier)
    return failed
