"""End to end: a real `poller run` process, mappings changed with the real CLI while it runs,
real worker processes, and local:// or SQS (moto over HTTP) queues."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_helpers import POLLER, DaemonProcess, cli, wait_for
from tests.servers import free_port

HANDLER = textwrap.dedent(
    """
    import json, os

    def handle(event, context):
        failures = []
        lines = []
        for r in event["Records"]:
            body = r["body"]
            count = int(r["attributes"]["ApproximateReceiveCount"])
            if body == "poison":
                failures.append({"itemIdentifier": r["messageId"]})
            elif body.startswith("flaky") and count == 1:
                failures.append({"itemIdentifier": r["messageId"]})
            else:
                lines.append(body + "\\n")
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(lines))
        return {"batchItemFailures": failures}

    def slow(event, context):
        import time
        time.sleep(float(os.environ.get("SLEEP", "2")))
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(r["body"] + "\\n")
    """
)


def write_config(tmp: Path, http_port: int, extra: str = "", **function: str) -> Path:
    (tmp / "e2e_handler.py").write_text(HANDLER)
    out = tmp / "handled.txt"
    env = {"OUT": str(out), **function}
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    config = tmp / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{http_port}"
            shutdown_grace_s = 20
            reconcile_interval_s = 0.5

            [[functions]]
            name = "handle"
            handler = "e2e_handler.handle"
            timeout_s = 10
            environment = {{ {env_toml} }}

            [[functions]]
            name = "slow"
            handler = "e2e_handler.slow"
            timeout_s = 10
            environment = {{ {env_toml} }}
            """
        )
        + extra
    )
    return config


def handled(tmp: Path) -> list[str]:
    out = tmp / "handled.txt"
    return out.read_text().splitlines() if out.exists() else []


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(config: Path, port: int) -> DaemonProcess:
        daemon = DaemonProcess(config, port)
        daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


def _bodies(n: int) -> list[str]:
    return [f"flaky-{i}" if i % 7 == 0 else f"msg-{i}" for i in range(n)]


