"""The worker process: one execution environment for one function.

Started as ``python -m poller.runtime.worker REQ_FD RESP_FD`` with a fresh interpreter and an
environment built by the pool. It imports the handler once (the init phase), then loops:
read an invoke frame, call ``handler(event, context)``, write a result frame. Its stdout and
stderr are the function's logs; the control channel is a separate pair of pipes so nothing the
handler prints can corrupt the protocol.

Keep imports here minimal: every cold start pays for them.
"""

from __future__ import annotations

import decimal
import importlib
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from poller.runtime import protocol
from poller.runtime.context import LambdaContext

Handler = Callable[[Any, LambdaContext], Any]

_event_decoder = msgspec.json.Decoder()


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


def user_frames(tb: Any) -> list[str]:
    """The stack trace without this module's frames, as the Lambda runtime reports it."""
    frames = [f for f in traceback.extract_tb(tb) if f.filename != __file__]
    return traceback.format_list(frames)


def _decimal_default(value: Any) -> Any:
    # awslambdaric serialises Decimal as a JSON number; everything else non-JSON is an error.
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def error_body(error_type: str, message: str, request_id: str | None, trace: list[str]) -> bytes:
    body: dict[str, Any] = {"errorMessage": message, "errorType": error_type}
    if request_id is not None:
        body["requestId"] = request_id
    body["stackTrace"] = trace
    return json.dumps(body).encode()


def max_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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


def serve(req_fd: int, resp_fd: int) -> NoReturn:
    max_response = int(os.environ.pop("_POLLER_MAX_RESPONSE_BYTES", str(6 * 1024 * 1024)))
    task_root = os.environ.get("LAMBDA_TASK_ROOT", os.getcwd())
    if task_root not in sys.path:
        sys.path.insert(0, task_root)
    # Line-buffered logs: each print reaches the daemon as a whole line, in order.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    started = time.perf_counter()
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""))
    except InitFailure as exc:
        sys.stdout.flush()
        sys.stderr.flush()
        body = error_body(exc.error_type, exc.message, None, exc.trace)
        _write_all(resp_fd, protocol.frame({"t": protocol.INIT_ERROR}, body))
        os._exit(0)
    except BaseException as exc:  # module-level code raised: report it as Lambda does
        sys.stdout.flush()
        sys.stderr.flush()
        body = error_body(type(exc).__name__, str(exc), None, user_frames(exc.__traceback__))
        _write_all(resp_fd, protocol.frame({"t": protocol.INIT_ERROR}, body))
        os._exit(0)
    init_ms = (time.perf_counter() - started) * 1000.0
    _write_all(resp_fd, protocol.frame({"t": protocol.READY, "init_ms": init_ms}))

    requests = os.fdopen(req_fd, "rb", buffering=65536)
    prefix = protocol.PREFIX
    decode_header = protocol.decode_header
    frame = protocol.frame
    stdout, stderr = sys.stdout, sys.stderr
    environ = os.environ
    while True:
        try:
            head_len, body_len = prefix.unpack(_read_exact(requests, protocol.PREFIX_SIZE))
            header = decode_header(_read_exact(requests, head_len))
            raw_event = _read_exact(requests, body_len) if body_len else b"null"
        except EOFError:
            os._exit(0)
        request_id = header["id"]
        context = LambdaContext(request_id, header["deadline_ms"], header["arn"], header.get("cc"),
                                environ=environ)
        ok = True
        try:
            event = _event_decoder.decode(raw_event)
            result = handler(event, context)
        except Exception as exc:
            ok = False
            body = error_body(type(exc).__name__, str(exc), request_id, user_frames(exc.__traceback__))
        else:
            try:
                body = json.dumps(result, default=_decimal_default).encode()
            except (TypeError, ValueError) as exc:
                ok = False
                body = error_body(
                    "Runtime.MarshalError", f"Unable to marshal response: {exc}", request_id, []
                )
            else:
                if len(body) > max_response:
                    ok = False
                    body = error_body(
                        "Function.ResponseSizeTooLarge",
                        f"Response payload size ({len(body)} bytes) exceeded maximum allowed "
                        f"payload size ({max_response} bytes).",
                        request_id,
                        [],
                    )
        # Logs first: the daemon drains the log pipe when it sees the result, so every line the
        # handler printed is attributed to this request and lands before END/REPORT.
        stdout.flush()
        stderr.flush()
        _write_all(resp_fd, frame({"t": protocol.RESULT, "ok": ok, "rss_kb": max_rss_kb()}, body))


def main() -> NoReturn:
    req_fd, resp_fd = int(sys.argv[1]), int(sys.argv[2])
    # Handlers see argv as a bare interpreter would, not our plumbing.
    sys.argv = sys.argv[:1]
    serve(req_fd, resp_fd)


if __name__ == "__main__":
    main()
