"""Execution environments for functions: spawn, reuse, reap, bound, time out, kill.

An environment is one worker process (poller.runtime.worker) started with a fresh interpreter,
never forked from the daemon. The pool hands out *leases*: a lease is one claimed unit of a
function's concurrency, bound to an environment (warm, or one it may start). The engine takes a
lease before it receives a batch, so a batch is never read from a source without somewhere to
run it; ``Runtime.invoke`` without a lease throttles at once when no slot is free.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import errno
import fcntl
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from poller.config import MAX_PAYLOAD_BYTES, FunctionConfig
from poller.logs import JsonLog
from poller.logs import log as default_log
from poller.runtime import protocol

_error_decoder = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
READ_CHUNK = 65536  # a bigger os.read buffer (e.g. 1 MiB) is mmap'd per call: ~10 us each
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
LOG_TAIL_BYTES = 4096
MONITOR_INTERVAL_S = 0.1
MAINTENANCE_INTERVAL_S = 0.5


class Outcome(enum.StrEnum):
    OK = "ok"
    FUNCTION_ERROR = "function_error"  # the handler raised, or returned what cannot be sent
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    CRASHED = "crashed"  # the process exited or was killed mid-invoke
    INIT_ERROR = "init_error"
    THROTTLED = "throttled"  # no slot: nothing ran
    INVALID_REQUEST = "invalid_request"  # rejected before running (request too large)


# Request ids look like Lambda's (UUID v4 text) but cost a counter, not 16 random bytes and a
# UUID object per invoke: a random per-process prefix keeps them unique across daemons.
_ID_PREFIX = "{0[0]}-{0[1]}-4{0[2]}-{1:x}{0[3]}-".format(
    (lambda h: (h[:8], h[8:12], h[12:15], h[15:18]))(uuid.uuid4().hex),
    8 + (os.getpid() & 3),
)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def _now() -> float:
    """time.time() to the microsecond, for log records (round(t, 6) costs ~0.7 us)."""
    return int(time.time() * 1e6) / 1e6


_FIONREAD_BUF = array.array("i", [0])


def _pending_bytes(fd: int) -> int:
    """Bytes waiting in a pipe: one ioctl, cheaper than a read that fails with EAGAIN."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, _FIONREAD_BUF, True)
    except OSError:
        return 1  # let the read find out
    return _FIONREAD_BUF[0]


# Outcomes where the function was not run at all; the engine must not count them as attempts.
NOT_RUN = frozenset({Outcome.THROTTLED, Outcome.INVALID_REQUEST})
# Outcomes where the environment failed (not the handler's own error): REPORT says "Status: error".
RUNTIME_FAILURES = frozenset({Outcome.OUT_OF_MEMORY, Outcome.CRASHED, Outcome.INIT_ERROR})


@dataclass(slots=True)
class InvokeResult:
    outcome: Outcome
    payload: bytes  # the response JSON on OK, otherwise the Lambda error JSON
    request_id: str
    duration_ms: float = 0.0
    init_ms: float | None = None
    max_memory_mb: int = 0
    log_lines: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def error(self) -> dict[str, Any] | None:
        if self.outcome is Outcome.OK:
            return None
        try:
            value = _error_decoder.decode(self.payload)
        except msgspec.DecodeError:
            return {"errorMessage": self.payload.decode(errors="replace"), "errorType": "Unknown"}
        return value if isinstance(value, dict) else {"errorMessage": str(value)}

    @property
    def error_type(self) -> str | None:
        error = self.error
        return None if error is None else str(error.get("errorType", "Unknown"))

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        text = "".join(line + "\n" for line in self.log_lines or ())
        data = text.encode()
        return data[-limit:].decode(errors="ignore")


def _error(error_type: str, message: str, request_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"errorMessage": message, "errorType": error_type}
    if request_id is not None:
        body["requestId"] = request_id
    return _encode(body)


