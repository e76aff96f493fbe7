"""Framing between the daemon and a worker process.

One frame = an 8-byte prefix (header length, body length, both little-endian u32), a small
header, then the body verbatim. Keeping the event/result body outside the header means neither
side re-encodes the payload: the daemon hands the worker the exact event bytes the engine built,
and the worker's JSON result travels back untouched.

Two header shapes, one per direction:

- daemon -> worker (always an invoke): a fixed binary header, ``INVOKE_HEAD`` (deadline in epoch
  ms, then the byte lengths of the request id, the invoked ARN and the client-context JSON),
  followed by those three strings. The worker parses it with ``struct`` alone.
- worker -> daemon: a JSON object with a ``"t"`` type (``READY``, ``INIT_ERROR``, ``RESULT``).
  The worker writes these few fixed shapes by hand; the daemon decodes them with msgspec.

This module must stay cheap to import: the worker imports it on every cold start, so it imports
nothing beyond ``struct`` at module level (msgspec, ~25 ms to import, is the daemon's alone).
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the worker ~3 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PREFIX = struct.Struct("<II")
PREFIX_SIZE = PREFIX.size
INVOKE_HEAD = struct.Struct("<qIII")  # deadline_ms, len(request id), len(arn), len(client ctx)

# Header "t" values (worker -> daemon).
READY = "ready"  # handler imported; {"init_ms"}
INIT_ERROR = "init_error"  # import failed; body = error JSON
RESULT = "result"  # {"ok": bool, "rss_kb"}; body = result or error JSON
INVOKE = "invoke"  # daemon -> worker: the one frame kind the worker receives (binary header)

_pack_prefix = PREFIX.pack
_pack_invoke = INVOKE_HEAD.pack


def pack(head: bytes, body: bytes = b"") -> bytes:
    """One frame from an already encoded header."""
    return _pack_prefix(len(head), len(body)) + head + body


def invoke_head(
    request_id: str, deadline_ms: int, arn: str, client_context: bytes | None, event_len: int
) -> bytes:
    """The daemon's invoke frame up to its event; ``client_context`` is JSON bytes or None.
    The event follows it on the pipe as it is (a batch of up to 6 MB is not copied into a
    frame)."""
    rid = request_id.encode()
    arn_b = arn.encode()
    cc = client_context or b""
    head = _pack_invoke(deadline_ms, len(rid), len(arn_b), len(cc)) + rid + arn_b + cc
    return _pack_prefix(len(head), event_len) + head


def invoke_frame(
    request_id: str, deadline_ms: int, arn: str, client_context: bytes | None, event: bytes
) -> bytes:
    """The whole invoke frame in one piece (for a writer without writev)."""
    return invoke_head(request_id, deadline_ms, arn, client_context, len(event)) + event


def parse_invoke(head: bytes) -> tuple[str, int, str, bytes | None]:
    """(request id, deadline ms, invoked ARN, client-context JSON or None) of an invoke header."""
    deadline_ms, rid_len, arn_len, cc_len = INVOKE_HEAD.unpack_from(head)
    start = INVOKE_HEAD.size
    arn_start = start + rid_len
    cc_start = arn_start + arn_len
    return (
        head[start:arn_start].decode(),
        deadline_ms,
        head[arn_start:cc_start].decode(),
        head[cc_start : cc_start + cc_len] if cc_len else None,
    )


# -- daemon side: msgspec, imported on first use ---------------------------------------------------

_encode: Callable[[Any], bytes] | None = None
_decode: Callable[[bytes | memoryview | bytearray], dict[str, Any]] | None = None


def _codec() -> tuple[Callable[[Any], bytes], Callable[[Any], dict[str, Any]]]:
    global _encode, _decode
    if _encode is None or _decode is None:
        import msgspec

        _encode = msgspec.json.Encoder().encode
        _decode = msgspec.json.Decoder(dict).decode
    return _encode, _decode


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """A worker -> daemon style frame with a JSON header (tests and tools; the worker hand-writes
    its few headers)."""
    return pack(_codec()[0](header), body)


class FrameReader:
    """Incremental parser for worker -> daemon frames: feed it chunks, take out whole frames."""

    __slots__ = ("_buf", "_decode")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decode = _codec()[1]

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        buf = self._buf
        if not buf:
            # The common case: one whole frame in one read. No copy into the buffer.
            end = len(data)
            if end >= PREFIX_SIZE:
                head_len, body_len = PREFIX.unpack_from(data)
                body_start = PREFIX_SIZE + head_len
                if body_start + body_len == end:
                    return [(self._decode(data[PREFIX_SIZE:body_start]), data[body_start:])]
        buf += data
        frames: list[tuple[dict[str, Any], bytes]] = []
        pos = 0
        end = len(buf)
        decode = self._decode
        while end - pos >= PREFIX_SIZE:
            head_len, body_len = PREFIX.unpack_from(buf, pos)
            stop = pos + PREFIX_SIZE + head_len + body_len
            if stop > end:
                break
            head_start = pos + PREFIX_SIZE
            body_start = head_start + head_len
            frames.append((decode(buf[head_start:body_start]), bytes(buf[body_start:stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return frames
