"""sd_notify without libsystemd: real datagram sockets, as systemd binds them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poller import sdnotify
from poller.logs import JsonLog


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace, named as systemd names it ("@...")."""
    name = f"@poller-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(2)
    try:
        yield name, sock
    finally:
        sock.close()


def test_address_from_the_environment() -> None:
    assert sdnotify.socket_address({}) is None
    assert sdnotify.socket_address({"NOTIFY_SOCKET": ""}) is None
    assert sdnotify.socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == (
        "/run/systemd/notify"
    )
    assert sdnotify.socket_address({"NOTIFY_SOCKET": "@x/y"}) == "\0x/y"


def test_notify_reaches_an_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    name, sock = abstract_socket
    sdnotify.Notifier(JsonLog(io.BytesIO()), {"NOTIFY_SOCKET": name}).notify("A=1", "B=two")
    assert sock.recv(4096) == b"A=1\nB=two"


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        sdnotify.Notifier(JsonLog(io.BytesIO()), {"NOTIFY_SOCKET": str(path)}).stopping(30)
        assert sock.recv(4096) == (
            b"STOPPING=1\nSTATUS=draining: in-flight invokes have up to 30 s"
        )


def test_a_failed_send_is_logged_not_raised(tmp_path: Path) -> None:
    out = io.BytesIO()
    gone = tmp_path / "no-such-socket"
    sdnotify.Notifier(JsonLog(out), {"NOTIFY_SOCKET": str(gone)}).notify("READY=1")
    record = json.loads(out.getvalue())
    assert record["level"] == "WARN"
    assert str(gone) in record["message"] and record["sent"] == ["READY=1"]


async def test_ready_is_sent_once_the_condition_holds(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    name, sock = abstract_socket
    sock.setblocking(False)
    answers: list[tuple[bool, dict[str, Any]]] = [
        (False, {"runners": 2, "problems": {}}),
        (False, {"runners": 2, "problems": {}}),
        (True, {"runners": 2, "problems": {"u": "PROBLEM: x"}}),
    ]
    asked = 0

    def ready() -> tuple[bool, dict[str, Any]]:
        nonlocal asked
        asked += 1
        return answers[min(asked, len(answers)) - 1]

    notifier = sdnotify.Notifier(JsonLog(io.BytesIO()), {"NOTIFY_SOCKET": name})
    task = asyncio.create_task(notifier.ready_when(ready))
    await asyncio.sleep(sdnotify.READY_POLL_S * 1.5)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # not ready yet: nothing sent
    await asyncio.wait_for(task, 2)
    assert asked == 3
    assert sock.recv(4096) == (
        b"READY=1\nSTATUS=running 2 mapping(s); 1 with a problem (see /readyz)"
    )


async def test_without_systemd_nothing_is_polled() -> None:
    def ready() -> tuple[bool, dict[str, Any]]:
        raise AssertionError("polled although NOTIFY_SOCKET is unset")

    await asyncio.wait_for(sdnotify.Notifier(JsonLog(io.BytesIO()), {}).ready_when(ready), 1)
