"""The checkpoints of a shard (part of ShardProcessor, engine/shard.py), written behind its lanes.

One write at a time per shard and at most one per CHECKPOINT_INTERVAL_S: a lane invokes its next
batch while the checkpoint of its last one is being written, and what settles meanwhile goes
into the next write (only the newest position is written). A lane waits before invoking again
once a settled position is queued behind a write still out, so a store that is down holds the
shard after a batch, and a crash repeats at most the batches in flight, what settled in the last
interval and the records of the write that was out (and a batch per lane queued behind it); a
graceful stop and a shard's end write everything settled first. A write carries the claim token
the shard was taken under; once it is stale the shard is let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Final

from poller.state.base import Checkpoint, StaleClaimError

if TYPE_CHECKING:
    from poller.engine.checkpoints import ShardProgress
    from poller.engine.stream import StreamRunner
    from poller.engine.windows import Window
    from poller.sources.base import Shard

# A shard's checkpoint is written at most this often: batches that settle faster share a write.
# Short next to a batch of a handler that does any work, so a crash repeats little more than
# the batches in flight; long next to a write, so a fast shard does not spend its time on them.
CHECKPOINT_INTERVAL_S: Final = 0.01


class Stopped(Exception):
    """The shard is being let go: what is not settled is read again from the checkpoint."""


class ShardCheckpoints:
    """The checkpoint-writing half of a shard processor."""

    runner: StreamRunner
    shard: Shard
    progress: ShardProgress
    window: Window | None
    checkpoint: Checkpoint
    stopping: bool
    lost: bool
    _token: int
    _fields: dict[str, Any]

    async def _state(self, operation: str, call: Any) -> Any: ...

    def _wake_all(self) -> None: ...

    def _init_writer(self) -> None:
        # The newest checkpoint asked for, the one waiting for the writer (None: nothing new),
        # whether no write is out, and no more to come.
        self._latest = Checkpoint()
        self._wanted: Checkpoint | None = None
        self._want = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._drained = asyncio.Event()

    async def _advance(self) -> None:
        """Checkpoint as far as the settled records go (with the window's state): hand the
        position to the writer, and wait if one is still queued behind a write that is out."""
        position = self.progress.advance()
        window = None if self.window is None else self.window.saved()
        latest = self._latest
        if position is None and window == latest.window:
            return
        self._latest = self._wanted = Checkpoint(position or latest.position, window)
        self._want.set()
        idle = self._idle
        while self._wanted is not None and not idle.is_set() and not self.stopping:
            await idle.wait()

    async def _checkpointer(self) -> None:
        """Write the newest checkpoint asked for, one write at a time, until drained."""
        want, idle, drained = self._want, self._idle, self._drained
        while True:
            checkpoint = self._wanted
            if checkpoint is None:
                if self._draining:
                    return
                want.clear()
                await want.wait()
                continue
            self._wanted = None
            idle.clear()
            started = time.monotonic()
            try:
                await self._write(checkpoint)
            except BaseException:
                # Lanes must not go on settling what can no longer be checkpointed.
                self.stopping = True
                self._wake_all()
                raise
            finally:
                idle.set()
            rest = started + CHECKPOINT_INTERVAL_S - time.monotonic()
            if rest > 0 and not self._draining:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(drained.wait(), rest)

    async def _write(self, checkpoint: Checkpoint) -> None:
        runner = self.runner
        try:
            await self._state(
                "checkpoint",
                lambda: runner.ownership.write(self.shard, self._token, checkpoint),
            )
        except StaleClaimError as exc:
            runner.log.error(f"{exc}; letting the shard go", **self._fields)
            self.lost = True
            self.stopping = True
            self._wake_all()
            raise Stopped from None
        self.checkpoint = checkpoint
        runner.metrics.checkpoints.inc()
