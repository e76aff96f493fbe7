"""The runtime with real worker processes: every invoke outcome, init errors, the environment a
handler sees, warm reuse, and the START/END/REPORT logs.

Handlers live in tests/fixtures/handlers (rt_*.py). Pools and caps are in test_runtime_pool.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from poller.config import FunctionConfig
from poller.logs import JsonLog
from poller.runtime import pool as pool_module
from poller.runtime import worker
from poller.runtime.pool import Runtime
from poller.runtime.results import Outcome

HANDLERS = Path(__file__).resolve().parents[1] / "fixtures" / "handlers"
REQUEST_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def fn(handler: str, name: str = "f", **kwargs: Any) -> FunctionConfig:
    """A function whose handler is in tests/fixtures/handlers (``rt_handlers.X`` for short X)."""
    if "." not in handler and "/" not in handler:
        handler = f"rt_handlers.{handler}"
    kwargs.setdefault("code_path", str(HANDLERS))
    kwargs.setdefault("timeout_s", 5.0)
    return FunctionConfig(name=name, handler=handler, **kwargs)


class Logs:
    """The JSON lines a Runtime logged, parsed."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.log = JsonLog(self.stream)

    def records(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def for_request(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("requestId") == request_id]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("type") == kind]


@contextlib.asynccontextmanager
async def make_runtime(
    *functions: FunctionConfig, start: bool = False, **kwargs: Any
) -> AsyncIterator[tuple[Runtime, Logs]]:
    logs = Logs()
    kwargs.setdefault("memory_budget_mb", 4096)
    runtime = Runtime(functions, log=logs.log, **kwargs)
    try:
        if start:
            await runtime.start()
        yield runtime, logs
    finally:
        await runtime.close()


