"""The platform records (Lambda's START/END/REPORT) are pre-encoded for speed; they must match
what encoding the records as dicts through JsonLog.emit writes, field for field and in the same
order, with Lambda's JSON log names and an ISO-8601 UTC timestamp."""

from __future__ import annotations

import io
import json
import re

import msgspec
import pytest

from poller.config import FunctionConfig
from poller.logs import JsonLog
from poller.runtime.platform import PlatformLines
from poller.runtime.results import InvokeResult, Outcome

_encode = msgspec.json.Encoder().encode


def _emitted(records: list[dict]) -> bytes:
    stream = io.BytesIO()
    log = JsonLog(stream)
    for record in records:
        log.emit(record)
    return stream.getvalue()


def _lines(data: bytes) -> list[tuple[list[str], dict]]:
    """(key order, record without its timestamp) per line."""
    out = []
    for line in data.splitlines():
        record = json.loads(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record.pop("timestamp"))
        out.append((list(json.loads(line)), record))
    return out


def test_start_line_matches_the_record() -> None:
    cfg = FunctionConfig(name="fn-1", handler="h.handler")
    line = PlatformLines(cfg).start('odd "id"')
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert _lines(line) == _lines(
        _emitted(
            [
                {
                    "timestamp": "2026-01-01T00:00:00.000Z",
                    "level": "INFO",
                    "function": "fn-1",
                    "requestId": 'odd "id"',
                    "type": "platform.start",
                    "version": "$LATEST",
                }
            ]
        )
    )


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
    result = InvokeResult(
        outcome, payload, "rid-1", duration_ms=12.3456789, init_ms=init_ms, max_memory_mb=42
    )
    data = PlatformLines(cfg).end_and_report(result, 13)
    status = {
        Outcome.OK: "success",
        Outcome.FUNCTION_ERROR: "error",
        Outcome.TIMEOUT: "timeout",
        Outcome.CRASHED: "failure",
    }[outcome]
    metrics = {
        "durationMs": 12.346,
        "billedDurationMs": 13,
        "memorySizeMB": 256,
        "maxMemoryUsedMB": 42,
    }
    if init_ms is not None:
        metrics["initDurationMs"] = round(init_ms, 3)
    report = {
        "timestamp": "2026-01-01T00:00:00.000Z",
        "level": "INFO",
        "function": "fn",
        "requestId": "rid-1",
        "type": "platform.report",
        "status": status,
        "metrics": metrics,
    }
    if outcome is not Outcome.OK:
        report["errorType"] = result.error_type
    expected = _emitted(
        [
            {
                "timestamp": "2026-01-01T00:00:00.000Z",
                "level": "INFO",
                "function": "fn",
                "requestId": "rid-1",
                "type": "platform.runtimeDone",
                "status": status,
            },
            report,
        ]
    )
    assert _lines(data) == _lines(expected)
