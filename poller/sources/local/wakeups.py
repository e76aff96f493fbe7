"""Wake-ups between a local queue's senders and its long-polling receivers in this process."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref

# In-process wake-ups: a send resolves the futures of receivers waiting on that queue, so a
# long poll answers at once instead of at its next table check. Keyed by (database key, queue
# name), so two stores on the same file share them. A future per waiter rather than one shared
# Event: each waiter registers before it looks, so no clear() can swallow a send. Kept per event
# loop (weakly, so a closed loop takes its futures with it); waiters on another loop or thread
# are woken through call_soon_threadsafe.
_QueueKey = tuple[str, str]
_WAITERS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[_QueueKey, set[asyncio.Future[None]]]
] = weakref.WeakKeyDictionary()
_WAITERS_LOCK = threading.Lock()


def register(db: str, queue: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    with _WAITERS_LOCK:
        _WAITERS.setdefault(loop, {}).setdefault((db, queue), set()).add(future)
    return future


def unregister(db: str, queue: str, future: asyncio.Future[None]) -> None:
    with _WAITERS_LOCK:
        per_loop = _WAITERS.get(future.get_loop(), {})
        waiting = per_loop.get((db, queue))
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del per_loop[(db, queue)]
    if not future.done():
        future.cancel()


def notify(db: str, queue: str) -> None:
    with _WAITERS_LOCK:
        targets = [
            (loop, list(per_loop.get((db, queue), ()))) for loop, per_loop in _WAITERS.items()
        ]
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for loop, futures in targets:
        for future in futures:
            if loop is current:
                wake(future)
            else:
                # The other loop may close under us; its receivers are gone with it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(wake, future)


def wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
