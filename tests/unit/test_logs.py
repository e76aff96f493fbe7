"""The daemon's one log path: JSON lines with Lambda's field names, honouring the level."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
from datetime import datetime

from poller.logs import FLUSH_BYTES, FLUSH_DELAY_S, JsonLog, timestamp

ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _records(stream: io.BytesIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_have_lambdas_names_and_an_iso_utc_timestamp() -> None:
    stream = io.BytesIO()
    log = JsonLog(stream)
    before = time.time()
    log.warning("disk nearly full", requestId="r-1")
    [record] = _records(stream)
    assert list(record)[:3] == ["timestamp", "level", "message"]
    assert ISO_MS.fullmatch(record["timestamp"])
    when = datetime.fromisoformat(record["timestamp"]).timestamp()
    assert before - 0.01 <= when <= time.time() + 0.01
    assert (record["level"], record["message"], record["requestId"]) == (
        "WARN",
        "disk nearly full",
        "r-1",
    )


def test_the_level_is_honoured() -> None:
    stream = io.BytesIO()
    log = JsonLog(stream, level="warning")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["level"] for r in _records(stream)] == ["WARN", "ERROR"]
    assert not log.enabled("info") and log.enabled("error")


def test_timestamp_is_utc_whatever_the_local_zone() -> None:
    code = "from poller.logs import timestamp; print(timestamp())"
    env = {"TZ": "Asia/Kolkata", "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert abs(datetime.fromisoformat(shown).timestamp() - time.time()) < 5
    assert abs(datetime.fromisoformat(timestamp()).timestamp() - time.time()) < 5


def test_nothing_in_poller_logs_outside_the_daemons_json_log() -> None:
    """One JSON-lines path: no stdlib logging, no module-level log that ignores the level."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "poller"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import logging" not in text, path
        assert "logging.getLogger" not in text, path
    import poller.logs

    assert not any(isinstance(v, JsonLog) for v in vars(poller.logs).values())


async def test_records_are_written_together_a_few_milliseconds_later_in_order() -> None:
    stream = io.BytesIO()
    log = JsonLog(stream)
    log.info("one")
    log.write(b'{"message":"two"}\n')
    await asyncio.sleep(0)
    assert stream.getvalue() == b""  # not one write per record or per loop turn
    await asyncio.sleep(FLUSH_DELAY_S * 4)
    assert [r["message"] for r in _records(stream)] == ["one", "two"]
    log.write(b"x" * FLUSH_BYTES + b"\n")  # a burst past the limit goes out at once
    assert len(stream.getvalue()) > FLUSH_BYTES


async def test_a_warning_is_written_at_once_with_what_came_before_it() -> None:
    stream = io.BytesIO()
    log = JsonLog(stream)
    log.info("before")
    log.warning("now")
    assert [r["message"] for r in _records(stream)] == ["before", "now"]


def test_records_waiting_for_their_timer_are_written_when_the_process_exits() -> None:
    code = (
        "import asyncio, sys\n"
        "from poller.logs import JsonLog\n"
        "async def main():\n"
        "    JsonLog(sys.stdout.buffer).info('last words')\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert json.loads(out)["message"] == "last words"
