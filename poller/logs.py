"""JSON-lines logging to stdout.

One record per line, written through a buffer that is flushed once per event-loop turn, so a
burst of invokes costs one write() rather than three per invoke (START, END, REPORT).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import IO, Any

import msgspec

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_encode = msgspec.json.Encoder().encode


class JsonLog:
    def __init__(self, stream: IO[bytes] | None = None, level: str = "info") -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.threshold = LEVELS[level.lower()]
        self._buffer = bytearray()
        self._flush_scheduled = False

    def set_level(self, level: str) -> None:
        self.threshold = LEVELS[level.lower()]

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, record: dict[str, Any]) -> None:
        """Write a pre-built record (it gets a timestamp if it has none)."""
        if "time" not in record:
            record = {"time": round(time.time(), 6), **record}
        self.write(_encode(record) + b"\n")

    def write(self, lines: bytes) -> None:
        """Write records already encoded, one JSON object per line, each ending in a newline
        (for the records of every invoke, whose constant parts the runtime encodes once)."""
        self._buffer += lines
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def log(self, level: str, message: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        self.emit({"time": round(time.time(), 6), "level": level, "message": message, **fields})

    def debug(self, message: str, **fields: Any) -> None:
        self.log("debug", message, **fields)

    def info(self, message: str, **fields: Any) -> None:
        self.log("info", message, **fields)

    def warning(self, message: str, **fields: Any) -> None:
        self.log("warning", message, **fields)

    def error(self, message: str, **fields: Any) -> None:
        self.log("error", message, **fields)

    def flush(self) -> None:
        self._flush_scheduled = False
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


log = JsonLog()
