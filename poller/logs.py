"""JSON-lines logging to stdout, the daemon's one log path.

Every record carries Lambda's JSON log field names: ``timestamp`` (ISO-8601 UTC, milliseconds),
``level`` (``DEBUG``, ``INFO``, ``WARN``, ``ERROR``), ``message``, ``requestId``; platform
records have Lambda's ``type`` values (``platform.start``, ``platform.runtimeDone``,
``platform.report``), so log shippers and people read them as they read Lambda's.

Records are written through a buffer that is flushed FLUSH_DELAY_S after the first record
put in it (or at once past FLUSH_BYTES), so a busy daemon costs the log's reader one write()
per few milliseconds, not one per invoke: with one invoke per event-loop turn, a flush per turn
was a write() and a wake-up of journald (or whatever reads stdout) per invoke. Warnings and
errors are written at once (with everything before them); order is kept; the daemon flushes on
shutdown.
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import time
from typing import IO, Any, Final

import msgspec

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Lambda's names for them.
LEVEL_NAMES: Final = {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "error": "ERROR"}
# How long a record may wait in the buffer, and how much may wait before it is written at once.
FLUSH_DELAY_S: Final = 0.005
FLUSH_BYTES: Final = 65536
WARNING: Final = LEVELS["warning"]

_encode = msgspec.json.Encoder().encode
_second = -1
_prefix = ""


def timestamp() -> str:
    """Now as ISO-8601 UTC with milliseconds (``2026-12-02T09:40:01.123Z``), the way Lambda
    writes it. The part up to the second is formatted once per second: this runs for every
    platform record of every invoke."""
    global _second, _prefix
    now = time.time()
    second = int(now)
    if second != _second:
        _prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_prefix}.{int((now - second) * 1000):03d}Z"


# Logs with records waiting for their timer.
_waiting: set[JsonLog] = set()


@atexit.register
def _flush_at_exit() -> None:
    """Records still waiting when the interpreter exits (a path that returned without
    flushing, a loop closed before the timer fired) are written, not lost."""
    for log in list(_waiting):
        log.flush()


class JsonLog:
    def __init__(self, stream: IO[bytes] | None = None, level: str = "info") -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.threshold = LEVELS[level.lower()]
        self._buffer = bytearray()
        self._flush_scheduled = False

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, record: dict[str, Any]) -> None:
        """Write a record built by the caller (it gets a timestamp first if it has none)."""
        if "timestamp" not in record:
            record = {"timestamp": timestamp(), **record}
        self.write(_encode(record) + b"\n")

    def write(self, lines: bytes) -> None:
        """Write records already encoded, one JSON object per line, each ending in a newline
        (for the records of every invoke, whose constant parts the runtime encodes once)."""
        buffer = self._buffer
        buffer += lines
        if len(buffer) >= FLUSH_BYTES:
            self.flush()
            return
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        _waiting.add(self)
        loop.call_later(FLUSH_DELAY_S, self.flush)

    def log(self, level: str, message: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        self.emit(
            {"timestamp": timestamp(), "level": LEVEL_NAMES[level], "message": message, **fields}
        )
        if LEVELS[level] >= WARNING:
            # A warning or an error may be the daemon's last words (a failed start exits
            # before any timer fires): written at once, with everything before it.
            self.flush()

    def debug(self, message: str, **fields: Any) -> None:
        self.log("debug", message, **fields)

    def info(self, message: str, **fields: Any) -> None:
        self.log("info", message, **fields)

    def warning(self, message: str, **fields: Any) -> None:
        self.log("warning", message, **fields)

    def error(self, message: str, **fields: Any) -> None:
        self.log("error", message, **fields)

    def flush(self) -> None:
        # A timer already set may still fire: it finds the buffer empty, or flushes early.
        self._flush_scheduled = False
        _waiting.discard(self)
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # Nobody is reading our stdout any more (pipe closed on shutdown): drop, don't die.
            pass