def throttled_result(function: str, request_id: str, reason: str) -> InvokeResult:
    payload = _encode(
        {
            "errorMessage": f"Rate Exceeded: {reason} for function {function}",
            "errorType": "TooManyRequestsException",
            "Reason": reason,
        }
    )
    return InvokeResult(Outcome.THROTTLED, payload, request_id)


class EnvState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


class Environment:
    """One worker process for one function; one invoke at a time."""

    def __init__(self, pool: FunctionPool, provisioned: bool = False) -> None:
        self.pool = pool
        self.config = pool.config
        self.provisioned = provisioned
        self.id = uuid.uuid4().hex
        self.state = EnvState.NEW
        self.last_used = time.monotonic()
        self.invokes = 0
        self.init_ms: float | None = None
        # True while the init was caused by an invoke that has not reported it yet: that invoke
        # (the cold start) reports Init Duration. Provisioned environments never do, as in Lambda.
        self.cold = False
        self.proc: asyncio.subprocess.Process | None = None
        self.tmpdir: str | None = None
        self._loop = asyncio.get_running_loop()
        self._arn = pool.runtime.function_arn(self.config.name)
        self._req_fd = -1
        self._resp_fd = -1
        self._log_fd = -1
        self._frames = protocol.FrameReader()
        self._pending: asyncio.Future[tuple[str, dict[str, Any], bytes]] | None = None
        self._out = bytearray()
        self._log_partial = b""
        self._request_id: str | None = None
        self._capture: list[str] | None = None
        self._death_reason: str | None = None
        self._peak_mb = 0  # resident memory the monitor saw when it killed us
        self._deadline = 0.0  # loop.time() by which the current invoke must answer
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._exited = asyncio.Event()  # set once the process is gone and cleaned up after
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _environ(self) -> dict[str, str]:
        cfg = self.config
        python_dir = os.path.dirname(sys.executable)
        # TZ and PATH are Lambda's defaults that a function may override; the rest may not be
        # (config.py rejects them in environment and inherit_environment).
        env: dict[str, str] = {
            "TZ": ":UTC",
            "PATH": f"{python_dir}:/usr/local/bin:/usr/bin:/bin",
        }
        for name in cfg.inherit_environment:
            if name in os.environ:
                env[name] = os.environ[name]
        env.update(cfg.environment)
        day = time.strftime("%Y/%m/%d", time.gmtime())
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": cfg.name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(cfg.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{cfg.name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"{day}/[$LATEST]{self.id}",
                "_HANDLER": cfg.handler,
                "LAMBDA_TASK_ROOT": cfg.code_path,
                "TMPDIR": self.tmpdir or "/tmp",
                "_POLLER_MAX_RESPONSE_BYTES": str(self.pool.runtime.max_response_bytes),
            }
        )
        return env

    async def start(self) -> InvokeResult | None:
        """Spawn and run the init phase. None when warm; the init error result otherwise.

        On failure the environment is dead, its process gone and its memory given back.
        """
        self.state = EnvState.STARTING
        started = time.perf_counter()
        fds: list[int] = []
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=f"poller-{self.config.name}-")
            for _ in range(3):
                fds.extend(os.pipe())
            req_r, req_w, resp_r, resp_w, log_r, log_w = fds
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "poller.runtime.worker",
                str(req_r),
                str(resp_w),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_w,
                stderr=log_w,
                pass_fds=(req_r, resp_w),
                env=self._environ(),
                cwd=self.config.code_path,
                start_new_session=True,  # its own process group: a kill takes its children too
            )
        except (OSError, ValueError) as exc:  # no such code_path, out of fds, NUL in a variable
            for fd in fds:
                os.close(fd)
            self.kill("spawn failed")
            self._cleanup()
            self._exited.set()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return InvokeResult(
                Outcome.INIT_ERROR,
                _error(
                    "Runtime.StartError",
                    f"cannot start a worker in {self.config.code_path!r}: {reason}",
                ),
                "",
            )
        # The child's ends are its own now.
        for fd in (req_r, resp_w, log_w):
            os.close(fd)
        if self.state is EnvState.DEAD:  # killed (shutdown) while it was being spawned
            self._kill_group()
        self._req_fd, self._resp_fd, self._log_fd = req_w, resp_r, log_r
        for fd in (req_w, resp_r, log_r):
            os.set_blocking(fd, False)
        self._loop.add_reader(resp_r, self._on_response_readable)
        self._loop.add_reader(log_r, self._drain_logs)
        self._watcher = self._loop.create_task(self._watch_exit())

        self._pending = self._loop.create_future()
        handle = self._loop.call_later(self.config.init_timeout_s, self._on_timeout)
        try:
            kind, header, body = await self._pending
        finally:
            handle.cancel()
            self._pending = None
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._drain_logs()
        init_mb = math.ceil(header.get("rss_kb", 0) / 1024) if kind == protocol.READY else 0
        if kind == protocol.READY and self.state is EnvState.STARTING:
            if init_mb <= self.config.memory_mb:
                self.init_ms = elapsed_ms
                self.state = EnvState.IDLE
                return None
            # Its import went over memory_mb (maybe only for a moment): as Lambda, it never runs.
            self._peak_mb = init_mb
            self.kill("memory")
            payload = _error(
                "Runtime.OutOfMemory",
                f"Runtime exited during init: signal: killed (memory used {init_mb} MB > "
                f"memory size {self.config.memory_mb} MB)",
            )
        elif kind == protocol.INIT_ERROR:
            self.kill("init error")
            payload = body
        elif kind == "timeout":
            self.kill("init timeout")
            payload = _error(
                "Sandbox.Timedout",
                f"Init timed out after {self.config.init_timeout_s:.2f} seconds",
            )
        elif self._death_reason == "memory":  # the monitor caught it during init
            payload = _error(
                "Runtime.OutOfMemory",
                f"Runtime exited during init: signal: killed (memory used {self._peak_mb} MB > "
                f"memory size {self.config.memory_mb} MB)",
            )
        else:  # it exited during init, or was killed (shutdown, eviction) before it was ready
            self.kill("exited during init")
            status = await self._exit_status()
            payload = _error("Runtime.ExitError", f"Runtime exited during init: {status}")
        await self._gone()
        self._flush_partial_log()
        return InvokeResult(Outcome.INIT_ERROR, payload, "", init_ms=elapsed_ms)

    def kill(self, reason: str) -> None:
        """SIGKILL the whole process group; a killed environment is never reused."""
        if self.state is not EnvState.DEAD:
            self._death_reason = self._death_reason or reason
            self.state = EnvState.DEAD
        if self.proc is not None and self.proc.returncode is None:
            self._kill_group()
        self.pool._forget(self)  # idempotent: gives its memory back once

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        # Whatever the handler left behind (a background child after a crash, say) goes with it.
        # Safe right after the leader is reaped: its pid stays allocated while its group has
        # members, and a fresh process cannot be that group's leader within this loop turn.
        self._kill_group()
        if self.state is not EnvState.DEAD:
            self.kill("exited")
        # Anything it printed on the way out still belongs to the current request.
        self._drain_logs()
        self._cleanup()
        self._exited.set()
        self._resolve(("exit", {}, b""))

    async def _gone(self) -> None:
        """Wait until a killed process is reaped and its pipes and TMPDIR are removed."""
        if self.proc is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), 5.0)

    async def _exit_status(self) -> str:
        await self._gone()
        code = self.proc.returncode if self.proc is not None else None
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name.removeprefix("SIG").lower()
            except ValueError:
                name = str(-code)
            if name == "kill":
                name = "killed"
            return f"signal: {name}"
        return f"exit status {code}"

    def _cleanup(self) -> None:
        for attr in ("_resp_fd", "_log_fd", "_req_fd"):
            fd = getattr(self, attr)
            if fd < 0:
                continue
            if attr != "_req_fd":
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            setattr(self, attr, -1)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- I/O -----------------------------------------------------------------------------------

    def _resolve(self, value: tuple[str, dict[str, Any], bytes]) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.set_result(value)

    def _on_response_readable(self) -> None:
        try:
            data = os.read(self._resp_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._resp_fd)
            return  # EOF: _watch_exit reports the death with the exit status
        for header, body in self._frames.feed(data):
            self._resolve((header.get("t", ""), header, body))

    def _drain_logs(self) -> None:
        fd = self._log_fd
        if fd < 0:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return  # the common case after an invoke that printed nothing
        except OSError:
            data = b""
        chunks = [self._log_partial] if self._log_partial else []
        while data:
            chunks.append(data)
            if len(data) < READ_CHUNK:
                break
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
        if not data:
            self._loop.remove_reader(fd)
        if not chunks:
            return
        text = b"".join(chunks)
        *lines, self._log_partial = text.split(b"\n")
        for raw in lines:
            self._emit_log_line(raw)

    def _flush_partial_log(self) -> None:
        """An unterminated last line (print(..., end="")) still belongs to this request."""
        if self._log_partial:
            partial, self._log_partial = self._log_partial, b""
            self._emit_log_line(partial)

    def _emit_log_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self.pool.runtime.log.emit(
            {
                "time": _now(),
                "level": "info",
                "function": self.config.name,
                "request_id": self._request_id,
                "type": "log",
                "message": line,
            }
        )
        if self._capture is not None:
            self._capture.append(line)

    def _send(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            written = os.write(self._req_fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            return  # the worker is gone; _watch_exit reports it
        if written < len(data):
            self._out += data[written:]
            self._loop.add_writer(self._req_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.write(self._req_fd, self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            written = len(self._out)  # the worker is gone; _watch_exit reports it
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self._req_fd)

    def _on_timeout(self) -> None:
        self._resolve(("timeout", {}, b""))

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        if self.state is not EnvState.BUSY or self._pending is None:
            return  # armed by an invoke that has finished; the next one arms it again
        if self._loop.time() >= self._deadline:
            self._on_timeout()
        else:  # armed for an earlier invoke: wait for this one's deadline
            self._deadline_timer = self._loop.call_at(self._deadline, self._on_deadline)

    # -- invoke --------------------------------------------------------------------------------

    async def invoke(
        self,
        request_id: str,
        event: bytes,
        client_context: dict[str, Any] | None,
        capture: list[str] | None,
    ) -> InvokeResult:
        cfg = self.config
        self.state = EnvState.BUSY
        self._request_id = request_id
        self._capture = capture
        self.pool.runtime.log.write(self.pool.platform_lines.start(request_id))
        if capture is not None:
            capture.append(f"START RequestId: {request_id} Version: $LATEST")
        init_ms = self.init_ms if self.cold else None
        self.cold = False
        self.invokes += 1
        timeout_s = cfg.timeout_s
        pending = self._pending = self._loop.create_future()
        # One timer per environment, re-armed only when it fires early (see _on_deadline):
        # cheaper than a call_later() and a cancel() per invoke.
        self._deadline = self._loop.time() + timeout_s
        if self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(self._deadline, self._on_deadline)
        started = time.perf_counter()
        self._send(
            protocol.invoke_frame(
                request_id,
                int((time.time() + timeout_s) * 1000),
                self._arn,
                None if client_context is None else _encode(client_context),
                event,
            )
        )
        try:
            kind, reply, body = await pending
        finally:
            self._pending = None
        duration_ms = (time.perf_counter() - started) * 1000.0
        # The worker flushed its stdout/stderr before it answered, so everything the handler
        # printed is in the log pipe now; usually the loop's reader already took it.
        if self._log_fd >= 0 and _pending_bytes(self._log_fd):
            self._drain_logs()
        if kind == protocol.RESULT:
            self._flush_partial_log()
            max_memory_mb = math.ceil(reply.get("rss_kb", 0) / 1024)
            if max_memory_mb > cfg.memory_mb:
                # The high-water mark says it went over between two samples of the monitor.
                self.kill("memory")
                await self._gone()
                result = self._oom_result(request_id, duration_ms, max_memory_mb)
            else:
                outcome = Outcome.OK if reply.get("ok") else Outcome.FUNCTION_ERROR
                result = InvokeResult(outcome, body, request_id, duration_ms)
                if self.state is EnvState.BUSY:  # not killed (shutdown) since it answered
                    self.state = EnvState.IDLE
        elif kind == "timeout":
            max_memory_mb = self.rss_mb()
            self.kill("timeout")
            await self._gone()
            self._flush_partial_log()
            result = InvokeResult(
                Outcome.TIMEOUT,
                _error(
                    "Sandbox.Timedout",
                    f"Task timed out after {timeout_s:.2f} seconds",
                    request_id,
                ),
                request_id,
                duration_ms,
            )
        elif self._death_reason == "memory":
            await self._gone()
            self._flush_partial_log()
            max_memory_mb = self._peak_mb
            result = self._oom_result(request_id, duration_ms, max_memory_mb)
        else:
            status = await self._exit_status()
            self._flush_partial_log()
            max_memory_mb = self._peak_mb
            result = InvokeResult(
                Outcome.CRASHED,
                _error(
                    "Runtime.ExitError",
                    f"RequestId: {request_id} Error: Runtime exited with error: {status}",
                    request_id,
                ),
                request_id,
                duration_ms,
            )
        result.init_ms = init_ms
        result.max_memory_mb = max_memory_mb
        self._report(result)
        result.log_lines = capture
        self._request_id = None
        self._capture = None
        self.last_used = time.monotonic()
        return result

    def _oom_result(self, request_id: str, duration_ms: float, used_mb: int) -> InvokeResult:
        limit = self.config.memory_mb
        message = (
            f"RequestId: {request_id} Error: Runtime exited with error: signal: killed "
            f"(memory used {used_mb} MB > memory size {limit} MB)"
        )
        return InvokeResult(
            Outcome.OUT_OF_MEMORY,
            _error("Runtime.OutOfMemory", message, request_id),
            request_id,
            duration_ms,
        )

    def _report(self, result: InvokeResult) -> None:
        report(self.pool, result, self._capture)

    def rss_mb(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as f:
                resident_pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        return math.ceil(resident_pages * PAGE_SIZE / (1024 * 1024))


class PlatformLines:
    """The START, END and REPORT records of one function's invokes, as JSON lines.

    Written for every invoke, so the parts that never change (the level, the function name,
    the types, the memory size) are encoded once here, and each invoke formats one string per
    record instead of building and encoding a dict. The records have the fields, in the order
    and with the values, that ``JsonLog.emit`` of the equivalent dicts would write (floats as
    ``repr``, which is what msgspec writes for them).
    """

    __slots__ = ("_head", "_memory")

    def __init__(self, cfg: FunctionConfig) -> None:
        # Between the time and the request id of all three records.
        self._head = ',"level":"info","function":' + _encode(cfg.name).decode() + ',"request_id":'
        # Between REPORT's billed duration and its max memory used.
        self._memory = f',"memory_size_mb":{cfg.memory_mb},"max_memory_used_mb":'

    def start(self, request_id: str) -> bytes:
        return (
            f'{{"time":{_now()!r}{self._head}{_encode(request_id).decode()},'
            '"type":"START","version":"$LATEST"}\n'
        ).encode()

    def end_and_report(self, result: InvokeResult, billed_ms: int) -> bytes:
        head = f'{{"time":{_now()!r}{self._head}{_encode(result.request_id).decode()},"type":'
        line = (
            f'{head}"END"}}\n{head}"REPORT","outcome":"{result.outcome.value}",'
            f'"duration_ms":{round(result.duration_ms, 3)!r},"billed_duration_ms":{billed_ms}'
            f"{self._memory}{result.max_memory_mb}"
        )
        if result.init_ms is not None:
            line += f',"init_duration_ms":{round(result.init_ms, 3)!r}'
        if result.outcome is not Outcome.OK:
            line += ',"error_type":' + _encode(result.error_type).decode()
        return (line + "}\n").encode()


def report(pool: FunctionPool, result: InvokeResult, capture: list[str] | None) -> None:
    """END and REPORT for one invoke: JSON records, and Lambda's text lines when captured."""
    cfg = pool.config
    billed = max(math.ceil(result.duration_ms), 1)
    pool.runtime.log.write(pool.platform_lines.end_and_report(result, billed))
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


class Lease:
    """One claimed unit of a function's concurrency; good for one invoke, then released."""

    __slots__ = ("_released", "env", "pool")

    def __init__(self, pool: FunctionPool, env: Environment) -> None:
        self.pool = pool
        self.env = env
        self._released = False

    def release(self) -> None:
        """Give the slot back unused (e.g. the source had nothing to deliver)."""
        if self._released:
            return
        self._released = True
        self.pool._return(self.env)

    async def invoke(
        self,
        event: bytes,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        capture_logs: bool = False,
    ) -> InvokeResult:
        if self._released:
            raise RuntimeError("lease already used")
        try:
            return await self.pool._invoke_on(
                self.env, event, request_id or new_request_id(), client_context, capture_logs
            )
        finally:
            self.release()


class FunctionPool:
    """The environments of one function and its concurrency accounting."""

    def __init__(self, runtime: Runtime, config: FunctionConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.platform_lines = PlatformLines(config)
        self.idle: list[Environment] = []  # most recently used last: reuse the warmest
        self.envs: set[Environment] = set()
        self.leased = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def concurrency_limit(self) -> int | None:
        return self.config.reserved_concurrency

    def free_slots(self) -> int:
        """How many more leases could be granted now (an upper bound; memory may evict)."""
        limit = self.config.reserved_concurrency
        by_reserved = (limit - self.leased) if limit is not None else sys.maxsize
        by_memory = len(self.idle) + self.runtime.memory_headroom_mb() // self.config.memory_mb
        return max(min(by_reserved, by_memory), 0)

    def try_acquire(self) -> Lease | None:
        limit = self.config.reserved_concurrency
        if limit is not None and self.leased >= limit:
            return None
        while self.idle:
            env = self.idle.pop()
            if env.state is EnvState.IDLE:
                self.leased += 1
                return Lease(self, env)
        if not self.runtime._reserve_memory(self.config.memory_mb, exclude=self):
            return None
        env = Environment(self)
        self.envs.add(env)
        self.leased += 1
        return Lease(self, env)

    # A timeout parameter, not asyncio.timeout() around the call: running out of time here is an
    # answer ("no slot yet", None), not an error, and the engine polls with it between checks of
    # its own stop flag; a cancelled wait would also have to tell itself apart from shutdown.
    async def acquire(self, timeout: float | None = None) -> Lease | None:  # noqa: ASYNC109
        """Wait for a slot; None if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lease = self.try_acquire()
            if lease is not None:
                return lease
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            waiter = self.runtime._loop.create_future()
            self.runtime._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return None

    async def invoke(
        self,
        event: bytes,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        capture_logs: bool = False,
    ) -> InvokeResult:
        """One invoke now, or a throttled result at once if the function has no free slot."""
        request_id = request_id or new_request_id()
        lease = self.try_acquire()
        if lease is None:
            limit = self.config.reserved_concurrency
            reason = (
                "ReservedFunctionConcurrentInvocationLimitExceeded"
                if limit is not None and self.leased >= limit
                else "DaemonMemoryBudgetExceeded"
            )
            self.runtime.log.warning(
                "invoke throttled", function=self.name, request_id=request_id, reason=reason
            )
            return throttled_result(self.name, request_id, reason)
        lease._released = True  # used here and now: what Lease.invoke does, minus a coroutine
        try:
            return await self._invoke_on(lease.env, event, request_id, client_context, capture_logs)
        finally:
            self._return(lease.env)

    async def _invoke_on(
        self,
        env: Environment,
        event: bytes,
        request_id: str,
        client_context: dict[str, Any] | None,
        capture_logs: bool,
    ) -> InvokeResult:
        runtime = self.runtime
        if len(event) > runtime.max_request_bytes:
            return InvokeResult(
                Outcome.INVALID_REQUEST,
                _error(
                    "RequestEntityTooLargeException",
                    f"Request must be smaller than {runtime.max_request_bytes} bytes for the "
                    f"Invoke operation (it was {len(event)} bytes)",
                    request_id,
                ),
                request_id,
            )
        capture: list[str] | None = [] if capture_logs else None
        runtime._ensure_loops()
        if env.state is EnvState.NEW:
            # Module-level output during init belongs to the invoke that caused the cold start.
            env._request_id, env._capture = request_id, capture
            failure = await env.start()
            env._request_id, env._capture = None, None
            if failure is not None:
                failure.request_id = request_id
                runtime.log.error(
                    "function init failed",
                    function=self.name,
                    request_id=request_id,
                    error=failure.error,
                )
                # The invoke still gets its START/END/REPORT, as in Lambda (Status: error).
                runtime.log.write(self.platform_lines.start(request_id))
                if capture is not None:
                    capture.append(f"START RequestId: {request_id} Version: $LATEST")
                report(self, failure, capture)
                failure.log_lines = capture
                return failure
            env.cold = True
        runtime.in_flight += 1
        try:
            return await env.invoke(request_id, event, client_context, capture)
        finally:
            runtime.in_flight -= 1

    def _return(self, env: Environment) -> None:
        self.leased -= 1
        if env.state is EnvState.IDLE:
            env.last_used = time.monotonic()
            self.idle.append(env)
        elif env.state is EnvState.NEW:
            # Claimed but never started: give its memory back.
            self._forget(env)
        elif env.state is not EnvState.DEAD:
            # The invoke was abandoned mid-flight (its task cancelled, e.g. a drain that ran
            # out of grace): the handler is still running and its result would reach nobody,
            # so the environment can never be reused.
            env.kill("abandoned")
        self.runtime._wake()

    def _forget(self, env: Environment) -> None:
        if env in self.envs:
            self.envs.discard(env)
            self.runtime.memory_used_mb -= self.config.memory_mb
            if env in self.idle:
                self.idle.remove(env)
            self.runtime._wake()

    def provisioned_alive(self) -> int:
        return sum(1 for env in self.envs if env.provisioned and env.state is not EnvState.DEAD)

    async def provision(self) -> None:
        """Start environments until ``provisioned_concurrency`` are alive."""
        missing = self.config.provisioned_concurrency - self.provisioned_alive()
        starts = []
        for _ in range(missing):
            if not self.runtime._reserve_memory(self.config.memory_mb, exclude=self):
                self.runtime.log.error(
                    "cannot keep provisioned environments: daemon memory budget exhausted",
                    function=self.name,
                    memory_budget_mb=self.runtime.memory_budget_mb,
                )
                break
            env = Environment(self, provisioned=True)
            self.envs.add(env)
            starts.append(self._start_provisioned(env))
        if starts:
            await asyncio.gather(*starts)

    async def _start_provisioned(self, env: Environment) -> None:
        failure = await env.start()
        if failure is not None:
            env.kill("init failed")
            self.runtime.log.error(
                "provisioned environment failed to initialise",
                function=self.name,
                error=failure.error,
            )
            return
        self.idle.insert(0, env)
        self.runtime._wake()

    def reap_idle(self, now: float) -> None:
        cutoff = now - self.config.idle_timeout_s
        for env in list(self.idle):
            if not env.provisioned and env.last_used < cutoff:
                self.idle.remove(env)
                env.kill("idle")

    def close(self) -> None:
        for env in list(self.envs):
            env.kill("shutdown")


class Runtime:
    """Every function's pool, plus the daemon-wide memory budget they share."""

    def __init__(
        self,
        functions: Iterable[FunctionConfig],
        *,
        memory_budget_mb: int,
        max_request_bytes: int = MAX_PAYLOAD_BYTES,
        max_response_bytes: int = MAX_PAYLOAD_BYTES,
        region: str = "us-east-1",
        account: str = "000000000000",
        log: JsonLog | None = None,
    ) -> None:
        self.memory_budget_mb = memory_budget_mb
        self.memory_used_mb = 0
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.region = region
        self.account = account
        self.log = log or default_log
        self.in_flight = 0
        self._loop = asyncio.get_running_loop()
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.pools = {fn.name: FunctionPool(self, fn) for fn in functions}

    def function_arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"

    def pool(self, name: str) -> FunctionPool:
        try:
            return self.pools[name]
        except KeyError:
            known = ", ".join(sorted(self.pools)) or "none"
            raise KeyError(
                f"function {name!r} is not defined (defined: {known}); add it under [[functions]]"
            ) from None

    async def invoke(self, function: str, event: bytes, **kwargs: Any) -> InvokeResult:
        return await self.pool(function).invoke(event, **kwargs)

    def memory_headroom_mb(self) -> int:
        return max(self.memory_budget_mb - self.memory_used_mb, 0)

    def _reserve_memory(self, needed_mb: int, exclude: FunctionPool) -> bool:
        if self.memory_used_mb + needed_mb > self.memory_budget_mb:
            self._evict_idle(needed_mb - self.memory_headroom_mb(), exclude)
        if self.memory_used_mb + needed_mb > self.memory_budget_mb:
            return False
        self.memory_used_mb += needed_mb
        return True

    def _evict_idle(self, needed_mb: int, exclude: FunctionPool) -> None:
        """Free memory held by idle environments of other functions, least recently used first."""
        candidates = sorted(
            (env for pool in self.pools.values() if pool is not exclude for env in pool.idle
             if not env.provisioned),
            key=lambda env: env.last_used,
        )
        freed = 0
        for env in candidates:
            if freed >= needed_mb:
                break
            env.pool.idle.remove(env)
            env.kill("evicted")
            freed += env.config.memory_mb

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def start(self) -> None:
        """Start provisioned environments and the monitor and reaper loops."""
        await asyncio.gather(*(pool.provision() for pool in self.pools.values()))
        self._ensure_loops()

    def _ensure_loops(self) -> None:
        """The memory monitor and the reaper run from start(), or from the first invoke when
        start() was never called (``poller invoke``): a memory limit holds either way."""
        if self._tasks or self._closed:
            return
        self._tasks.append(self._loop.create_task(self._monitor_memory()))
        self._tasks.append(self._loop.create_task(self._maintain()))

    async def _monitor_memory(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for pool in self.pools.values():
                limit = pool.config.memory_mb
                for env in list(pool.envs):
                    if env.state is EnvState.BUSY or env.state is EnvState.STARTING:
                        rss = env.rss_mb()
                        if rss > limit:
                            env._peak_mb = rss
                            env.kill("memory")

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                try:
                    pool.reap_idle(now)
                    if pool.provisioned_alive() < pool.config.provisioned_concurrency:
                        await pool.provision()
                except Exception as exc:  # one function's trouble must not stop the reaper
                    self.log.error("environment maintenance failed", function=pool.name,
                                   error=repr(exc))

    def environments(self) -> int:
        return sum(len(pool.envs) for pool in self.pools.values())

    async def close(self) -> None:
        """Kill every environment and wait until each is reaped and its TMPDIR removed."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        envs = [env for pool in self.pools.values() for env in pool.envs]
        for pool in self.pools.values():
            pool.close()
        for env in envs:
            await env._gone()
        self.log.flush()
