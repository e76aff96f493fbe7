"""One execution environment: a worker process for one function, one invoke at a time, with
its pipes, its timeout and memory kills, and the forwarding of its log lines."""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import errno
import fcntl
import math
import os
import shutil
import signal
import sys
import tempfile
import termios
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import msgspec

from poller.logs import timestamp
from poller.runtime import protocol
from poller.runtime.platform import report
from poller.runtime.results import InvokeResult, Outcome, error_payload

if TYPE_CHECKING:
    from poller.runtime.pool import FunctionPool

_encode = msgspec.json.Encoder().encode
READ_CHUNK: Final = 65536  # a bigger os.read buffer (e.g. 1 MiB) is mmap'd per call: ~10 us each
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")

_FIONREAD_BUF = array.array("i", [0])


def _pending_bytes(fd: int) -> int:
    """Bytes waiting in a pipe: one ioctl, cheaper than a read that fails with EAGAIN."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, _FIONREAD_BUF, True)
    except OSError:
        return 1  # let the read find out
    return _FIONREAD_BUF[0]


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
                error_payload(
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
            payload = error_payload(
                "Runtime.OutOfMemory",
                f"Runtime exited during init: signal: killed (memory used {init_mb} MB > "
                f"memory size {self.config.memory_mb} MB)",
            )
        elif kind == protocol.INIT_ERROR:
            self.kill("init error")
            payload = body
        elif kind == "timeout":
            self.kill("init timeout")
            payload = error_payload(
                "Sandbox.Timedout",
                f"Init timed out after {self.config.init_timeout_s:.2f} seconds",
            )
        elif self._death_reason == "memory":  # the monitor caught it during init
            payload = error_payload(
                "Runtime.OutOfMemory",
                f"Runtime exited during init: signal: killed (memory used {self._peak_mb} MB > "
                f"memory size {self.config.memory_mb} MB)",
            )
        else:  # it exited during init, or was killed (shutdown, eviction) before it was ready
            self.kill("exited during init")
            status = await self._exit_status()
            payload = error_payload("Runtime.ExitError", f"Runtime exited during init: {status}")
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
                "timestamp": timestamp(),
                "level": "INFO",
                "type": "function",
                "function": self.config.name,
                "requestId": self._request_id,
                "message": line,
            }
        )
        if self._capture is not None:
            self._capture.append(line)

    def _send(self, head: bytes, body: bytes) -> None:
        """Write a frame's head and body with one writev (no copy of the body into a frame);
        what the pipe does not take now is written when it is writable again."""
        if self._out:
            self._out += head
            self._out += body
            return
        try:
            written = os.writev(self._req_fd, (head, body))
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            return  # the worker is gone; _watch_exit reports it
        if written < len(head) + len(body):
            if written < len(head):
                self._out += head[written:]
                self._out += body
            else:
                self._out += memoryview(body)[written - len(head) :]
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
            protocol.invoke_head(
                request_id,
                int((time.time() + timeout_s) * 1000),
                self._arn,
                None if client_context is None else _encode(client_context),
                len(event),
            ),
            event,
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
                error_payload(
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
                error_payload(
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
            error_payload("Runtime.OutOfMemory", message, request_id),
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
