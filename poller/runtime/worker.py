"""The worker process: one execution environment for one function.

Started as ``python -m poller.runtime.worker REQ_FD RESP_FD`` with a fresh interpreter and an
environment built by the pool. It imports the handler once (the init phase), then loops:
read an invoke frame, call ``handler(event, context)``, write a result frame. Its stdout and
stderr are the function's logs; the control channel is a separate pair of pipes so nothing the
handler prints can corrupt the protocol.

Keep imports here minimal: every cold start pays for them. No msgspec at start (~25 ms), no
typing; the stdlib json does the result (the real runtime uses json-compatible semantics too) and
the events until a worker has decoded enough of them to pay for msgspec's import (``Events``);
traceback is imported only when there is a stack to report.
"""

from __future__ import annotations

import contextlib  # already imported by site at interpreter start: free
import importlib
import json
import os
import resource
import sys
import time

from poller.runtime import protocol
from poller.runtime.context import LambdaContext

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~3 ms per cold start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    Handler = Callable[[Any, LambdaContext], Any]

_CONTEXT_VARIABLES = (
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
)


class InitFailure(Exception):
    def __init__(self, error_type: str, message: str, trace: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.trace = trace or []


def load_handler(spec: str) -> Handler:
    """Import ``module.function`` the way the Lambda Python runtime does, with its error types."""
    try:
        module_name, function_name = spec.rsplit(".", 1)
    except ValueError as exc:
        raise InitFailure("Runtime.MalformedHandlerName", f"Bad handler '{spec}': {exc}") from exc
    if not module_name or not function_name:
        raise InitFailure(
            "Runtime.MalformedHandlerName",
            f"Bad handler '{spec}': expected 'module.function'",
        )
    module_name = module_name.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        trace = [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}']
        raise InitFailure(
            "Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}", trace
        ) from exc
    except ImportError as exc:
        raise InitFailure(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}"
        ) from exc
    handler = getattr(module, function_name, None)
    if handler is None:
        raise InitFailure(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' missing on module '{module_name}'",
        )
    if not callable(handler):
        raise InitFailure(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' on module '{module_name}' is not callable",
        )
    return handler


def _is_runtime_frame(filename: str) -> bool:
    return (
        filename == __file__
        or filename == importlib.__file__
        or filename.startswith("<frozen importlib")
    )


def user_frames(tb: Any) -> list[str]:
    """The stack trace without the runtime's own frames (the leading ones: this module's loop,
    the import machinery during init), as the Lambda runtime reports it."""
    import traceback

    frames = traceback.extract_tb(tb)
    start = 0
    while start < len(frames) and _is_runtime_frame(frames[start].filename):
        start += 1
    return traceback.format_list(frames[start:])


def _decimal_default(value: Any) -> Any:
    # awslambdaric serialises Decimal as a JSON number; everything else non-JSON is an error.
    # A Decimal can only exist if its module was imported, so no need to import it here.
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encode_result = json.JSONEncoder(default=_decimal_default).encode
_scan_json = json.JSONDecoder().scan_once
_json_loads = json.loads


def decode_event(raw: bytes) -> Any:
    """json.loads, minus its per-call overhead in the common case (compact JSON, UTF-8)."""
    text = raw.decode()
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        value, end = None, -1
    if end == len(text):
        return value
    return _json_loads(text)  # leading/trailing whitespace, or invalid: json.loads decides


# Event bytes decoded with the stdlib before switching to msgspec: about as long as msgspec's
# import takes (~25 ms at the stdlib's ~3 ns per byte of a batch event). A worker that keeps
# decoding batches then pays the import once and decodes them 2-3x faster ever after (for a
# batch of stream records the decode is most of the worker's work); one that sees a few small
# events never pays it, and no cold start does.
FAST_DECODE_AFTER_BYTES = 8 * 1024 * 1024


