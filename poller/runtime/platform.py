"""The platform records of every invoke (Lambda's START, END and REPORT), as JSON lines with
the names of Lambda's JSON log format, plus Lambda's text lines for ``--log-type Tail``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import msgspec
from prometheus_client import Counter, Histogram

from poller import metrics
from poller.config import FunctionConfig
from poller.logs import timestamp
from poller.runtime.results import RUNTIME_FAILURES, InvokeResult, Outcome

if TYPE_CHECKING:
    from poller.runtime.pool import FunctionPool

_encode = msgspec.json.Encoder().encode

# Lambda's status of an invoke in platform.runtimeDone / platform.report.
STATUS: Final = {
    Outcome.OK: "success",
    Outcome.FUNCTION_ERROR: "error",
    Outcome.TIMEOUT: "timeout",
    Outcome.OUT_OF_MEMORY: "failure",
    Outcome.CRASHED: "failure",
    Outcome.INIT_ERROR: "failure",
    Outcome.THROTTLED: "failure",
    Outcome.INVALID_REQUEST: "failure",
}


class PlatformLines:
    """The platform records of one function's invokes.

    Written for every invoke, so the parts that never change (the level, the function name,
    the types, the memory size) are encoded once here, and each invoke formats one string per
    record instead of building and encoding a dict. Each record is what ``JsonLog.emit`` would
    write for the equivalent dict (floats as ``repr``, which is what msgspec writes).
    """

    __slots__ = ("_head", "_memory")

    def __init__(self, cfg: FunctionConfig) -> None:
        # Between the timestamp and the request id of every record.
        self._head = ',"level":"INFO","function":' + _encode(cfg.name).decode() + ',"requestId":'
        # Between REPORT's billed duration and its max memory used.
        self._memory = f',"memorySizeMB":{cfg.memory_mb},"maxMemoryUsedMB":'

    def start(self, request_id: str) -> bytes:
        return (
            f'{{"timestamp":"{timestamp()}"{self._head}{_encode(request_id).decode()},'
            '"type":"platform.start","version":"$LATEST"}\n'
        ).encode()

    def end_and_report(self, result: InvokeResult, billed_ms: int) -> bytes:
        head = (
            f'{{"timestamp":"{timestamp()}"{self._head}{_encode(result.request_id).decode()},'
            '"type":'
        )
        status = STATUS[result.outcome]
        line = (
            f'{head}"platform.runtimeDone","status":"{status}"}}\n'
            f'{head}"platform.report","status":"{status}","metrics":{{'
            f'"durationMs":{round(result.duration_ms, 3)!r},"billedDurationMs":{billed_ms}'
            f"{self._memory}{result.max_memory_mb}"
        )
        if result.init_ms is not None:
            line += f',"initDurationMs":{round(result.init_ms, 3)!r}'
        line += "}"
        if result.outcome is not Outcome.OK:
            line += ',"errorType":' + _encode(result.error_type).decode()
        return (line + "}\n").encode()


def report(pool: FunctionPool, result: InvokeResult, capture: list[str] | None) -> None:
    """END and REPORT for one invoke: JSON records, Lambda's text lines when captured, and the
    cold-start metrics."""
    cfg = pool.config
    billed = max(math.ceil(result.duration_ms), 1)
    pool.runtime.log.write(pool.platform_lines.end_and_report(result, billed))
    if result.init_ms is not None:
        pool.cold_starts.inc()
        pool.init_duration.observe(result.init_ms / 1000)
    if capture is not None:
        capture.append(f"END RequestId: {result.request_id}")
        line = (
            f"REPORT RequestId: {result.request_id}\tDuration: {result.duration_ms:.2f} ms\t"
            f"Billed Duration: {billed} ms\tMemory Size: {cfg.memory_mb} MB\t"
            f"Max Memory Used: {result.max_memory_mb} MB"
        )
        if result.init_ms is not None:
            line += f"\tInit Duration: {result.init_ms:.2f} ms"
        if result.outcome is Outcome.TIMEOUT:
            line += "\tStatus: timeout"
        elif result.outcome in RUNTIME_FAILURES:
            line += f"\tStatus: error\tError Type: {result.error_type}"
        capture.append(line)


def function_metrics(name: str) -> tuple[Counter, Histogram]:
    """The cold-start counter and Init Duration histogram of one function."""
    return metrics.cold_starts.labels(name), metrics.init_duration.labels(name)
