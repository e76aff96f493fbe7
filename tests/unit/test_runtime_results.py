"""InvokeResult helpers and request ids (poller.runtime.pool), without processes."""

from __future__ import annotations

import uuid

from poller.runtime.results import InvokeResult, Outcome, new_request_id, throttled_result


def test_request_ids_are_unique_uuid4_text() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:3] + ids[-3:]:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 4


def test_error_of_an_ok_result_is_none_and_of_garbage_is_readable() -> None:
    assert InvokeResult(Outcome.OK, b"{}", "r").error is None
    garbage = InvokeResult(Outcome.CRASHED, b"not json", "r")
    assert garbage.error == {"errorMessage": "not json", "errorType": "Unknown"}
    assert garbage.error_type == "Unknown"


def test_log_tail_keeps_the_last_bytes_on_a_character_boundary() -> None:
    result = InvokeResult(Outcome.OK, b"{}", "r", log_lines=["é" * 3000, "last"])
    tail = result.log_tail()
    assert len(tail.encode()) <= 4096
    assert tail.endswith("last\n")
    assert InvokeResult(Outcome.OK, b"{}", "r").log_tail() == ""


def test_throttled_result_shape() -> None:
    result = throttled_result("fn", "req", "ReservedFunctionConcurrentInvocationLimitExceeded")
    assert result.outcome is Outcome.THROTTLED
    assert result.error_type == "TooManyRequestsException"
    assert result.error is not None and "fn" in result.error["errorMessage"]
