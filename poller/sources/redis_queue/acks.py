"""Group commit for acknowledgements: acks that arrive while one is in flight go out together in
the next round trip. Under load many pollers share one round trip; when idle, none is added.

An ack waits one loop turn before it is sent on its own: a read sent in that turn takes it along
(``take``), so the XACK and the next XREADGROUP share one write and one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Waiters = list[asyncio.Future[None]]


class GroupCommit:
    def __init__(
        self,
        flush: Callable[[list[str]], Awaitable[None]],
        read_coming: Callable[[], bool] = lambda: False,
    ) -> None:
        self._flush = flush
        # True when a read will go out later in this loop turn (and may take the queue).
        self._read_coming = read_coming
        self._busy = False
        self._ids: list[str] = []
        self._waiters: Waiters = []
        self._task: asyncio.Task[None] | None = None

    async def ack(self, ids: list[str]) -> None:
        """Return once ``ids`` are acknowledged (raise what the flush raised)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ids.extend(ids)
        self._waiters.append(waiter)
        if self._busy:
            await waiter
            return
        self._busy = True
        try:
            await asyncio.sleep(0)  # a read sent in this turn may take the queue (take())
            if self._waiters and self._read_coming():
                await asyncio.sleep(0)  # one more turn: that read's sender runs after us
            if self._waiters:
                # Nobody took them: send them from here (no extra task on the common path).
                await self._send(*self.take())
        finally:
            self._hand_over()
        await waiter

    def take(self) -> tuple[list[str], Waiters]:
        """Every queued ack, for a caller that sends them itself and then calls ``done``."""
        taken = self._ids, self._waiters
        self._ids, self._waiters = [], []
        return taken

    def done(self, waiters: Waiters, error: BaseException | None = None) -> None:
        """The acks handed out by ``take`` went out (or failed with ``error``)."""
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    def give_back(self, ids: list[str], waiters: Waiters) -> None:
        """Acks handed out by ``take`` whose sender was cancelled: queue them again."""
        self._ids.extend(ids)
        self._waiters.extend(waiters)
        if not self._busy:
            self._busy = True
            self._hand_over()

    async def settle(self, timeout_s: float) -> None:
        """Wait (up to timeout_s) for acks already queued to go out."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)

    def _hand_over(self) -> None:
        """Leave what is still queued to a task (it clears _busy when drained)."""
        if self._waiters:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _send(self, ids: list[str], waiters: Waiters) -> None:
        try:
            await self._flush(ids)
        except Exception as exc:
            self.done(waiters, exc)
        except BaseException:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
            raise
        else:
            self.done(waiters)

    async def _drain(self) -> None:
        """Flush queued acks, all of them per round trip, until none are left."""
        try:
            while self._waiters:
                await self._send(*self.take())
        finally:
            # No await between the emptiness check and this: an ack() arriving now leads.
            self._busy = False
