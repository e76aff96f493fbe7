"""What every contender's job does: note when it started, beside when it was enqueued.

One fixed-width line per job, ``SENT START\\n`` (wall-clock seconds, 36 bytes), appended to
the file named by ``PEERS_OUT``. The harness counts jobs from the file's size alone, so it can
watch a drain without reading the file, and computes latency as START - SENT afterwards.
An O_APPEND write of one short line is atomic with respect to other appenders, so every
process and thread of a worker can share the file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

LINE_BYTES = 36
_fd: int | None = None


def _out() -> int:
    global _fd
    # Opened on first use, so a pool that forks after import gives each child its own.
    if _fd is None:
        _fd = os.open(os.environ["PEERS_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


def record(sent: float) -> None:
    os.write(_out(), b"%17.6f %17.6f\n" % (sent, time.time()))


def record_many(sent: Iterable[float]) -> None:
    """A batch of jobs that started together: one line each, one write."""
    now = time.time()
    os.write(_out(), b"".join(b"%17.6f %17.6f\n" % (s, now) for s in sent))
