"""What an invoke comes back as: the outcome and the Lambda-shaped payload the engine sees."""

from __future__ import annotations

import enum
import itertools
import os
import uuid
from dataclasses import dataclass
from typing import Any, Final

import msgspec

_error_decoder = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
LOG_TAIL_BYTES: Final = 4096


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


def error_payload(error_type: str, message: str, request_id: str | None = None) -> bytes:
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