class Events:
    """Decodes events as json.loads does: with the stdlib's decoder at first, then with
    msgspec's, falling back to the stdlib whenever msgspec refuses an input. Where msgspec
    accepts an input it gives json.loads's value (ints of any size and correctly rounded floats
    included; tests/unit/test_runtime_worker.py); it refuses what only Python's json accepts
    (NaN, Infinity, numbers out of a float's range, lone surrogates), which the stdlib decodes.

    The switch costs one invoke the import (~25 ms) and the worker ~4 MB more memory, once.
    """

    __slots__ = ("_fast", "_left")

    def __init__(self, switch_after_bytes: int = FAST_DECODE_AFTER_BYTES) -> None:
        self._left = switch_after_bytes
        self._fast: Callable[[bytes], Any] | None = None

    @property
    def fast(self) -> bool:
        return self._fast is not None

    def decode(self, raw: bytes) -> Any:
        fast = self._fast
        if fast is None:
            self._left -= len(raw)
            if self._left > 0:
                return decode_event(raw)
            fast = self._switch()
            if fast is None:
                return decode_event(raw)
        try:
            return fast(raw)
        except Exception:  # msgspec's DecodeError, or anything else: json.loads decides
            return decode_event(raw)

    def _switch(self) -> Callable[[bytes], Any] | None:
        self._left = 1 << 62  # tried once, whatever happens
        # The handler's directory comes first on sys.path, so this may import a msgspec the
        # function ships (usually the same library) or anything else of that name: it is used
        # only if it imports and decodes a sample right; otherwise the stdlib goes on.
        try:
            fast = importlib.import_module("msgspec.json").Decoder().decode
            if fast(b'{"a":[1,2.5,"b",null]}') != {"a": [1, 2.5, "b", None]}:
                return None
        except Exception:
            return None
        self._fast = fast
        return fast


def error_body(error_type: str, message: str, request_id: str | None, trace: list[str]) -> bytes:
    body: dict[str, Any] = {"errorMessage": message, "errorType": error_type}
    if request_id is not None:
        body["requestId"] = request_id
    body["stackTrace"] = trace
    return json.dumps(body).encode()


def log_error(error_type: str, message: str, trace: list[str]) -> None:
    """The runtime's own log line for an error, as awslambdaric writes it."""
    lines = [f"[ERROR] {error_type}: {message}"]
    if trace:
        lines.append("Traceback (most recent call last):")
        for element in trace:
            lines.extend(element.splitlines())
    try:
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # the handler closed or broke stderr: the error still goes back
        pass


