"""Whether a mapping's source answers, as its runner sees it.

Both runners (queue and stream) go through this: an outage is logged once when it starts and
once when it ends (never once per retry), failed calls are counted per operation,
``poller_source_connected`` follows the outage, retries back off exponentially with jitter,
and the mapping's status line (``LastProcessingResult``) and the error that explains a PROBLEM
are reported when they change. A problem that ends by itself (the source, the on-failure
destination or the state store answers again) gives way to the status shown before it, so
``poller_mapping_problem`` does not stay 1 for an outage that is over.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Final

from poller.logs import JsonLog
from poller.mappings import NO_RECORDS_PROCESSED
from poller.metrics import MappingMetrics
from poller.runtime.results import InvokeResult
from poller.sources.base import SourceError

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
FUNCTION_FAILED: Final = "PROBLEM: Function call failed"  # Lambda's words
# An error message is shown whole up to this; past it, cut (a handler may raise with a payload).
MAX_WHY_CHARS: Final = 1000


def is_problem(status: str | None) -> bool:
    return bool(status) and str(status).startswith("PROBLEM")


def problem_text(status: str | None, why: str | None) -> str:
    """The status line with what explains it, unless the line says it already."""
    status = status or ""
    return f"{status} ({why})" if why and why not in status else status


def invoke_failure(result: InvokeResult) -> str:
    """Why an invoke failed, as a person reads it: Lambda's errorType and errorMessage."""
    error = result.error or {}
    kind = error.get("errorType") or result.outcome.value
    message = str(error.get("errorMessage") or "")
    why = f"{kind}: {message}" if message else str(kind)
    return why if len(why) <= MAX_WHY_CHARS else why[: MAX_WHY_CHARS - 3] + "..."


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
        # What explains the status while it is a PROBLEM (an error message), else None.
        self.why: str | None = None
        # The status of a problem that ends by itself, while it is shown, and what it replaced.
        self._held: str | None = None
        self._before: tuple[str, str | None] = ("", None)
        self._outage_status = ""
        self.outage_since: float | None = None
        self._connected = False  # as of the last call to the source
        self._backoff = BACKOFF_MIN_S

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def failed(self, operation: str, exc: SourceError) -> None:
        self._connected = False
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
        self._outage_status = f"PROBLEM: {exc}"
        self.hold(self._outage_status, str(exc))

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
            self.release(self._outage_status)
        self.metrics.source_connected.set(1)

    def next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        return delay * random.uniform(0.8, 1.2)

    async def backoff(self) -> None:
        await asyncio.sleep(self.next_backoff())

    def set_status(self, status: str, why: str | None = None) -> None:
        """Report the mapping's status line; ``why`` explains a PROBLEM (ignored otherwise).

        Cheap when nothing changed: the engine calls it after every batch."""
        if status == self.status and why == self.why:
            return
        problem = is_problem(status)
        if not problem:
            why = None
            if status == self.status and self.why is None:
                return
        if status != self._held:
            self._held = None
        if status != self.status:
            self.metrics.problem.set(1 if problem else 0)
        self.status, self.why = status, why
        if self._on_status is not None:
            self._on_status(status)

    def hold(self, status: str, why: str) -> None:
        """Show a problem that ends by itself (``release`` when it does)."""
        if self._held is None:
            self._before = (self.status, self.why)
        self.set_status(status, why)
        self._held = status

    def release(self, status: str) -> None:
        """The held problem ``status`` is over: show again what was shown before it, unless
        something newer has been reported since."""
        if self._held != status:
            return
        self._held = None
        if self.status == status:
            before, why = self._before
            self.set_status(before or NO_RECORDS_PROCESSED, why)
