"""Two daemons sharing one Redis: one registry, one consumer group, each entry handled once."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import free_port

HANDLER = textwrap.dedent(
    """
    import os

    def handler(event, context):
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(f"{os.getppid()} {r['body']}\\n" for r in event["Records"]))
    """
)


def _config(tmp: Path, name: str, redis_url: str) -> tuple[Path, int]:
    port = free_port()
    directory = tmp / name
    directory.mkdir()
    (directory / "fleet_handler.py").write_text(HANDLER)
    config = directory / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"

        [state]
        url = "{redis_url}"
        key_prefix = "fleet-test:"

        [[functions]]
        name = "fleet"
        handler = "fleet_handler.handler"
        environment = {{ OUT = "{tmp / "handled.txt"}" }}
        """
        )
    )
    return config, port


def test_two_daemons_share_registry_and_group(tmp_path: Path, redis_url: str) -> None:
    config_a, port_a = _config(tmp_path, "a", redis_url)
    config_b, port_b = _config(tmp_path, "b", redis_url)
    daemons = [DaemonProcess(config_a, port_a), DaemonProcess(config_b, port_b)]
    try:
        for daemon in daemons:
            daemon.start()
        source = redis_url.replace("redis://", "redis-queue://") + "/jobs?start=0"
        created = json.loads(
            cli(
                config_a,
                "mappings",
                "create",
                "--function-name",
                "fleet",
                "--event-source-arn",
                source,
                "--batch-size",
                "5",
            ).stdout
        )
        created_at = time.time()
        # Daemon B sees the mapping daemon A's CLI wrote.
        listed = json.loads(cli(config_b, "mappings", "list").stdout)["EventSourceMappings"]
        assert [m["UUID"] for m in listed] == [created["UUID"]]

        def started_at(daemon: DaemonProcess) -> float | None:
            return next(
                (
                    datetime.fromisoformat(r["timestamp"]).timestamp()
                    for r in daemon.log_records()
                    if r.get("message") == "mapping runner started"
                ),
                None,
            )

        for daemon in daemons:
            wait_for(lambda d=daemon: started_at(d) is not None, 10, "runner start")
            # Both daemons act on the CLI's change within 2 s (the registry's revision poll).
            assert started_at(daemon) - created_at < 2  # type: ignore[operator]
        bodies = [f"entry-{i}" for i in range(2000)]
        (tmp_path / "bodies.txt").write_text("\n".join(bodies) + "\n")
        cli(config_a, "send", source, "--file", str(tmp_path / "bodies.txt"))

        out = tmp_path / "handled.txt"

        def lines() -> list[tuple[str, str]]:
            text = out.read_text() if out.exists() else ""
            return [tuple(line.split(" ", 1)) for line in text.splitlines()]  # type: ignore[misc]

        wait_for(lambda: len(lines()) >= 2000, 60, "2000 entries handled")
        counts = Counter(body for _, body in lines())
        assert set(counts) == set(bodies)
        assert all(c == 1 for c in counts.values())
        pids = {pid for pid, _ in lines()}
        assert pids == {str(d.proc.pid) for d in daemons if d.proc is not None}
        for daemon in daemons:
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop(signal.SIGKILL)
