"""Framing between the daemon and a worker process.

One frame = an 8-byte prefix (header length, body length, both little-endian u32), a small
msgspec-JSON header, then the body verbatim. Keeping the event/result body outside the header
means neither side re-encodes the payload: the daemon hands the worker the exact event bytes
the engine built, and the worker's JSON result travels back untouched.

This module must stay cheap to import: the worker imports it on every cold start.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

PREFIX = struct.Struct("<II")
PREFIX_SIZE = PREFIX.size

# Header "t" values.
READY = "ready"  # worker -> daemon: handler imported; {"init_ms"}
INIT_ERROR = "init_error"  # worker -> daemon: import failed; body = error JSON
INVOKE = "invoke"  # daemon -> worker: {"id", "deadline_ms", "arn", "cc"?}; body = event JSON
RESULT = "result"  # worker -> daemon: {"ok": bool, "rss_kb"}; body = result or error JSON

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict).decode


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = _encode(header)
    return PREFIX.pack(len(head), len(body)) + head + body


def decode_header(raw: bytes | memoryview) -> dict[str, Any]:
    return _decode(raw)


class FrameReader:
    """Incremental parser: feed it chunks from a pipe, take out whole frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        buf = self._buf
        buf += data
        frames: list[tuple[dict[str, Any], bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= PREFIX_SIZE:
            head_len, body_len = PREFIX.unpack_from(buf, pos)
            stop = pos + PREFIX_SIZE + head_len + body_len
            if stop > end:
                break
            head_start = pos + PREFIX_SIZE
            body_start = head_start + head_len
            frames.append(
                (_decode(buf[head_start:body_start]), bytes(buf[body_start:stop]))
            )
            pos = stop
        if pos:
            del buf[:pos]
        return frames
