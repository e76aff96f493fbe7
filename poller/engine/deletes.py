"""Deleting what a queue mapping processed, off the poller's critical path: a delete runs in a
task of its own while the poller goes on to its next batch, and outlives a cancel of the poller
(a shutdown must still acknowledge what succeeded)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from poller.engine.visibility import Heartbeat
from poller.sources.base import Message, SourceError

if TYPE_CHECKING:
    from poller.engine.queue import QueueRunner


class Deletes:
    def __init__(self, runner: QueueRunner) -> None:
        self._runner = runner
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait(self, timeout_s: float) -> None:
        """Wait for the deletes under way (the runner is stopping)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def start(self, messages: list[Message], heartbeat: Heartbeat) -> asyncio.Task[None]:
        # A task of its own: a shutdown that cancels the poller must still acknowledge what
        # succeeded (the runner's stop() waits for them).
        task = asyncio.get_running_loop().create_task(self._delete(messages, heartbeat))
        self._tasks.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug or an unexpected client error (SourceErrors are retried and logged in
            # _delete_with_retries); the messages come back after their visibility timeout.
            self._runner.log.error(
                f"deleting processed messages failed: {task.exception()!r}; they "
                "will be delivered again",
                **self._runner.fields,
            )

    async def _delete(self, messages: list[Message], heartbeat: Heartbeat) -> None:
        try:
            await self._delete_with_retries(messages)
        finally:
            # Visibility is kept up until the messages are gone (or the delete gave up).
            heartbeat.cancel()

    async def _delete_with_retries(self, messages: list[Message]) -> None:
        for attempt in range(3):
            try:
                await self._runner.source.delete(messages)
            except SourceError as exc:
                self._runner.health.failed("delete", exc)
                if attempt == 2:
                    self._runner.log.error(
                        "could not delete processed messages; they will be delivered again",
                        **self._runner.fields,
                        messages=len(messages),
                        error=str(exc),
                    )
                    return
                await self._runner.health.backoff()
            else:
                self._runner.metrics.deleted_count += len(messages)
                return
