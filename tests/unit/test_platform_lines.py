"""START/END/REPORT lines are pre-encoded for speed; they must match what encoding the records
as dicts through JsonLog.emit writes, field for field and in the same order."""

from __future__ import annotations

import io
import json

import msgspec
import pytest

from poller.config import FunctionConfig
from poller.logs import JsonLog
from poller.runtime.pool import InvokeResult, Outcome, PlatformLines

_encode = msgspec.json.Encoder().encode


def _emitted(records: list[dict]) -> bytes:
    stream = io.BytesIO()
    log = JsonLog(stream)
    for record in records:
        log.emit(record)
    return stream.getvalue()


def _lines(data: bytes) -> list[tuple[list[str], dict]]:
    """(key order, record without its time) per line."""
    out = []
    for line in data.splitlines():
        record = json.loads(line)
        assert isinstance(record.pop("time"), float)
        out.append((list(json.loads(line)), record))
    return out


def test_start_line_matches_the_record() -> None:
    cfg = FunctionConfig(name="fn-1", handler="h.handler")
    line = PlatformLines(cfg).start('odd "id"')
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert _lines(line) == _lines(_emitted([{
        "time": 1.5, "level": "info", "function": "fn-1", "request_id": 'odd "id"',
        "type": "START", "version": "$LATEST",
    }]))


@pytest.mark.parametrize(
    ("outcome", "payload", "init_ms"),
    [
        (Outcome.OK, b"null", None),
        (Outcome.OK, b"null", 123.45678),
        (Outcome.FUNCTION_ERROR, b'{"errorType":"ValueError","errorMessage":"x"}', None),
        (Outcome.TIMEOUT, b'{"errorType":"Sandbox.Timedout","errorMessage":"x"}', 10.0),
        (Outcome.CRASHED, b"not json", None),
    ],
)
def test_end_and_report_lines_match_the_records(
    outcome: Outcome, payload: bytes, init_ms: float | None
) -> None:
    cfg = FunctionConfig(name="fn", handler="h.handler", memory_mb=256)
    result = InvokeResult(outcome, payload, "rid-1", duration_ms=12.3456789, init_ms=init_ms,
                          max_memory_mb=42)
    data = PlatformLines(cfg).end_and_report(result, 13)
    report = {
        "time": 1.5, "level": "info", "function": "fn", "request_id": "rid-1", "type": "REPORT",
        "outcome": outcome.value, "duration_ms": 12.346, "billed_duration_ms": 13,
        "memory_size_mb": 256, "max_memory_used_mb": 42,
    }
    if init_ms is not None:
        report["init_duration_ms"] = round(init_ms, 3)
    if outcome is not Outcome.OK:
        report["error_type"] = result.error_type
    expected = _emitted([
        {"time": 1.5, "level": "info", "function": "fn", "request_id": "rid-1", "type": "END"},
        report,
    ])
    assert _lines(data) == _lines(expected)
