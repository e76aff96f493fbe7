"""A mapping's status line: what explains a PROBLEM, and problems that end by themselves."""

from __future__ import annotations

import io

from poller import metrics
from poller.engine.health import (
    FUNCTION_FAILED,
    SourceHealth,
    invoke_failure,
    problem_text,
)
from poller.logs import JsonLog
from poller.runtime.results import InvokeResult, Outcome, error_payload
from poller.sources.base import SourceError


def _health(uuid: str) -> tuple[SourceHealth, list[str], metrics.MappingMetrics]:
    seen: list[str] = []
    m = metrics.MappingMetrics(uuid, "fn")
    return SourceHealth(JsonLog(io.BytesIO()), m, {"mapping": uuid}, seen.append), seen, m


def _problem_gauge(uuid: str) -> float:
    value = metrics.mapping_problem.labels(uuid, "fn")._value.get()
    return float(value)


def test_a_source_outage_is_shown_with_its_error_and_gives_way_when_it_ends() -> None:
    health, seen, _ = _health("m-outage")
    health.set_status("OK")
    health.failed("receive", SourceError("Connection refused"))
    health.failed("receive", SourceError("Connection refused"))
    assert health.status == "PROBLEM: Connection refused"
    assert health.why == "Connection refused"
    assert _problem_gauge("m-outage") == 1
    health.ok()
    assert health.status == "OK" and health.why is None
    assert _problem_gauge("m-outage") == 0
    assert seen == ["OK", "PROBLEM: Connection refused", "OK"]


def test_the_status_follows_the_latest_cause_of_one_outage_logged_once() -> None:
    seen: list[str] = []
    out = io.BytesIO()
    health = SourceHealth(
        JsonLog(out), metrics.MappingMetrics("m-cause", "fn"), {"mapping": "m-cause"}, seen.append
    )
    health.set_status("OK")
    health.failed("receive", SourceError("Connection closed by server"))
    health.failed("receive", SourceError("WRONGPASS"))
    assert health.status == "PROBLEM: WRONGPASS" and health.why == "WRONGPASS"
    health.ok()
    assert seen == ["OK", "PROBLEM: Connection closed by server", "PROBLEM: WRONGPASS", "OK"]
    assert out.getvalue().count(b"event source unavailable") == 1


def test_an_outage_from_the_first_call_gives_way_to_no_records_processed() -> None:
    health, _, _ = _health("m-first")
    health.failed("start", SourceError("Name or service not known"))
    health.ok()
    assert health.status == "No records processed"
    assert _problem_gauge("m-first") == 0


def test_a_newer_status_is_not_overwritten_when_a_held_problem_ends() -> None:
    health, _, _ = _health("m-newer")
    health.set_status("OK")
    health.hold("PROBLEM: on-failure destination x unavailable: down", "down")
    health.set_status(FUNCTION_FAILED, "ValueError: bad record")
    health.release("PROBLEM: on-failure destination x unavailable: down")
    assert health.status == FUNCTION_FAILED and health.why == "ValueError: bad record"


def test_the_status_before_a_held_problem_comes_back_with_its_why() -> None:
    health, _, _ = _health("m-back")
    health.set_status(FUNCTION_FAILED, "Runtime.ImportModuleError: No module named 'x'")
    health.hold("PROBLEM: state store unavailable: locked", "locked")
    health.release("PROBLEM: state store unavailable: locked")
    assert health.status == FUNCTION_FAILED
    assert health.why == "Runtime.ImportModuleError: No module named 'x'"
    assert _problem_gauge("m-back") == 1


def test_a_new_why_is_reported_under_the_same_status_and_ok_clears_it() -> None:
    health, seen, _ = _health("m-why")
    health.set_status(FUNCTION_FAILED, "ValueError: one")
    health.set_status(FUNCTION_FAILED, "ValueError: one")
    health.set_status(FUNCTION_FAILED, "Runtime.ImportModuleError: two")
    health.set_status("OK", "ignored: not a problem")
    assert seen == [FUNCTION_FAILED, FUNCTION_FAILED, "OK"]
    assert health.why is None


def test_invoke_failure_names_the_error_type_and_message() -> None:
    payload = error_payload("Runtime.ImportModuleError", "Unable to import module 'nosuch'", "r1")
    result = InvokeResult(Outcome.INIT_ERROR, payload, "r1")
    assert invoke_failure(result) == "Runtime.ImportModuleError: Unable to import module 'nosuch'"
    long = InvokeResult(Outcome.FUNCTION_ERROR, error_payload("E", "x" * 5000, "r2"), "r2")
    assert len(invoke_failure(long)) == 1000


def test_problem_text_adds_the_why_only_where_the_line_lacks_it() -> None:
    assert problem_text(FUNCTION_FAILED, "E: m") == f"{FUNCTION_FAILED} (E: m)"
    assert problem_text("PROBLEM: refused", "refused") == "PROBLEM: refused"
    assert problem_text("OK", None) == "OK"
