"""Checkpoint arithmetic for ordered shards (pure, no I/O).

A shard's records are read in order and handed to up to ParallelizationFactor lanes by a hash
of their partition key, so batches of one shard finish out of order. The checkpoint may pass a
record only when it and everything before it is settled (done, filtered out, or given up on):
``ShardProgress`` keeps the records read and not yet checkpointed, in read order, and says
how far the checkpoint may move. Parent-before-child ordering on resharding is here too.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from poller.sources.base import Shard

# The checkpoint of a closed shard read to its end: its children may start.
SHARD_END: Final = "SHARD_END"


class Sequenced(Protocol):
    sequence: str
    settled: bool


class ShardProgress:
    """The records of one shard between its checkpoint and the reader, in read order."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: deque[Sequenced] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, records: Iterable[Sequenced]) -> None:
        """Records just read, in order."""
        self._pending.extend(records)

    @staticmethod
    def settle(records: Iterable[Sequenced]) -> None:
        """Records whose fate is decided: invoked successfully, filtered out or given up on."""
        for record in records:
            record.settled = True

    def advance(self) -> str | None:
        """The sequence number the checkpoint may move to now (None: no further than it is):
        the last of the settled records that every earlier record is settled before."""
        pending = self._pending
        last: Sequenced | None = None
        while pending and pending[0].settled:
            last = pending.popleft()
        return None if last is None else last.sequence


def lane_of(partition_key: str, lanes: int) -> int:
    """The lane of a record: one partition key always in one lane, so its order holds.
    (crc32, not hash(): the same on every run and every daemon.)"""
    if lanes == 1:
        return 0
    return zlib.crc32(partition_key.encode()) % lanes


def startable(shards: Sequence[Shard], finished: set[str], started: set[str]) -> list[Shard]:
    """Shards that may start now: not started or finished yet, and every parent read to its
    end and checkpointed there. A parent the stream no longer lists (past its retention)
    counts as finished: nothing of it can be read any more."""
    listed = {shard.id for shard in shards}
    return [
        shard
        for shard in shards
        if shard.id not in finished
        and shard.id not in started
        and all(parent in finished or parent not in listed for parent in shard.parents)
    ]
