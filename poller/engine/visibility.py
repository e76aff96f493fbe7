"""The visibility heartbeat of queue mappings: a batch's messages stay hidden from their first
receive until the batch is settled, however long the batching window and the invoke take."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from poller.sources.base import Message, SourceError

if TYPE_CHECKING:
    from poller.engine.queue import QueueRunner


class Heartbeat:
    """Keeps a batch's messages hidden from the first receive until the invoke ends.

    Visibility runs from each message's receive, and a batch may gather for a whole batching
    window before its invoke even starts; if the window plus the function timeout can outlast
    the visibility timeout, the messages would reappear and run twice. Lambda asks users to
    size the queue for that; we extend visibility instead (ChangeMessageVisibility).
    """

    __slots__ = ("_messages", "_received_at", "_runner", "_task")

    def __init__(self, runner: QueueRunner) -> None:
        self._runner = runner
        self._messages: list[Message] = []
        self._received_at = math.inf  # monotonic time of the oldest receive covered
        self._task: asyncio.Task[None] | None = None

    def cover(
        self, messages: list[Message], invoke_starts_by: float, received_at: float = math.inf
    ) -> None:
        """Watch ``messages`` (a live list) if they could expire before the invoke ends.

        ``received_at``: when the messages added since the last call were received (their
        visibility clock started then); the default means none were added.
        """
        self._messages = messages
        if received_at < self._received_at:
            self._received_at = received_at
        if self._task is not None:
            return
        runner = self._runner
        visibility = runner.source.visibility_timeout_s
        # Half the timeout (at most 5 s) of slack: a busy event loop may wake the beat late.
        margin = min(5.0, visibility / 2)
        expires = self._received_at + visibility
        # An invoke cannot outlive the function timeout, so most batches need no heartbeat.
        latest_end = max(invoke_starts_by, time.monotonic()) + runner.pool.config.timeout_s
        if latest_end + margin < expires:
            return
        self._task = asyncio.get_running_loop().create_task(self._beat(expires, visibility, margin))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self, expires: float, visibility: float, margin: float) -> None:
        runner = self._runner
        while True:
            await asyncio.sleep(max(expires - margin - time.monotonic(), 0))
            try:
                await runner.source.change_visibility(list(self._messages), visibility)
            except SourceError as exc:
                runner.health.failed("change_visibility", exc)
                await asyncio.sleep(min(margin / 2, 1.0))
                continue
            expires = time.monotonic() + visibility
            runner.log.debug(
                "visibility extended",
                **runner.fields,
                messages=len(self._messages),
                visibility_timeout_s=visibility,
            )
