"""Whether a mapping's source answers, as its runner sees it.

Both runners (queue and stream) go through this: an outage is logged once when it starts and
once when it ends (never once per retry), failed calls are counted per operation,
``poller_source_connected`` follows the outage, retries back off exponentially with jitter,
and the mapping's status line (``LastProcessingResult``) is reported when it changes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Final

from poller.logs import JsonLog
from poller.metrics import MappingMetrics
from poller.sources.base import SourceError

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class SourceHealth:
    def __init__(
        self,
        log: JsonLog,
        metrics: MappingMetrics,
        fields: dict[str, Any],
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.log = log
        self.metrics = metrics
        self.fields = fields
        self._on_status = on_status
        self.status = ""
        self.outage_since: float | None = None
        self.last_error: str | None = None
        self._connected = False  # as of the last call to the source
        self._backoff = BACKOFF_MIN_S

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def failed(self, operation: str, exc: SourceError) -> None:
        self._connected = False
        self.last_error = str(exc)
        self.metrics.source_error(operation).inc()
        self.metrics.source_connected.set(0)
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            self.log.error(
                f"event source unavailable: {exc}",
                **self.fields,
                operation=operation,
                retryable=exc.retryable,
            )
        # The status follows the latest cause (a dropped connection, then refused credentials
        # on reconnect), while the log keeps to one line per outage.
        self.set_status(f"PROBLEM: {exc}")

    def ok(self) -> None:
        """The source answered. Cheap when nothing changed: called after every call."""
        if self._connected:
            return
        self._connected = True
        self._backoff = BACKOFF_MIN_S
        if self.outage_since is not None:
            self.log.info(
                "event source reachable again",
                **self.fields,
                outage_s=round(time.monotonic() - self.outage_since, 3),
            )
            self.outage_since = None
        self.metrics.source_connected.set(1)

    def next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        return delay * random.uniform(0.8, 1.2)

    async def backoff(self) -> None:
        await asyncio.sleep(self.next_backoff())

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.metrics.problem.set(1 if status.startswith("PROBLEM") else 0)
            if self._on_status is not None:
                self._on_status(status)
