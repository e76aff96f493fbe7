"""redis-stream end to end: a real `poller run`, mappings made with the real CLI, records sent
with `poller send`, and a daemon killed mid-batch that resumes from its checkpoint."""

from __future__ import annotations

import json
import signal
import textwrap
from collections import defaultdict
from pathlib import Path

import redis

from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import RedisServer, free_port

HANDLER = textwrap.dedent(
    """
    import base64, json, os, time

    def handle(event, context):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(json.dumps({
                    "shard": r["eventID"].rsplit(":", 1)[0],
                    "seq": r["kinesis"]["sequenceNumber"],
                    "pk": r["kinesis"]["partitionKey"],
                    "body": base64.b64decode(r["kinesis"]["data"]).decode(),
                    "request": context.aws_request_id,
                }) + "\\n")
    """
)


def _config(tmp: Path, port: int, sleep: float) -> Path:
    (tmp / "stream_e2e.py").write_text(HANDLER)
    config = tmp / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            shutdown_grace_s = 20
            reconcile_interval_s = 0.5

            [[functions]]
            name = "handle"
            handler = "stream_e2e.handle"
            timeout_s = 10
            environment = {{ OUT = "{tmp / "handled.jsonl"}", SLEEP = "{sleep}" }}
            """
        )
    )
    return config


def _handled(tmp: Path) -> list[dict[str, str]]:
    out = tmp / "handled.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_kill_mid_batch_resumes_from_the_checkpoint(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    client.delete("e2e-a", "e2e-b")
    uri = f"redis-stream://{redis_server.host}:{redis_server.port}/0/e2e-a,e2e-b"
    port = free_port()
    config = _config(tmp_path, port, sleep=0.3)
    created = json.loads(
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
            "--batch-size",
            "10",
            "--parallelization-factor",
            "2",
        ).stdout
    )
    assert created["StartingPosition"] == "TRIM_HORIZON" and created["ParallelizationFactor"] == 2
    for key in range(6):
        cli(
            config,
            "send",
            uri,
            "--body",
            f"k{key}",
            "--count",
            "40",
            "--partition-key",
            f"key-{key}",
        )
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        wait_for(lambda: len(_handled(tmp_path)) >= 60, 30, "some batches done")
        daemon.stop(signal.SIGKILL)  # mid-batch: a batch is sleeping in the handler
        before = len(_handled(tmp_path))
        daemon = DaemonProcess(config, port)
        daemon.start()
        wait_for(
            lambda: {r["seq"] for r in _handled(tmp_path)} == _all(client),
            60,
            "every record handled after the restart",
        )
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    records = _handled(tmp_path)
    # Nothing lost; duplicates only from the batches in flight when the daemon died (two
    # lanes per shard, two shards: at most 4 batches of 10).
    assert len(records) - len({r["seq"] for r in records}) <= 40
    assert before < len(records)
    # Order per key held: first deliveries of each key in stream order.
    for pk, seqs in _first_deliveries(records).items():
        assert seqs == sorted(seqs, key=_id), pk
    got = json.loads(cli(config, "mappings", "get", created["UUID"]).stdout)
    shards = {s["ShardId"]: s for s in got["Shards"]}
    assert set(shards) == {"e2e-a", "e2e-b"}
    for key, shard in shards.items():
        newest = client.xrevrange(key, count=1)
        assert shard["Checkpoint"] == newest[0][0].decode()


def test_update_keeps_checkpoints_and_delete_removes_them(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    client.delete("upd")
    uri = f"redis-stream://{redis_server.host}:{redis_server.port}/0/upd"
    port = free_port()
    config = _config(tmp_path, port, sleep=0)
    uuid = json.loads(
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
        ).stdout
    )["UUID"]
    cli(config, "send", uri, "--body", "one")
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        wait_for(lambda: len(_handled(tmp_path)) == 1, 20, "first record")
        cli(
            config,
            "mappings",
            "update",
            uuid,
            "--batch-size",
            "5",
            "--maximum-retry-attempts",
            "2",
            "--bisect-batch-on-function-error",
        )
        cli(config, "send", uri, "--body", "two")
        wait_for(lambda: len(_handled(tmp_path)) == 2, 20, "second record after the update")
        assert [r["body"] for r in _handled(tmp_path)] == ["one", "two"]  # nothing replayed
        cli(config, "mappings", "delete", uuid)
        wait_for(lambda: "upd" not in daemon.http("/metrics")[1], 10, "runner stopped")
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    gone = cli(config, "mappings", "get", uuid, check=False)
    assert gone.returncode == 1 and "ResourceNotFoundException" in gone.stderr


def test_cli_refuses_stream_options_out_of_range_with_aws_messages(tmp_path: Path) -> None:
    config = _config(tmp_path, free_port(), sleep=0)
    base = [
        "mappings",
        "create",
        "--function-name",
        "handle",
        "--event-source-arn",
        "redis-stream://127.0.0.1:6399/0/k",
    ]
    missing = cli(config, *base, check=False)
    assert "Value null at 'startingPosition'" in missing.stderr
    for option, value, text in [
        ("--parallelization-factor", "11", "less than or equal to 10"),
        ("--maximum-record-age-in-seconds", "30", "between 60 and 604800"),
        ("--tumbling-window-in-seconds", "901", "less than or equal to 900"),
        ("--maximum-retry-attempts", "-2", "greater than or equal to -1"),
    ]:
        result = cli(config, *base, "--starting-position", "LATEST", option, value, check=False)
        assert result.returncode == 1 and text in result.stderr, (option, result.stderr)
    queue = cli(
        config,
        "mappings",
        "create",
        "--function-name",
        "handle",
        "--event-source-arn",
        "local://q",
        "--parallelization-factor",
        "2",
        check=False,
    )
    assert "ParallelizationFactor is not supported for local event sources" in queue.stderr
    send = cli(config, "send", "local://q", "--body", "x", "--partition-key", "p", check=False)
    assert send.returncode == 2 and "--partition-key is for streams" in send.stderr


def _all(client: redis.Redis) -> set[str]:
    return {entry[0].decode() for key in ("e2e-a", "e2e-b") for entry in client.xrange(key)}


def _first_deliveries(records: list[dict[str, str]]) -> dict[str, list[str]]:
    seen: set[str] = set()
    out: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if record["seq"] not in seen:
            seen.add(record["seq"])
            out[record["pk"]].append(record["seq"])
    return out


def _id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)