def test_local_queue_end_to_end_nothing_lost(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    daemon = daemon_factory(config, port)
    source = "local://jobs?visibility_timeout=1&max_receive_count=3"
    created = json.loads(
        cli(
            config,
            "mappings",
            "create",
            "--function-name",
            "handle",
            "--event-source-arn",
            source,
            "--batch-size",
            "50",
            "--maximum-batching-window-in-seconds",
            "1",
            "--function-response-types",
            "ReportBatchItemFailures",
        ).stdout
    )
    assert created["State"] == "Enabled" and len(created["UUID"]) == 36
    bodies = _bodies(1000)
    (tmp_path / "bodies.txt").write_text("\n".join(bodies) + "\npoison\n")
    cli(config, "send", "local://jobs", "--file", str(tmp_path / "bodies.txt"))

    wait_for(lambda: len(handled(tmp_path)) >= 1000, 90, "1000 messages handled")
    dlq_script = textwrap.dedent(
        f"""
        import asyncio, json
        from poller.state.sqlite import SqliteStore
        from poller.sources.local.queue import LocalQueue
        async def main():
            store = SqliteStore("sqlite:///{tmp_path}/.poller/state.db")
            await store.open()
            for name in ("jobs", "jobs-dlq"):
                q = LocalQueue(store, name)
                print(json.dumps([m.body for m in await q.peek(10000)]))
            await store.close()
        asyncio.run(main())
        """
    )

    def queues() -> tuple[list[str], list[str]]:
        out = subprocess.run(
            [sys.executable, "-c", dlq_script], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        return json.loads(out[0]), json.loads(out[1])

    wait_for(lambda: queues() == ([], ["poison"]), 30, "poison message in the DLQ")
    counts = Counter(handled(tmp_path))
    assert set(counts) == set(bodies)
    assert all(c == 1 for c in counts.values()), [b for b, c in counts.items() if c > 1]

    status, text = daemon.http("/metrics")
    assert status == 200
    uuid = created["UUID"]
    assert f'poller_deleted_events_total{{function="handle",mapping="{uuid}"}} 1000.0' in text
    assert f'poller_dead_lettered_events_total{{function="handle",mapping="{uuid}"}} 1.0' in text
    assert "poller_invoke_duration_seconds_bucket" in text
    assert daemon.stop() == 0
    types = Counter(r.get("type") for r in daemon.log_records())
    assert types["platform.start"] == types["platform.runtimeDone"] == types["platform.report"] > 0


def test_mapping_changes_reach_running_daemon(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    daemon = daemon_factory(config, port)
    uuid = json.loads(
        cli(
            config,
            "mappings",
            "create",
            "--function-name",
            "handle",
            "--event-source-arn",
            "local://live",
        ).stdout
    )["UUID"]
    cli(config, "send", "local://live", "--body", "one")
    wait_for(lambda: handled(tmp_path) == ["one"], 5, "created mapping to run")

    assert json.loads(cli(config, "mappings", "disable", uuid).stdout)["State"] == "Disabled"
    time.sleep(2.5)  # the daemon must have stopped the runner by now
    cli(config, "send", "local://live", "--body", "two")
    time.sleep(1.5)
    assert handled(tmp_path) == ["one"]

    cli(config, "mappings", "enable", uuid)
    wait_for(lambda: handled(tmp_path) == ["one", "two"], 5, "re-enabled mapping to run")

    table = cli(config, "mappings", "list", "--output", "table").stdout
    assert uuid in table and "local://live" in table
    assert f'mapping="{uuid}"' in daemon.http("/metrics")[1]

    cli(config, "mappings", "delete", uuid)
    time.sleep(2.5)
    # A deleted mapping's series are gone, not frozen at their last value forever.
    assert f'mapping="{uuid}"' not in daemon.http("/metrics")[1]
    cli(config, "send", "local://live", "--body", "three")
    time.sleep(1.5)
    assert handled(tmp_path) == ["one", "two"]
    missing = cli(config, "mappings", "get", uuid, check=False)
    assert missing.returncode == 1 and "ResourceNotFoundException" in missing.stderr
    assert daemon.stop() == 0


def test_sigterm_drains_in_flight_batch(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    extra = textwrap.dedent(
        """
        [[mappings]]
        name = "slow-jobs"
        function_name = "slow"
        event_source_arn = "local://slowq"
        """
    )
    config = write_config(tmp_path, port, extra, SLEEP="3")
    daemon = daemon_factory(config, port)
    cli(config, "send", "local://slowq", "--body", "drain-me")
    wait_for(
        lambda: any(r.get("type") == "platform.start" for r in daemon.log_records()),
        10,
        "the slow invoke to start",
    )
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started >= 1.5  # it waited for the invoke
    assert handled(tmp_path) == ["drain-me"]
    # Deleted: a new daemon finds nothing to redeliver.
    daemon2 = daemon_factory(config, port)
    time.sleep(2.5)
    assert handled(tmp_path) == ["drain-me"]
    assert daemon2.stop() == 0


def test_http_endpoints(tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    daemon = daemon_factory(config, port)
    assert daemon.http("/healthz") == (200, '{"status": "ok"}')
    status, body = daemon.http("/readyz")
    assert status == 200 and json.loads(body)["store"] is True
    status, text = daemon.http("/metrics")
    assert status == 200 and "poller_environments" in text
    assert daemon.stop() == 0


def test_bad_config_and_unreachable_store_exit_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[functions]]\nname = "f"\nhandler = "m.h"\nmemory_mb = 64\n')
    result = subprocess.run(
        [*POLLER, "run", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "functions[0].memory_mb" in result.stderr and str(bad) in result.stderr

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    store = tmp_path / "store.toml"
    store.write_text(
        f'[state]\nurl = "sqlite:///{blocked}/sub/state.db"\n'
        f'[daemon]\nhttp_listen = "127.0.0.1:{free_port()}"\n'
    )
    result = subprocess.run(
        [*POLLER, "run", "--config", str(store)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "state store" in result.stdout


def test_sqs_end_to_end_with_native_redrive(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess], aws_env: Any
) -> None:
    from aiobotocore.session import get_session

    async def make_queues() -> str:
        session = get_session()
        async with session.create_client("sqs", **aws_env.client_kwargs()) as sqs:
            dlq = await sqs.create_queue(QueueName="e2e-dlq")
            attrs = await sqs.get_queue_attributes(
                QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"]
            )
            await sqs.create_queue(
                QueueName="e2e",
                Attributes={
                    "VisibilityTimeout": "4",
                    "RedrivePolicy": json.dumps(
                        {
                            "deadLetterTargetArn": attrs["Attributes"]["QueueArn"],
                            "maxReceiveCount": "3",
                        }
                    ),
                },
            )
            return str(dlq["QueueUrl"])

    async def dlq_bodies(url: str) -> list[str]:
        session = get_session()
        async with session.create_client("sqs", **aws_env.client_kwargs()) as sqs:
            got = await sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0
            )
            return [m["Body"] for m in got.get("Messages", [])]

    dlq_url = asyncio.run(make_queues())
    port = free_port()
    extra = textwrap.dedent(
        f"""
        [aws]
        endpoint_url = "{aws_env.endpoint_url}"
        region = "us-east-1"
        account = "123456789012"
        """
    )
    config = write_config(tmp_path, port, extra)
    env_backup = dict(os.environ)
    try:
        daemon = daemon_factory(config, port)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    cli(
        config,
        "mappings",
        "create",
        "--function-name",
        "handle",
        "--event-source-arn",
        "sqs://e2e",
        "--batch-size",
        "10",
        "--function-response-types",
        "ReportBatchItemFailures",
    )
    bodies = _bodies(300)
    (tmp_path / "bodies.txt").write_text("\n".join(bodies) + "\npoison\n")
    cli(config, "send", "sqs://e2e", "--file", str(tmp_path / "bodies.txt"))
    wait_for(lambda: len(handled(tmp_path)) >= 300, 90, "300 messages handled")
    wait_for(lambda: asyncio.run(dlq_bodies(dlq_url)) == ["poison"], 30, "poison in the DLQ")
    counts = Counter(handled(tmp_path))
    assert set(counts) == set(bodies)
    assert all(c == 1 for c in counts.values())
    assert daemon.stop() == 0


def test_second_signal_exits_at_once_and_nothing_is_lost(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    extra = textwrap.dedent(
        """
        [[mappings]]
        name = "slow-jobs"
        function_name = "slow"
        event_source_arn = "local://slowq?visibility_timeout=2"
        """
    )
    config = write_config(tmp_path, port, extra, SLEEP="4")
    daemon = daemon_factory(config, port)
    cli(config, "send", "local://slowq", "--body", "interrupted")
    wait_for(
        lambda: any(r.get("type") == "platform.start" for r in daemon.log_records()),
        10,
        "the slow invoke to start",
    )
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 1
    assert time.monotonic() - started < 2  # did not wait for the 4 s invoke
    assert handled(tmp_path) == []
    # The unsettled message comes back after its visibility timeout.
    daemon2 = daemon_factory(config, port)
    wait_for(lambda: handled(tmp_path) == ["interrupted"], 20, "redelivery after restart")
    assert daemon2.stop() == 0


def test_declared_mapping_is_upserted_by_name(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    mapping = textwrap.dedent(
        """
        [[mappings]]
        name = "declared"
        function_name = "handle"
        event_source_arn = "local://declared"
        batch_size = {size}
        """
    )
    config = write_config(tmp_path, port, mapping.format(size=5))
    daemon_factory(config, port).stop()
    first = json.loads(cli(config, "mappings", "list").stdout)["EventSourceMappings"]
    assert [(m["Name"], m["BatchSize"]) for m in first] == [("declared", 5)]
    config.write_text(config.read_text().replace("batch_size = 5", "batch_size = 7"))
    daemon_factory(config, port).stop()
    second = json.loads(cli(config, "mappings", "list").stdout)["EventSourceMappings"]
    assert [(m["UUID"], m["BatchSize"]) for m in second] == [(first[0]["UUID"], 7)]


def test_send_count_and_progress(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    result = cli(config, "send", "local://bulk", "--body", "x", "--count", "1500")
    assert "sent 1500 message(s)" in result.stderr
    assert "sending to local://bulk" in result.stderr  # the progress bar
    bad = cli(config, "send", "local://bulk", check=False)
    assert bad.returncode == 2 and "--body or --file" in bad.stderr


def test_readme_quick_start(tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]) -> None:
    import shutil

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "handlers", tmp_path / "handlers")
    port = free_port()
    text = (root / "config.example.toml").read_text()
    text = text.replace('# http_listen = "127.0.0.1:9102"', f'http_listen = "127.0.0.1:{port}"')
    config = tmp_path / "config.example.toml"
    config.write_text(text)
    daemon = daemon_factory(config, port)
    cli(config, "send", "local://orders", "--body", '{"id": 1}')
    wait_for(
        lambda: any(
            r.get("type") == "platform.report"
            and r.get("function") == "validate"
            and r.get("status") == "success"
            for r in daemon.log_records()
        ),
        10,
        "the example mapping to invoke handlers.validate",
    )
    _, text = daemon.http("/metrics")
    assert 'poller_deleted_events_total{function="validate"' in text
    assert daemon.stop() == 0