class PeakMemory:
    """This process's peak resident memory (KB), cheaply, and without the daemon's.

    ``getrusage().ru_maxrss`` alone is wrong here: at exec the kernel folds the RSS of the
    pre-exec address space, a copy of the daemon's (fork) or the daemon's own (vfork), into the
    new process's maxrss. A worker spawned by a 300 MB daemon reports 300 MB before it has done
    anything, and with memory_mb = 128 would be killed as out of memory on every invoke.

    So: when ru_maxrss is above what was inherited, it is our own high-water mark; otherwise read
    VmHWM from /proc/self/status (~4 us). And only when the page-fault count moved: resident
    memory cannot grow without a fault, and a warm invoke usually takes none.
    """

    __slots__ = ("_faults", "_inherited_kb", "_peak_kb", "_status_fd")

    def __init__(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._inherited_kb = usage.ru_maxrss
        self._faults = -1
        self._peak_kb = 0
        try:
            self._status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no procfs: ru_maxrss is the best there is
            self._status_fd = -1

    def _vm_hwm_kb(self, fallback: int) -> int:
        if self._status_fd < 0:
            return fallback
        try:
            status = os.pread(self._status_fd, 8192, 0)
            start = status.index(b"VmHWM:") + 6
            return int(status[start : status.index(b"kB", start)])
        except (OSError, ValueError):
            return fallback

    def kb(self) -> int:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        faults = usage.ru_minflt + usage.ru_majflt
        if faults != self._faults:
            self._faults = faults
            maxrss = usage.ru_maxrss
            self._peak_kb = maxrss if maxrss > self._inherited_kb else self._vm_hwm_kb(maxrss)
        return self._peak_kb


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        # The daemon closed the channel: it is shutting us down.
        raise EOFError
    return data


def _flush_logs() -> None:
    # Logs first: the daemon drains the log pipe when it sees a frame, so every line the handler
    # printed is attributed to this request and lands before END/REPORT.
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            stream.flush()
        except ValueError:
            # The handler closed it. The fd is still the log pipe, so later invokes on this warm
            # worker get their logs back instead of failing on their first print.
            if getattr(stream, "closed", False):
                with contextlib.suppress(OSError):
                    setattr(sys, name, open(fd, "w", buffering=1, closefd=False))  # noqa: SIM115
        except (OSError, AttributeError):  # broken or replaced by the handler: its business
            pass


def _init_failed(error_type: str, message: str, trace: list[str], resp_fd: int) -> NoReturn:
    log_error(error_type, message, trace)
    _flush_logs()
    body = error_body(error_type, message, None, trace)
    _write_all(resp_fd, protocol.pack(b'{"t":"init_error"}', body))
    os._exit(0)


def serve(req_fd: int, resp_fd: int) -> NoReturn:
    environ = os.environ
    max_response = int(environ.pop("_POLLER_MAX_RESPONSE_BYTES", str(6 * 1024 * 1024)))
    task_root = environ.get("LAMBDA_TASK_ROOT", os.getcwd())
    if task_root not in sys.path:
        sys.path.insert(0, task_root)
    # Line-buffered logs: each print reaches the daemon as a whole line, in order.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    peak = PeakMemory()  # before the handler's import can raise the mark
    started = time.perf_counter()
    try:
        handler = load_handler(environ.get("_HANDLER", ""))
    except InitFailure as exc:
        _init_failed(exc.error_type, exc.message, exc.trace, resp_fd)
    except BaseException as exc:  # module-level code raised: report it as Lambda does
        _init_failed(type(exc).__name__, str(exc), user_frames(exc.__traceback__), resp_fd)
    init_ms = (time.perf_counter() - started) * 1000.0
    _flush_logs()
    ready = b'{"t":"ready","init_ms":%.3f,"rss_kb":%d}' % (init_ms, peak.kb())
    _write_all(resp_fd, protocol.pack(ready))

    requests = os.fdopen(req_fd, "rb", buffering=65536)
    read = requests.read
    unpack_prefix = protocol.PREFIX.unpack
    prefix_size = protocol.PREFIX_SIZE
    parse_invoke = protocol.parse_invoke
    pack = protocol.pack
    write = os.write
    peak_kb = peak.kb
    encode_result = _encode_result
    decode = Events().decode
    context_env = {name: environ[name] for name in _CONTEXT_VARIABLES if name in environ}
    ok_head = b'{"t":"result","ok":true,"rss_kb":%d}'
    error_head = b'{"t":"result","ok":false,"rss_kb":%d}'
    while True:
        raw = read(prefix_size)
        if len(raw) != prefix_size:
            os._exit(0)  # the daemon closed the channel: it is shutting us down
        head_len, body_len = unpack_prefix(raw)
        try:
            head = _read_exact(requests, head_len)
            raw_event = _read_exact(requests, body_len) if body_len else b"null"
        except EOFError:
            os._exit(0)
        request_id, deadline_ms, arn, cc_json = parse_invoke(head)
        context = LambdaContext(
            request_id,
            deadline_ms,
            arn,
            json.loads(cc_json) if cc_json else None,
            environ=context_env,
        )
        ok = False
        try:
            event = decode(raw_event)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            error = ("Runtime.UnmarshalError", f"Unable to unmarshal input: {exc}", [])
        else:
            try:
                result = handler(event, context)
            except Exception as exc:
                error = (type(exc).__name__, str(exc), user_frames(exc.__traceback__))
            else:
                try:
                    body = b"null" if result is None else encode_result(result).encode()
                except Exception as exc:  # TypeError, ValueError, RecursionError, ...
                    error = ("Runtime.MarshalError", f"Unable to marshal response: {exc}", [])
                else:
                    if len(body) <= max_response:
                        ok = True
                    else:
                        error = (
                            "Function.ResponseSizeTooLarge",
                            f"Response payload size ({len(body)} bytes) exceeded maximum "
                            f"allowed payload size ({max_response} bytes).",
                            [],
                        )
        if ok:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                _flush_logs()
            head = ok_head % peak_kb()
        else:
            log_error(*error)
            _flush_logs()
            body = error_body(error[0], error[1], request_id, error[2])
            head = error_head % peak_kb()
        data = pack(head, body)
        written = write(resp_fd, data)
        if written != len(data):
            _write_all(resp_fd, data[written:])


def main() -> NoReturn:
    req_fd, resp_fd = int(sys.argv[1]), int(sys.argv[2])
    # Handlers see argv as a bare interpreter would, not our plumbing.
    sys.argv = sys.argv[:1]
    serve(req_fd, resp_fd)


if __name__ == "__main__":
    main()
