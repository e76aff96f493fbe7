"""`poller status`, /status, and a mapping's PROBLEM shown with its cause everywhere an operator
looks: a real daemon, real workers, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_helpers import POLLER, DaemonProcess, cli, wait_for
from tests.servers import free_port

HANDLER = textwrap.dedent(
    """
    def handle(event, context):
        return {}
    """
)


def _config(tmp: Path, port: int) -> Path:
    (tmp / "ok_handler.py").write_text(HANDLER)
    config = tmp / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            reconcile_interval_s = 0.5

            [[functions]]
            name = "ok"
            handler = "ok_handler.handle"

            [[functions]]
            name = "broken"
            handler = "no_such_module.handle"

            [[mappings]]
            name = "orders"
            function_name = "ok"
            event_source_arn = "local://orders"
            """
        )
    )
    return config


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    port = free_port()
    process = DaemonProcess(_config(tmp_path, port), port)
    process.start()
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.stop(signal.SIGKILL)


def _status(daemon: DaemonProcess) -> dict[str, Any]:
    result = cli(daemon.config, "status", "--output", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _mapping(document: dict[str, Any], uuid: str) -> dict[str, Any]:
    found = [m for m in document["mappings"] if m["uuid"] == uuid]
    assert found, f"{uuid} not in {document['mappings']}"
    return found[0]


def _create(daemon: DaemonProcess, function: str, source: str) -> str:
    result = cli(
        daemon.config,
        "mappings",
        "create",
        "--function-name",
        function,
        "--event-source-arn",
        source,
    )
    uuid: str = json.loads(result.stdout)["UUID"]
    return uuid


def _problem_gauges(daemon: DaemonProcess) -> dict[str, float]:
    gauges = {}
    for line in daemon.http("/metrics")[1].splitlines():
        if line.startswith("poller_mapping_problem{"):
            labels, value = line.rsplit(" ", 1)
            uuid = labels.split('mapping="', 1)[1].split('"', 1)[0]
            gauges[uuid] = float(value)
    return gauges


def test_status_shows_every_mapping_and_each_function_environments(
    daemon: DaemonProcess,
) -> None:
    cli(daemon.config, "send", "local://orders", "--body", "one", "--count", "3")
    orders = json.loads(cli(daemon.config, "mappings", "list").stdout)["EventSourceMappings"][0]
    wait_for(
        lambda: _mapping(_status(daemon), orders["UUID"])["lastProcessingResult"] == "OK",
        30,
        "the orders mapping to process its messages",
    )
    disabled = _create(daemon, "ok", "local://paused")
    cli(daemon.config, "mappings", "disable", disabled)
    wait_for(
        lambda: _mapping(_status(daemon), disabled)["state"] == "disabled", 30, "the disabled one"
    )

    document = _status(daemon)
    assert document["daemon"]["ready"] is True and document["daemon"]["state"] == "running"
    assert "\npoller_daemon_ready 1.0\n" in daemon.http("/metrics")[1]
    assert daemon.proc is not None and document["daemon"]["pid"] == daemon.proc.pid
    entry = _mapping(document, orders["UUID"])
    assert entry["name"] == "orders" and entry["state"] == "running"
    assert entry["eventSource"] == "local://orders" and entry["functionName"] == "ok"
    assert entry["backlog"] == 0 and entry["problem"] is False
    assert entry["concurrencyTarget"] >= 1
    functions = {f["name"]: f for f in document["functions"]}
    started = [e for e in functions["ok"]["environments"] if e["pid"] is not None]
    assert started and all(e["initMs"] is not None for e in started)
    assert sum(e["invokes"] for e in started) >= 1
    assert functions["broken"]["environments"] == []

    table = cli(daemon.config, "status").stdout
    assert "ready" in table.splitlines()[0] and "NOT READY" not in table
    orders_line = next(line for line in table.splitlines() if orders["UUID"] in line)
    assert orders_line.split()[:3] == ["orders", orders["UUID"], "running"]
    assert "local://orders" in orders_line and orders_line.rstrip().endswith("OK")
    assert "disabled" in next(line for line in table.splitlines() if disabled in line)
    assert any(
        line.startswith("broken") and "no environments" in line for line in table.split("\n")
    )
    env_line = next(line for line in table.splitlines() if str(started[0]["pid"]) in line)
    assert env_line.startswith("ok ") and started[0]["id"] in env_line


def test_each_kind_of_problem_shows_why_in_status_readyz_get_and_a_metric(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    unknown = _create(daemon, "nosuch", "local://unknown-fn")
    cannot_start = _create(daemon, "broken", "local://broken-fn")
    closed_port = free_port()
    unreachable = _create(daemon, "ok", f"redis-queue://127.0.0.1:{closed_port}/events")
    cli(daemon.config, "send", "local://broken-fn", "--body", "x")
    orders = json.loads(cli(daemon.config, "mappings", "list", "--function-name", "ok").stdout)
    healthy = next(m["UUID"] for m in orders["EventSourceMappings"] if m["Name"] == "orders")

    def all_shown() -> bool:
        document = _status(daemon)
        return all(_mapping(document, u)["problem"] for u in (unknown, cannot_start, unreachable))

    wait_for(all_shown, 60, "the three problems in `poller status`")
    document = _status(daemon)
    assert _mapping(document, unknown)["state"] == "not running"
    assert "function 'nosuch' is not defined" in _mapping(document, unknown)["lastProcessingResult"]
    broken = _mapping(document, cannot_start)
    assert broken["lastProcessingResult"] == "PROBLEM: Function call failed"
    assert broken["lastError"].startswith("Runtime.ImportModuleError: ")
    assert "no_such_module" in broken["lastError"]
    down = _mapping(document, unreachable)
    assert down["state"] == "starting"
    assert f"127.0.0.1:{closed_port}" in down["lastError"]
    assert "Connection refused" in down["lastProcessingResult"]
    assert _mapping(document, healthy)["problem"] is False

    table = cli(daemon.config, "status").stdout
    broken_line = next(line for line in table.splitlines() if cannot_start in line)
    assert "PROBLEM: Function call failed (Runtime.ImportModuleError" in broken_line

    _, body = daemon.http("/readyz")
    problems = json.loads(body)["problems"]
    assert set(problems) == {unknown, cannot_start, unreachable}
    assert "Runtime.ImportModuleError" in problems[cannot_start]
    assert "Connection refused" in problems[unreachable]

    # The unreachable source keeps its runner starting: not ready, and the metric says so.
    assert "\npoller_daemon_ready 0.0\n" in daemon.http("/metrics")[1]
    gauges = _problem_gauges(daemon)
    assert gauges[unknown] == gauges[cannot_start] == gauges[unreachable] == 1
    assert gauges.get(healthy, 0) == 0

    def stored_error() -> Any:
        shown = json.loads(cli(daemon.config, "mappings", "get", cannot_start).stdout)
        return shown.get("LastError")

    wait_for(stored_error, 30, "LastError in `poller mappings get`")
    shown = json.loads(cli(daemon.config, "mappings", "get", cannot_start).stdout)
    assert shown["LastProcessingResult"] == "PROBLEM: Function call failed"
    assert shown["LastError"].startswith("Runtime.ImportModuleError")
    as_table = cli(daemon.config, "mappings", "get", cannot_start, "--output", "table").stdout
    assert "LastError: Runtime.ImportModuleError" in as_table
    unknown_shown = json.loads(cli(daemon.config, "mappings", "get", unknown).stdout)
    assert "is not defined" in unknown_shown["LastProcessingResult"]

    # A mapping that is gone takes its problem series with it.
    cli(daemon.config, "mappings", "delete", unknown)
    wait_for(lambda: unknown not in _problem_gauges(daemon), 30, "the deleted mapping's series")
    assert unknown not in json.loads(daemon.http("/readyz")[1])["problems"]


def test_status_of_a_daemon_that_is_not_running_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    result = cli(config, "status", check=False)
    assert result.returncode == 1
    assert f"no poller daemon answers at http://127.0.0.1:{port}" in result.stderr
    assert "[daemon] http_listen" in result.stderr and str(config) in result.stderr


def _interruptible() -> None:
    """In the watcher, before it starts: SIGINT as a terminal delivers it. A suite started in
    the background by a shell (``pytest &``) passes SIGINT on ignored, and Python then leaves
    it ignored, so the watcher would not stop on the SIGINT these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_redraws_in_place_and_survives_a_restart(
    daemon: DaemonProcess,
) -> None:
    out = daemon.config.parent / "watch.out"
    with out.open("wb") as sink:
        watcher = subprocess.Popen(
            [*POLLER, "status", "--watch", "--interval", "0.3", "--config", str(daemon.config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=daemon.config.parent,
            preexec_fn=_interruptible,
        )
        try:
            wait_for(lambda: out.read_bytes().count(b"\x1b[H") >= 2, 30, "two frames")
            assert daemon.stop() == 0
            wait_for(lambda: b"no poller daemon answers" in out.read_bytes(), 30, "the outage")
            frames_before = out.read_bytes().count(b"\x1b[H")
            daemon.start()
            wait_for(
                lambda: (
                    out.read_bytes().count(b"\x1b[H") > frames_before + 1
                    and out.read_bytes().rsplit(b"\x1b[H", 1)[1].find(b"orders") >= 0
                ),
                30,
                "frames of the restarted daemon",
            )
        finally:
            watcher.send_signal(signal.SIGINT)
            code = watcher.wait(30)
    assert code == 0
    text = out.read_bytes().decode()
    assert text.startswith("\x1b[2J\x1b[H")
    last = text.rsplit("\x1b[H", 1)[1]
    assert "Ctrl-C to stop" in last and "orders" in last and "running" in last


def test_watch_json_prints_one_document_per_line(daemon: DaemonProcess) -> None:
    watcher = subprocess.Popen(
        [*POLLER, "status", "-w", "--interval", "0.2", "-o", "json", "-c", str(daemon.config)],
        stdout=subprocess.PIPE,
        cwd=daemon.config.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_interruptible,
    )
    assert watcher.stdout is not None
    lines = [watcher.stdout.readline(), watcher.stdout.readline()]
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(30) == 0
    documents = [json.loads(line) for line in lines]
    assert all(d["mappings"][0]["name"] == "orders" for d in documents)
    assert documents[1]["daemon"]["uptimeSeconds"] >= documents[0]["daemon"]["uptimeSeconds"]