def event(value: Any) -> bytes:
    return json.dumps(value).encode()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def wait_dead(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return not alive(pid)


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


def env_pids(runtime: Runtime, name: str = "f") -> list[int]:
    return [env.proc.pid for env in runtime.pool(name).envs if env.proc is not None]


def child_pid_from(lines: list[str] | None) -> int:
    assert lines is not None
    for line in lines:
        if line.startswith("child-pid "):
            return int(line.split()[1])
    raise AssertionError(f"no child-pid line in {lines}")


@contextlib.contextmanager
def reaped(pid_getter: Any) -> Any:
    """Make sure a stray `sleep 60` never outlives a failing test."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            pid = pid_getter()
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- OK, warm reuse, context --------------------------------------------------------------------


async def test_ok_result_is_the_handlers_json_and_the_environment_stays_warm() -> None:
    async with make_runtime(fn("count")) as (runtime, _):
        results = [await runtime.invoke("f", b"{}") for _ in range(3)]
    assert [r.outcome for r in results] == [Outcome.OK] * 3
    bodies = [json.loads(r.payload) for r in results]
    # One environment: its module-level counter keeps counting, in the same process.
    assert [b["count"] for b in bodies] == [1, 2, 3]
    assert len({b["pid"] for b in bodies}) == 1
    assert results[0].init_ms is not None and results[0].init_ms > 0
    assert results[1].init_ms is None and results[2].init_ms is None
    assert all(REQUEST_ID.match(r.request_id) for r in results)
    assert len({r.request_id for r in results}) == 3


async def test_event_reaches_the_handler_unchanged() -> None:
    payload = {"Records": [{"body": "héllo \u2603", "n": 1.5, "big": 2**70}], "none": None}
    async with make_runtime(fn("echo")) as (runtime, _):
        result = await runtime.invoke("f", event(payload), request_id="my-request-1")
    assert result.outcome is Outcome.OK
    assert json.loads(result.payload) == payload
    assert result.request_id == "my-request-1"


async def test_a_worker_switches_to_msgspec_after_megabytes_of_events() -> None:
    records = [{"body": f"record {i} é", "n": i, "f": i / 3} for i in range(20000)]
    big = event({"Records": records})
    before = math.ceil(worker.FAST_DECODE_AFTER_BYTES / len(big))
    async with make_runtime(fn("decoder")) as (runtime, _):
        small = await runtime.invoke("f", event({"a": 1}))
        results = [await runtime.invoke("f", big) for _ in range(before + 1)]
        odd = await runtime.invoke("f", b'{"nan": NaN, "big": 1e400}')
    assert json.loads(small.payload)["fast"] is False
    bodies = [json.loads(r.payload) for r in results]
    # The import comes with the event that crosses the threshold; the stdlib decodes the rest.
    assert [b["fast"] for b in bodies] == [False] * (before - 1) + [True, True]
    assert all(b["count"] == 20000 and b["event"] == records[-3:] for b in bodies)
    # msgspec refuses what only Python's json accepts: the stdlib decodes it, as before.
    assert odd.outcome is Outcome.OK
    decoded = json.loads(odd.payload)["event"]
    assert math.isnan(decoded["nan"]) and decoded["big"] == math.inf


async def test_a_broken_msgspec_in_the_functions_directory_leaves_the_stdlib_decoding(
    tmp_path: Path,
) -> None:
    # The function's directory is first on sys.path, so the switch imports this one.
    (tmp_path / "msgspec.py").write_text("raise RuntimeError('a broken vendored msgspec')\n")
    (tmp_path / "count_records.py").write_text(
        "import sys\n"
        "def handler(event, context):\n"
        "    return {'count': len(event['Records']), 'fast': 'msgspec.json' in sys.modules}\n"
    )
    big = event({"Records": [{"body": f"record {i}"} for i in range(40000)]})
    invokes = math.ceil(worker.FAST_DECODE_AFTER_BYTES / len(big)) + 1
    async with make_runtime(fn("count_records.handler", code_path=str(tmp_path))) as (runtime, _):
        results = [await runtime.invoke("f", big) for _ in range(invokes)]
    assert [r.outcome for r in results] == [Outcome.OK] * invokes
    assert [json.loads(r.payload) for r in results] == [{"count": 40000, "fast": False}] * invokes


async def test_decimal_results_are_json_numbers() -> None:
    async with make_runtime(fn("decimals")) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
    assert result.outcome is Outcome.OK, result.payload
    assert json.loads(result.payload) == {"int": 3, "float": 2.5}


async def test_handler_in_a_dotted_package() -> None:
    async with make_runtime(
        fn("rt_pkg.sub.mod.handler", name="dotted"),
        fn("rt_pkg/sub/mod.handler", name="slashed"),
    ) as (runtime, _):
        dotted = await runtime.invoke("dotted", b"{}")
        slashed = await runtime.invoke("slashed", b"{}")
    assert dotted.outcome is Outcome.OK, dotted.payload
    assert json.loads(dotted.payload) == {"module": "rt_pkg.sub.mod", "helper": "helper"}
    assert slashed.outcome is Outcome.OK, slashed.payload


async def test_context_attributes_and_remaining_time() -> None:
    config = fn("context_info", name="ctx-fn", memory_mb=256, timeout_s=3.0)
    async with make_runtime(config, region="eu-west-1", account="123456789012") as (runtime, _):
        started_ms = time.time() * 1000
        result = await runtime.invoke("ctx-fn", b"{}")
        with_cc = await runtime.invoke(
            "ctx-fn",
            b"{}",
            client_context={
                "client": {"installation_id": "inst-1", "app_title": "My App"},
                "custom": {"k": "v"},
                "env": {"platform": "linux"},
            },
        )
    assert result.outcome is Outcome.OK, result.payload
    info = json.loads(result.payload)
    assert info["aws_request_id"] == result.request_id
    assert info["function_name"] == "ctx-fn"
    assert info["function_version"] == "$LATEST"
    assert info["invoked_function_arn"] == "arn:aws:lambda:eu-west-1:123456789012:function:ctx-fn"
    assert info["memory_limit_in_mb"] == "256"  # a str, as in awslambdaric
    assert info["log_group_name"] == "/aws/lambda/ctx-fn"
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}", info["log_stream_name"])
    assert info["identity"] == [None, None]
    assert info["client_context"] is None
    assert info["tenant_id"] is None
    first, second = info["remaining"]
    elapsed_ms = time.time() * 1000 - started_ms
    # The deadline is the configured timeout from the start of the invoke.
    assert 3000 - elapsed_ms - 50 <= first <= 3000
    assert 150 <= first - second <= 1000  # the handler slept 0.2 s between the two readings
    cc = json.loads(with_cc.payload)["client_context"]
    assert cc == {
        "installation_id": "inst-1",
        "app_title": "My App",
        "custom": {"k": "v"},
        "env": {"platform": "linux"},
    }


async def test_handler_sees_a_bare_argv() -> None:
    async with make_runtime(fn("argv")) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
    assert len(json.loads(result.payload)) == 1


# -- function errors ------------------------------------------------------------------------------


async def test_exception_shape_without_runtime_frames_and_env_stays_warm() -> None:
    async with make_runtime(fn("raises")) as (runtime, logs):
        result = await runtime.invoke("f", event({"message": "bad input"}))
        warm = await runtime.invoke("f", event("warm?"))
        pids = env_pids(runtime)
    assert result.outcome is Outcome.FUNCTION_ERROR
    error = json.loads(result.payload)
    assert list(error) == ["errorMessage", "errorType", "requestId", "stackTrace"]
    assert error["errorMessage"] == "bad input"
    assert error["errorType"] == "ValueError"
    assert error["requestId"] == result.request_id
    trace = error["stackTrace"]
    assert len(trace) == 2, trace  # raises() -> _inner(): the user's frames only
    assert 'rt_handlers.py", line' in trace[0] and "in raises" in trace[0]
    assert "in _inner" in trace[1] and "raise ValueError(message)" in trace[1]
    assert not any("poller/runtime" in frame for frame in trace)
    # The environment survived: same process, no new init.
    assert warm.outcome is Outcome.OK
    assert json.loads(warm.payload)["pid"] == pids[0]
    assert warm.init_ms is None
    # The runtime logs the error the way awslambdaric does.
    records = logs.for_request(result.request_id)
    kinds = [r["type"] for r in records]
    messages = [
        r["message"] for r in records[kinds.index("platform.start") :] if r["type"] == "function"
    ]
    assert messages[:2] == ["[ERROR] ValueError: bad input", "Traceback (most recent call last):"]
    assert any("in _inner" in m for m in messages)
    report = logs.for_request(result.request_id)[-1]
    assert report["type"] == "platform.report" and report["status"] == "error"


async def test_unserializable_result_is_a_marshal_error_and_env_stays_warm() -> None:
    async with make_runtime(fn("unserializable")) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
        warm = await runtime.invoke("f", event("warm?"))
        pids = env_pids(runtime)
    assert result.outcome is Outcome.FUNCTION_ERROR
    error = json.loads(result.payload)
    assert error["errorType"] == "Runtime.MarshalError"
    assert error["errorMessage"].startswith("Unable to marshal response:")
    assert "object is not JSON serializable" in error["errorMessage"]
    assert error["requestId"] == result.request_id
    assert warm.outcome is Outcome.OK and json.loads(warm.payload)["pid"] == pids[0]


async def test_invalid_event_json_is_an_unmarshal_error() -> None:
    async with make_runtime(fn("echo")) as (runtime, _):
        result = await runtime.invoke("f", b"{not json")
        warm = await runtime.invoke("f", b' {"ok": true} ')
    assert result.outcome is Outcome.FUNCTION_ERROR
    assert result.error_type == "Runtime.UnmarshalError"
    assert warm.outcome is Outcome.OK and json.loads(warm.payload) == {"ok": True}


# -- timeouts, memory, crashes --------------------------------------------------------------------


async def test_timeout_kills_the_process_group_and_the_env_is_not_reused() -> None:
    grandchild = 0
    with reaped(lambda: grandchild):
        async with make_runtime(fn("spawn_then", timeout_s=0.5)) as (runtime, logs):
            started = time.monotonic()
            result = await runtime.invoke("f", event({"then": "hang"}), capture_logs=True)
            elapsed = time.monotonic() - started
            grandchild = child_pid_from(result.log_lines)
            assert runtime.environments() == 0
            again = await runtime.invoke("f", event({"then": "exit"}), capture_logs=True)
            grandchild2 = child_pid_from(again.log_lines)
        assert result.outcome is Outcome.TIMEOUT
        error = json.loads(result.payload)
        assert error["errorType"] == "Sandbox.Timedout"
        assert error["errorMessage"] == "Task timed out after 0.50 seconds"
        assert 0.45 <= elapsed < 2.0
        assert 500 <= result.duration_ms < 2000
        # SIGKILL went to the whole process group: the handler's `sleep 60` is gone too.
        assert wait_dead(grandchild), "the handler's child survived the timeout"
        assert wait_dead(grandchild2)
        report = logs.of_type("platform.report")[0]
        assert report["status"] == "timeout"
        # A fresh environment served the next invoke (cold: it reports an init).
        assert again.init_ms is not None


async def test_memory_over_the_limit_is_killed_by_the_monitor() -> None:
    # No runtime.start(): the memory monitor must run anyway (as for `poller invoke`).
    async with make_runtime(fn("allocate", memory_mb=128, timeout_s=20)) as (runtime, logs):
        started = time.monotonic()
        result = await runtime.invoke("f", event({"mb": 300, "hold": 15}))
        elapsed = time.monotonic() - started
        assert runtime.environments() == 0
        after = await runtime.invoke("f", event({"mb": 1}))
    assert result.outcome is Outcome.OUT_OF_MEMORY
    error = json.loads(result.payload)
    assert error["errorType"] == "Runtime.OutOfMemory"
    assert error["requestId"] == result.request_id
    assert elapsed < 10, "the monitor did not kill it: it ran into its hold time"
    assert result.max_memory_mb > 128
    assert after.outcome is Outcome.OK and after.init_ms is not None
    report = logs.for_request(result.request_id)[-1]
    assert report["status"] == "failure" and report["metrics"]["maxMemoryUsedMB"] > 128


async def test_fast_memory_spike_is_caught_by_the_high_water_mark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the monitor asleep, only the worker's peak RSS can tell.
    monkeypatch.setattr(pool_module, "MONITOR_INTERVAL_S", 3600.0)
    async with make_runtime(fn("allocate", memory_mb=128)) as (runtime, _):
        result = await runtime.invoke("f", event({"mb": 300}))
        pids_after = env_pids(runtime)
    assert result.outcome is Outcome.OUT_OF_MEMORY
    assert result.error_type == "Runtime.OutOfMemory"
    assert result.max_memory_mb > 128
    assert pids_after == []  # killed, not put back to serve the next invoke


async def test_memory_under_the_limit_is_fine() -> None:
    async with make_runtime(fn("allocate", memory_mb=256)) as (runtime, _):
        result = await runtime.invoke("f", event({"mb": 50}))
    assert result.outcome is Outcome.OK, result.payload
    assert 50 < result.max_memory_mb <= 256


async def test_a_big_daemon_does_not_count_against_its_workers_memory() -> None:
    # At exec the kernel hands a child the RSS of the address space it was forked from as its
    # ru_maxrss: a daemon over memory_mb must not make every invoke an out-of-memory kill.
    ballast = b"\x01" * (300 << 20)
    async with make_runtime(fn("allocate", memory_mb=128)) as (runtime, logs):
        small = await runtime.invoke("f", event({"mb": 1}))
        grown = await runtime.invoke("f", event({"mb": 60}))
    assert len(ballast) == 300 << 20
    del ballast
    assert small.outcome is Outcome.OK, small.payload
    assert small.max_memory_mb < 60
    assert grown.outcome is Outcome.OK, grown.payload
    assert 60 < grown.max_memory_mb <= 128
    assert (
        logs.for_request(small.request_id)[-1]["metrics"]["maxMemoryUsedMB"] == small.max_memory_mb
    )


@pytest.mark.parametrize(
    ("how", "status"),
    [("os._exit", "exit status 3"), ("sigkill", "signal: killed"), ("sys.exit", "exit status 2")],
)
async def test_crash_is_an_exit_error_with_its_status(how: str, status: str) -> None:
    async with make_runtime(fn("exit_with")) as (runtime, logs):
        result = await runtime.invoke("f", event({"how": how}), capture_logs=True)
        assert runtime.environments() == 0
        after = await runtime.invoke("f", event({"how": "return"}))
    assert result.outcome is Outcome.CRASHED
    error = json.loads(result.payload)
    assert error["errorType"] == "Runtime.ExitError"
    assert error["errorMessage"] == (
        f"RequestId: {result.request_id} Error: Runtime exited with error: {status}"
    )
    # What it printed before dying is still its log, before END/REPORT.
    assert result.log_lines is not None
    assert f"about to {how}" in result.log_lines
    kinds = [r["type"] for r in logs.for_request(result.request_id)]
    assert kinds[-2:] == ["platform.runtimeDone", "platform.report"]
    assert after.outcome is Outcome.OK and after.init_ms is not None


async def test_crash_takes_the_handlers_children_with_it() -> None:
    grandchild = 0
    with reaped(lambda: grandchild):
        async with make_runtime(fn("spawn_then")) as (runtime, _):
            result = await runtime.invoke("f", event({"then": "exit"}), capture_logs=True)
            grandchild = child_pid_from(result.log_lines)
        assert result.outcome is Outcome.CRASHED
        assert wait_dead(grandchild), "a background child outlived its crashed environment"


# -- init errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        (
            "rt_no_such_module.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'rt_no_such_module': No module named 'rt_no_such_module'",
        ),
        (
            "rt_import_missing_dependency.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'rt_import_missing_dependency': "
            "No module named 'rt_this_dependency_is_not_installed'",
        ),
        (
            "rt_handlers.no_such_function",
            "Runtime.HandlerNotFound",
            "Handler 'no_such_function' missing on module 'rt_handlers'",
        ),
        (
            "rt_handlers.NOT_CALLABLE",
            "Runtime.HandlerNotFound",
            "Handler 'NOT_CALLABLE' on module 'rt_handlers' is not callable",
        ),
        (
            "handler_without_module",
            "Runtime.MalformedHandlerName",
            "Bad handler 'handler_without_module': not enough values to unpack (expected 2, got 1)",
        ),
        ("rt_init_raises.handler", "RuntimeError", "cannot connect to the database at import"),
    ],
)
async def test_init_errors(handler: str, error_type: str, message: str) -> None:
    config = FunctionConfig(name="f", handler=handler, code_path=str(HANDLERS))
    async with make_runtime(config) as (runtime, logs):
        result = await runtime.invoke("f", b"{}", capture_logs=True)
        assert runtime.environments() == 0
        assert runtime.memory_used_mb == 0
    assert result.outcome is Outcome.INIT_ERROR
    error = json.loads(result.payload)
    assert error["errorType"] == error_type
    assert error["errorMessage"] == message
    assert isinstance(error["stackTrace"], list)
    assert result.request_id
    # The failed invoke still has its START/END/REPORT, and the error is in its log.
    kinds = [r.get("type") for r in logs.for_request(result.request_id)]
    assert kinds[-3:] == ["platform.start", "platform.runtimeDone", "platform.report"]
    report = logs.for_request(result.request_id)[-1]
    assert report["status"] == "failure" and report["errorType"] == error_type
    assert "initDurationMs" in report["metrics"]
    assert result.log_lines is not None
    assert f"[ERROR] {error_type}: {message}" in result.log_lines
    assert result.log_lines[-1].endswith(f"Status: error\tError Type: {error_type}")


async def test_module_level_exception_trace_is_the_users() -> None:
    async with make_runtime(fn("rt_init_raises.handler")) as (runtime, _):
        result = await runtime.invoke("f", b"{}", capture_logs=True)
    trace = json.loads(result.payload)["stackTrace"]
    assert trace and "rt_init_raises.py" in trace[0]
    assert not any("poller/runtime" in frame or "importlib" in frame for frame in trace)
    # Its module-level print came before the error.
    assert result.log_lines is not None
    assert result.log_lines[0] == "rt_init_raises: starting init"


async def test_syntax_error_in_the_handler_module(tmp_path: Path) -> None:
    (tmp_path / "rt_broken_syntax.py").write_text("def handler(event, context)\n    return 1\n")
    config = fn("rt_broken_syntax.handler", code_path=str(tmp_path))
    async with make_runtime(config) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
    assert result.outcome is Outcome.INIT_ERROR
    error = json.loads(result.payload)
    assert error["errorType"] == "Runtime.UserCodeSyntaxError"
    assert error["errorMessage"].startswith("Syntax error in module 'rt_broken_syntax':")
    assert "rt_broken_syntax.py" in error["stackTrace"][0]


async def test_init_timeout() -> None:
    config = fn("rt_slow_init.handler", init_timeout_s=0.5)
    async with make_runtime(config) as (runtime, _):
        started = time.monotonic()
        result = await runtime.invoke("f", b"{}")
        assert time.monotonic() - started < 3
        assert runtime.environments() == 0
    assert result.outcome is Outcome.INIT_ERROR
    assert result.error_type == "Sandbox.Timedout"
    assert "Init timed out after 0.50 seconds" in json.loads(result.payload)["errorMessage"]


async def test_memory_over_the_limit_during_init() -> None:
    async with make_runtime(fn("rt_init_memory.handler", memory_mb=128)) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
        assert runtime.environments() == 0 and runtime.memory_used_mb == 0
    assert result.outcome is Outcome.INIT_ERROR
    assert result.error_type == "Runtime.OutOfMemory"
    async with make_runtime(fn("rt_init_memory.handler", memory_mb=512)) as (runtime, _):
        assert (await runtime.invoke("f", b"{}")).outcome is Outcome.OK


async def test_unstartable_worker_gives_its_memory_back(tmp_path: Path) -> None:
    config = fn("noop", code_path=str(tmp_path / "does-not-exist"))
    async with make_runtime(config, memory_budget_mb=256) as (runtime, _):
        for _ in range(3):  # a leak of 128 MB per failure would throttle the third
            result = await runtime.invoke("f", b"{}")
            assert result.outcome is Outcome.INIT_ERROR
            assert result.error_type == "Runtime.StartError"
        assert runtime.memory_used_mb == 0
        assert runtime.environments() == 0


async def test_unspawnable_environment_is_a_start_error() -> None:
    config = fn("noop", environment={"BAD": "nul\x00byte"})
    async with make_runtime(config) as (runtime, _):
        result = await runtime.invoke("f", b"{}")
        assert result.outcome is Outcome.INIT_ERROR
        assert result.error_type == "Runtime.StartError"
        assert runtime.memory_used_mb == 0 and runtime.environments() == 0


# -- the environment a handler sees --------------------------------------------------------------


async def test_environment_is_declared_inherited_and_reserved_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POLLER_TEST_SECRET", "daemon-only")
    monkeypatch.setenv("POLLER_TEST_SHARED", "passed-through")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "daemon-credentials")
    config = fn(
        "environment",
        name="env-fn",
        memory_mb=256,
        environment={"GREETING": "hello", "POLLER_TEST_SECRET": "declared wins"},
        inherit_environment=["POLLER_TEST_SHARED", "POLLER_TEST_NOT_SET"],
    )
    async with make_runtime(config) as (runtime, _):
        result = await runtime.invoke("env-fn", b"{}")
    assert result.outcome is Outcome.OK, result.payload
    env = json.loads(result.payload)
    assert env["GREETING"] == "hello"
    assert env["POLLER_TEST_SHARED"] == "passed-through"
    assert env["POLLER_TEST_SECRET"] == "declared wins"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "POLLER_TEST_NOT_SET" not in env
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "env-fn"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/env-fn"
    assert "[$LATEST]" in env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert env["_HANDLER"] == "rt_handlers.environment"
    assert env["LAMBDA_TASK_ROOT"] == str(HANDLERS)
    assert env["TZ"] == ":UTC"
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["TMPDIR"]
    reserved = {
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "TZ",
        "PATH",
        "TMPDIR",
    }
    # Nothing else: no daemon variable, none of the runtime's plumbing. (CPython itself may add
    # LC_CTYPE when it coerces the C locale to UTF-8.)
    extra = set(env) - reserved - {"GREETING", "POLLER_TEST_SHARED", "POLLER_TEST_SECRET"}
    assert extra <= {"LC_CTYPE"}, extra


async def test_tz_and_path_may_be_overridden_as_in_lambda() -> None:
    config = fn(
        "environment",
        name="tz-fn",
        environment={"TZ": "Europe/Paris", "PATH": "/opt/bin:/usr/bin:/bin"},
    )
    async with make_runtime(config) as (runtime, _):
        result = await runtime.invoke("tz-fn", b"{}")
    env = json.loads(result.payload)
    assert (env["TZ"], env["PATH"]) == ("Europe/Paris", "/opt/bin:/usr/bin:/bin")


async def test_tmpdir_is_private_and_removed_when_the_env_dies() -> None:
    async with make_runtime(fn("tmpdir", reserved_concurrency=2)) as (runtime, _):
        pool = runtime.pool("f")
        first, second = pool.try_acquire(), pool.try_acquire()
        assert first is not None and second is not None
        one = json.loads((await first.invoke(b"{}")).payload)
        two = json.loads((await second.invoke(b"{}")).payload)
        assert one["pid"] != two["pid"]
        assert one["tmpdir"] != two["tmpdir"]
        for info in (one, two):
            assert is_dir(info["tmpdir"])
            assert os.path.dirname(info["file"]) == info["tmpdir"]
            assert os.path.basename(info["tmpdir"]).startswith("poller-f-")
        # Kill one environment: its TMPDIR goes with it, the other's stays.
        victim = next(env for env in pool.envs if env.proc and env.proc.pid == one["pid"])
        victim.kill("test")
        await victim._gone()
        assert not is_dir(one["tmpdir"])
        assert is_dir(two["tmpdir"])
    # Shutdown removes the rest.
    assert not is_dir(two["tmpdir"])


# -- logs ----------------------------------------------------------------------------------------


async def test_log_lines_start_output_end_report_with_request_ids() -> None:
    async with make_runtime(fn("logs", name="logger", memory_mb=192)) as (runtime, logs):
        cold = await runtime.invoke("logger", b"{}", capture_logs=True)
        warm = await runtime.invoke("logger", b"{}", capture_logs=True)
    for result in (cold, warm):
        assert result.outcome is Outcome.OK, result.payload
        records = logs.for_request(result.request_id)
        assert all(r["function"] == "logger" for r in records)
        kinds = [r["type"] for r in records]
        messages = [r["message"] for r in records if r["type"] == "function"]
        # Handler output sits between START and END, in order; the unterminated last line too.
        expected_output = ["line one", "line two", "via context.log", "no newline at the end"]
        if result is cold:
            # Module-level output belongs to the invoke that caused the cold start, before START.
            assert kinds == [
                "function",
                "platform.start",
                "function",
                "function",
                "function",
                "function",
                "platform.runtimeDone",
                "platform.report",
            ]
            assert messages == ["rt_handlers: module imported", *expected_output]
        else:
            assert kinds == [
                "platform.start",
                "function",
                "function",
                "function",
                "function",
                "platform.runtimeDone",
                "platform.report",
            ]
            assert messages == expected_output
        report = records[-1]
        assert report["metrics"]["durationMs"] == pytest.approx(result.duration_ms, abs=0.01)
        assert report["metrics"]["billedDurationMs"] == max(math.ceil(result.duration_ms), 1)
        assert report["metrics"]["memorySizeMB"] == 192
        assert 5 < report["metrics"]["maxMemoryUsedMB"] <= 192
        assert report["status"] == "success"
    cold_report = logs.for_request(cold.request_id)[-1]
    warm_report = logs.for_request(warm.request_id)[-1]
    assert cold_report["metrics"]["initDurationMs"] == pytest.approx(cold.init_ms, abs=0.01)
    assert "initDurationMs" not in warm_report["metrics"]
    # The text form (for --log-type Tail) follows Lambda's lines.
    assert cold.log_lines is not None and warm.log_lines is not None
    assert cold.log_lines[0] == "rt_handlers: module imported"
    assert cold.log_lines[1] == f"START RequestId: {cold.request_id} Version: $LATEST"
    assert cold.log_lines[-2] == f"END RequestId: {cold.request_id}"
    assert re.fullmatch(
        rf"REPORT RequestId: {cold.request_id}\tDuration: \d+\.\d\d ms\t"
        r"Billed Duration: \d+ ms\tMemory Size: 192 MB\tMax Memory Used: \d+ MB\t"
        r"Init Duration: \d+\.\d\d ms",
        cold.log_lines[-1],
    )
    assert "Init Duration" not in warm.log_lines[-1]
    assert warm.log_lines[1:5] == expected_output


async def test_log_tail_is_the_last_4_kb() -> None:
    async with make_runtime(fn("chatty")) as (runtime, _):
        result = await runtime.invoke("f", event({"lines": 500}), capture_logs=True)
    tail = result.log_tail()
    assert len(tail.encode()) <= 4096
    assert tail.endswith("\n") and tail.rstrip("\n").split("\n")[-1].startswith("REPORT ")
    assert "log line 00499" in tail and "log line 00000" not in tail


async def test_many_log_lines_all_arrive_before_end() -> None:
    async with make_runtime(fn("chatty")) as (runtime, logs):
        result = await runtime.invoke("f", event({"lines": 5000}))
    records = logs.for_request(result.request_id)
    kinds = [r["type"] for r in records]
    assert kinds.count("function") == 5001  # the module's own line at import, then the handler's
    assert kinds.index("platform.runtimeDone") > max(
        i for i, k in enumerate(kinds) if k == "function"
    )


# -- handlers that misbehave (what a user's code can get wrong) --------------------------------


async def test_runaway_recursion_is_a_function_error_and_the_env_stays_warm() -> None:
    async with make_runtime(fn("recurse")) as (runtime, _):
        result = await runtime.invoke("f", event({}))
        assert result.outcome is Outcome.FUNCTION_ERROR
        assert result.error is not None and result.error["errorType"] == "RecursionError"
        warm = await runtime.invoke("f", event("warm?"))
        assert warm.outcome is Outcome.OK and warm.init_ms is None


async def test_a_child_left_running_does_not_outlive_its_environment() -> None:
    child = 0
    with reaped(lambda: child):
        async with make_runtime(fn("fork_and_return")) as (runtime, _):
            first = await runtime.invoke("f", event({}), capture_logs=True)
            child = child_pid_from(first.log_lines)
            assert first.outcome is Outcome.OK
            # The environment stays warm and usable while the child runs (Lambda's too).
            second = await runtime.invoke("f", event({}), capture_logs=True)
            assert second.outcome is Outcome.OK
            assert json.loads(second.payload)["pid"] == json.loads(first.payload)["pid"]
            assert alive(child)
            second_child = child_pid_from(second.log_lines)
        # Closing the runtime (or reaping the environment) takes the children with it.
        assert wait_dead(child) and wait_dead(second_child)


async def test_a_handler_that_closes_its_stdout_leaves_the_worker_working() -> None:
    async with make_runtime(fn("close_stdout")) as (runtime, logs):
        closed = await runtime.invoke("f", event({}))
        assert closed.outcome is Outcome.OK, closed.payload
        warm = await runtime.invoke("f", event("warm?"))
        assert warm.outcome is Outcome.OK
        assert json.loads(warm.payload)["pid"] == json.loads(closed.payload)["pid"]
        kinds = [r["type"] for r in logs.for_request(warm.request_id)]
        assert kinds[-2:] == ["platform.runtimeDone", "platform.report"]


async def test_megabytes_of_output_all_arrive_and_the_invoke_completes() -> None:
    async with make_runtime(fn("shout", timeout_s=30)) as (runtime, logs):
        result = await runtime.invoke("f", event({"mb": 4, "line_kb": 512}))
        assert result.outcome is Outcome.OK
        lines = [
            r
            for r in logs.for_request(result.request_id)
            if r["type"] == "function" and r["message"][:1] in "xy"
        ]
        assert len(lines) == 4 * 1024 + 1
        assert len(lines[-1]["message"]) == 512 * 1024
        assert logs.for_request(result.request_id)[-1]["type"] == "platform.report"
