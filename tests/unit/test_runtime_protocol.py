"""Framing between the daemon and a worker (poller.runtime.protocol)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from poller.runtime import protocol


def test_invoke_frame_round_trips() -> None:
    cc = json.dumps({"custom": {"k": "v"}}).encode()
    data = protocol.invoke_frame("req-é-1", 1_795_000_000_123, "arn:aws:lambda:x", cc, b'{"a":1}')
    head_len, body_len = protocol.PREFIX.unpack_from(data)
    assert len(data) == protocol.PREFIX_SIZE + head_len + body_len
    head = data[protocol.PREFIX_SIZE : protocol.PREFIX_SIZE + head_len]
    assert protocol.parse_invoke(head) == ("req-é-1", 1_795_000_000_123, "arn:aws:lambda:x", cc)
    assert data[protocol.PREFIX_SIZE + head_len :] == b'{"a":1}'


def test_invoke_frame_without_client_context_or_event() -> None:
    data = protocol.invoke_frame("r", 5, "arn", None, b"")
    head_len, body_len = protocol.PREFIX.unpack_from(data)
    assert body_len == 0
    head = data[protocol.PREFIX_SIZE : protocol.PREFIX_SIZE + head_len]
    assert protocol.parse_invoke(head) == ("r", 5, "arn", None)


def _frames() -> tuple[bytes, list[tuple[dict, bytes]]]:
    expected = [
        ({"t": "ready", "init_ms": 12.5}, b""),
        ({"t": "result", "ok": True, "rss_kb": 2048}, b'{"big": "' + b"z" * 100_000 + b'"}'),
        ({"t": "result", "ok": False, "rss_kb": 1}, b"null"),
    ]
    return b"".join(protocol.frame(h, b) for h, b in expected), expected


def test_frame_reader_whole_frames_in_one_chunk() -> None:
    data, expected = _frames()
    assert protocol.FrameReader().feed(data) == expected


@pytest.mark.parametrize("chunk", [1, 7, 8, 9, 4096, 65536])
def test_frame_reader_any_split(chunk: int) -> None:
    data, expected = _frames()
    reader = protocol.FrameReader()
    got: list[tuple[dict, bytes]] = []
    for start in range(0, len(data), chunk):
        got.extend(reader.feed(data[start : start + chunk]))
    assert got == expected


def test_worker_hand_written_headers_are_json() -> None:
    # The worker writes its headers with bytes formatting; the daemon parses them as JSON.
    reader = protocol.FrameReader()
    data = protocol.pack(b'{"t":"result","ok":true,"rss_kb":%d}' % 123, b"1")
    assert reader.feed(data) == [({"t": "result", "ok": True, "rss_kb": 123}, b"1")]
    ready = protocol.pack(b'{"t":"ready","init_ms":%.3f,"rss_kb":%d}' % (1.5, 9))
    assert reader.feed(ready) == [({"t": "ready", "init_ms": 1.5, "rss_kb": 9}, b"")]


def test_worker_side_imports_stay_cheap() -> None:
    # Every cold start pays for what the worker imports: no msgspec, no typing.
    code = (
        "import sys; import poller.runtime.worker; "
        "print(sorted(m for m in ('msgspec', 'typing', 'traceback', 'decimal') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
