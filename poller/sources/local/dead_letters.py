"""A local queue as a dead-letter target: peek at it, redrive it to another local queue.

Both queues live in the SQLite state file, so a redrive moves each batch of messages in one
transaction (``sql.redrive``): a crash part-way leaves every message in exactly one queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from poller.sources.base import SourceError, SourceSpec
from poller.sources.dead_letters import (
    DEAD_LETTER_FIELDS,
    DeadLetter,
    as_int,
    on_failure_details,
)
from poller.sources.local.sql import last_seq, noop, redrive
from poller.state.base import StateError
from poller.state.sqlite import SqliteStore

# Messages per transaction: bounds how long a redrive holds the state file's write lock.
REDRIVE_CHUNK: Final = 500


class LocalDeadLetters:
    def __init__(self, store: SqliteStore, name: str) -> None:
        from poller.sources.local.queue import LocalQueue

        self.store = store
        self.name = name
        self._queue = LocalQueue(store, name)

    async def start(self) -> None:
        await self._run(noop)

    async def close(self) -> None:
        """Nothing to release: the store belongs to whoever opened it."""

    async def peek(self, limit: int) -> list[DeadLetter]:
        letters = []
        for message in await self._queue.peek(limit):
            attributes = message.attributes
            reason, invokes = on_failure_details(message.body)
            letters.append(
                DeadLetter(
                    id=message.id,
                    body=message.body,
                    reason=attributes.get("DeadLetterReason", reason),
                    receive_count=as_int(attributes.get("DeadLetterReceiveCount", invokes)),
                    source=attributes.get("DeadLetterSourceQueue"),
                    sent_ms=message.sent_ms,
                    attributes={k: v for k, v in attributes.items() if k not in DEAD_LETTER_FIELDS},
                )
            )
        return letters

    async def redrive(self, to: SourceSpec, limit: int | None) -> int:
        from poller.sources.local import SOURCE, LocalSpec

        if to.kind is not SOURCE or not isinstance(to, LocalSpec):
            raise SourceError(
                f"local://{self.name} can be redriven only to another local:// queue (both in "
                f"the state file, so each message moves in one transaction), not to "
                f"{to.display_uri}",
                retryable=False,
            )
        if to.queue_name == self.name:
            raise SourceError(
                f"--to names the dead-letter queue itself (local://{self.name})", retryable=False
            )
        # Only what is there now: messages dead-lettered again meanwhile stay for next time.
        up_to = await self._run(last_seq, self.name)
        moved = 0
        while limit is None or moved < limit:
            chunk = REDRIVE_CHUNK if limit is None else min(REDRIVE_CHUNK, limit - moved)
            now = int(time.time() * 1000)
            count = await self._run(redrive, self.name, to.queue_name, to.fifo, up_to, chunk, now)
            moved += count
            if count < chunk:
                break
        return moved

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.store.run(fn, *args)
        except StateError as exc:
            raise SourceError(f"local queue {self.name!r}: {exc}") from exc
