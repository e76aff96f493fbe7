"""Group commit for acknowledgements: acks that arrive while one is in flight go out together in
the next round trip. Under load many pollers share one round trip; when idle, none is added."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class GroupCommit:
    def __init__(self, flush: Callable[[list[str]], Awaitable[None]]) -> None:
        self._flush = flush
        self._busy = False
        self._ids: list[str] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def ack(self, ids: list[str]) -> None:
        """Return once ``ids`` are acknowledged (raise what the flush raised)."""
        if not self._busy:
            self._busy = True
            try:
                await self._flush(ids)
            finally:
                if self._waiters:
                    # Hand the queue to a task; it clears _busy when drained.
                    self._task = asyncio.get_running_loop().create_task(self._drain())
                else:
                    self._busy = False
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ids.extend(ids)
        self._waiters.append(waiter)
        await waiter

    async def settle(self, timeout_s: float) -> None:
        """Wait (up to timeout_s) for acks already queued to go out."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)

    async def _drain(self) -> None:
        """Flush queued acks, all of them per round trip, until none are left."""
        try:
            while self._waiters:
                ids, self._ids = self._ids, []
                waiters, self._waiters = self._waiters, []
                try:
                    await self._flush(ids)
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                except BaseException:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.cancel()
                    raise
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            # No await between the emptiness check and this: an ack() arriving now leads.
            self._busy = False
