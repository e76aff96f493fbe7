"""A real `poller run` tells a notify socket (as systemd binds one for Type=notify) READY=1 only
once /readyz would answer ready, and STOPPING=1 when SIGTERM starts the drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

from tests.daemon_helpers import POLLER, DaemonProcess, cli, wait_for
from tests.servers import free_port


def receive(sock: socket.socket, timeout: float) -> bytes | None:
    """The next datagram, or None if none arrives within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def test_ready_after_every_runner_started_and_stopping_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"
        shutdown_grace_s = 5

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        """
        )
    )
    (tmp_path / "noop.py").write_text("def handler(event, context):\n    return None\n")
    # A mapping whose source refuses connections: its runner cannot start, so the daemon is
    # not ready (the runner retries) until the mapping is disabled.
    closed = f"redis-queue://127.0.0.1:{free_port()}/jobs"
    uuid = json.loads(
        cli(
            config, "mappings", "create", "--function-name", "noop", "--event-source-arn", closed
        ).stdout
    )["UUID"]

    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        daemon = DaemonProcess(config, port)
        daemon.log = daemon.log_path.open("ab")
        daemon.proc = subprocess.Popen(
            [*POLLER, "run", "--config", str(config)],
            stdout=daemon.log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )
        try:
            wait_for(lambda: _answers(daemon), 30, "the HTTP endpoint")
            assert daemon.http("/readyz")[0] == 503
            early = receive(sock, 2)
            assert early is None, f"sent while a runner was still starting: {early!r}"
            assert daemon.http("/readyz")[0] == 503

            cli(config, "mappings", "disable", uuid)
            ready = receive(sock, 10)
            assert ready == b"READY=1\nSTATUS=running 0 mapping(s)", ready
            assert daemon.http("/readyz")[0] == 200

            daemon.proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, 5)
            assert stopping is not None and stopping.startswith(b"STOPPING=1\n"), stopping
            assert daemon.proc.wait(30) == 0, daemon.logs()[-3000:]
        finally:
            daemon.stop(signal.SIGKILL)  # closes the log; kills only a daemon still running


def _answers(daemon: DaemonProcess) -> bool:
    assert daemon.proc is not None
    if daemon.proc.poll() is not None:
        raise AssertionError(f"daemon exited early:\n{daemon.logs()[-3000:]}")
    try:
        daemon.http("/healthz")
    except OSError:
        return False
    return True
