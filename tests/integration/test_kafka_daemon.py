"""kafka:// end to end: real `poller run` processes, mappings made with the real CLI, records
sent with `poller send`: a daemon killed mid-batch, and two daemons sharing one consumer group."""

from __future__ import annotations

import json
import signal
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.integration.kafka_harness import (
    committed,
    create_topic,
    produce,
    read_topic,
    unique,
)
from tests.servers import free_port

HANDLER = textwrap.dedent(
    """
    import base64, json, os, time

    def handle(event, context):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        with open(os.environ["OUT"], "a") as f:
            for key, records in event["records"].items():
                for r in records:
                    f.write(json.dumps({
                        "daemon": os.environ["DAEMON"], "shard": key, "offset": r["offset"],
                        "body": base64.b64decode(r["value"]).decode(),
                        "request": context.aws_request_id,
                    }) + "\\n")
    """
)


def _config(directory: Path, name: str, port: int, sleep: float, out: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kafka_e2e.py").write_text(HANDLER)
    config = directory / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            shutdown_grace_s = 20
            reconcile_interval_s = 0.5

            [kafka]
            # tansu holds a group join for half the session timeout: keep it short.
            session_timeout_ms = 6000
            heartbeat_interval_ms = 1000
            max_poll_interval_ms = 6000

            [[functions]]
            name = "handle"
            handler = "kafka_e2e.handle"
            timeout_s = 10
            environment = {{ OUT = "{out}", SLEEP = "{sleep}", DAEMON = "{name}" }}
            """
        )
    )
    return config


def _handled(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().split("\n")[:-1]]


def _create(config: Path, uri: str, group: str, *extra: str) -> dict[str, Any]:
    created: dict[str, Any] = json.loads(
        cli(
            config,
            "mappings",
            "create",
            "--function-name",
            "handle",
            "--event-source-arn",
            uri,
            "--starting-position",
            "TRIM_HORIZON",
            "--self-managed-kafka-event-source-config",
            json.dumps({"ConsumerGroupId": group}),
            *extra,
        ).stdout
    )
    return created


def _assigned(daemon: DaemonProcess) -> set[str]:
    """The partitions the daemon's last assignment gave it."""
    partitions: set[str] = set()
    for record in daemon.log_records():
        if record.get("message") == "Kafka partitions assigned":
            partitions = set(record["partitions"])
        elif record.get("message", "").startswith("Kafka partitions revoked"):
            partitions = set()
    return partitions


def test_kill_mid_batch_resumes_from_the_committed_offsets(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    topic, group = unique("e2e"), unique("grp")
    create_topic(kafka_bootstrap, topic, 2)
    uri = f"kafka://{kafka_bootstrap}/{topic}"
    out = tmp_path / "handled.jsonl"
    port = free_port()
    config = _config(tmp_path, "a", port, sleep=0.2, out=out)
    created = _create(config, uri, group, "--batch-size", "10")
    assert created["SelfManagedKafkaEventSourceConfig"] == {"ConsumerGroupId": group}
    assert created["Topics"] == [topic]
    for key in range(4):
        cli(config, "send", uri, "--body", f"k{key}", "--count", "100", "--key", f"key-{key}")
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        wait_for(lambda: len(_handled(out)) >= 60, 60, "some batches done")
        daemon.stop(signal.SIGKILL)  # mid-batch: a batch is sleeping in the handler
        before = len(_handled(out))
        daemon = DaemonProcess(config, port)
        daemon.start()
        wait_for(
            lambda: len({(r["shard"], r["offset"]) for r in _handled(out)}) == 400,
            120,
            "every record handled after the restart",
        )
        wait_for(
            lambda: (
                sum(v or 0 for v in committed(kafka_bootstrap, group, topic, 2).values()) == 400
            ),
            30,
            "every offset committed",
        )
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    records = _handled(out)
    # Nothing lost; duplicates only from the batches in flight at the kill (one per partition).
    assert len(records) - 400 <= 2 * 10
    assert before < len(records)
    for shard, offsets in _first_deliveries(records).items():
        assert offsets == sorted(offsets), shard


def test_two_daemons_split_the_partitions_and_take_over_from_each_other(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    topic, group = unique("fleet"), unique("grp")
    create_topic(kafka_bootstrap, topic, 4)
    uri = f"kafka://{kafka_bootstrap}/{topic}"
    out = tmp_path / "handled.jsonl"
    ports = {"a": free_port(), "b": free_port()}
    configs = {
        name: _config(tmp_path / name, name, ports[name], sleep=0.05, out=out) for name in ports
    }
    for config in configs.values():
        _create(config, uri, group, "--batch-size", "5")
    total = 0

    def send(count: int) -> None:
        nonlocal total
        produce(kafka_bootstrap, topic, [(f"k{i}", f"m{total + i}") for i in range(count)])
        total += count

    def all_handled() -> bool:
        return len({(r["shard"], r["offset"]) for r in _handled(out)}) == total

    a, b = DaemonProcess(configs["a"], ports["a"]), DaemonProcess(configs["b"], ports["b"])
    a.start()
    b.start()
    try:
        wait_for(
            lambda: len(_assigned(a)) == 2 and len(_assigned(b)) == 2, 60, "the partitions split"
        )
        assert _assigned(a) | _assigned(b) == {f"{topic}-{p}" for p in range(4)}
        send(200)
        wait_for(all_handled, 60, "the first records handled by both")
        assert {r["daemon"] for r in _handled(out)} == {"a", "b"}

        assert b.stop() == 0  # graceful: its partitions are committed and handed over
        wait_for(lambda: len(_assigned(a)) == 4, 60, "a took every partition")
        send(100)
        wait_for(all_handled, 60, "the records after b stopped")
        assert {r["daemon"] for r in _handled(out)[-100:]} == {"a"}

        b = DaemonProcess(configs["b"], ports["b"])
        b.start()
        wait_for(lambda: len(_assigned(b)) == 2, 60, "b back in the group")
        a.stop(signal.SIGKILL)  # killed: b takes over once a's session times out
        wait_for(lambda: len(_assigned(b)) == 4, 60, "b took every partition")
        send(100)
        wait_for(all_handled, 60, "the records after a was killed")
        assert b.stop() == 0
    finally:
        for daemon in (a, b):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop(signal.SIGKILL)
    records = _handled(out)
    assert len({int(r["body"][1:]) for r in records}) == total  # nothing lost
    for shard, offsets in _first_deliveries(records).items():
        assert offsets == sorted(offsets), shard


def test_send_with_key_and_headers_and_the_cli_options(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    topic = unique("send")
    create_topic(kafka_bootstrap, topic, 1)
    config = _config(tmp_path, "a", free_port(), sleep=0, out=tmp_path / "out.jsonl")
    uri = f"kafka://{kafka_bootstrap}/{topic}"
    sent = cli(config, "send", uri, "--body", "hello", "--key", "k1", "--header", "trace=t-1")
    assert f"sent 1 message(s) to {uri}" in sent.stderr
    [record] = read_topic(kafka_bootstrap, topic, 1)
    assert (record.key, record.value, record.headers) == (b"k1", b"hello", [("trace", b"t-1")])
    wrong = cli(config, "send", uri, "--body", "x", "--partition-key", "p", check=False)
    assert wrong.returncode == 2 and "takes --key" in wrong.stderr
    bad = cli(config, "send", uri, "--body", "x", "--header", "novalue", check=False)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
    msk = cli(
        config,
        "mappings",
        "create",
        "--function-name",
        "handle",
        "--event-source-arn",
        "arn:aws:kafka:us-east-1:123456789012:cluster/demo/abc",
        "--starting-position",
        "LATEST",
        check=False,
    )
    assert msk.returncode == 1 and "give the cluster's bootstrap brokers" in msk.stderr


def _first_deliveries(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    seen: set[tuple[str, int]] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for record in records:
        key = (record["shard"], record["offset"])
        if key not in seen:
            seen.add(key)
            out[record["shard"]].append(record["offset"])
    return out
