"""Leases are not Redis-stream specific: two real daemons sharing a Redis state store split a
Kinesis stream's shards (on moto), and when one is killed -9 the other takes its shards over;
nothing is lost and each partition key's records arrive in order."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import boto3
import redis

from tests.conftest import AwsEnv
from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import AWS_REGION, RedisServer, free_port

STREAM = "fleet-k"
SHARDS = 4
HANDLER = textwrap.dedent(
    """
    import base64, json, os

    def handle(event, context):
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(json.dumps({
                "pid": os.getppid(),
                "pk": r["kinesis"]["partitionKey"],
                "n": int(base64.b64decode(r["kinesis"]["data"])),
            }) + "\\n" for r in event["Records"]))
    """
)


def _daemon(tmp: Path, name: str, env: AwsEnv, redis_url: str) -> DaemonProcess:
    port = free_port()
    directory = tmp / name
    directory.mkdir()
    config = directory / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            # A stuck shutdown ends 10 s after this (with the tasks it waits on in the log),
            # inside the 40 s DaemonProcess.stop waits.
            shutdown_grace_s = 20

            [state]
            url = "{redis_url}"
            key_prefix = "kinesis-fleet:"

            [fleet]
            lease_duration_s = 3

            [aws]
            endpoint_url = "{env.endpoint_url}"
            account = "123456789012"

            [[functions]]
            name = "handle"
            handler = "kinesis_fleet.handle"
            code_path = "{tmp}"
            environment = {{ OUT = "{tmp / "handled.jsonl"}" }}
            """
        )
    )
    daemon = DaemonProcess(config, port)
    daemon.start()
    return daemon


def _handled(tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "handled.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def _leases(client: redis.Redis, uuid: str) -> Counter[int]:
    """Live leases per daemon pid (daemon ids are HOST-PID-RANDOM)."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    held: Counter[int] = Counter()
    for value in client.hgetall(f"kinesis-fleet:leases:{uuid}").values():
        lease = json.loads(value)
        if lease.get("owner") and lease["expires"] > now:
            held[int(lease["owner"].rsplit("-", 2)[1])] += 1
    return held


def test_two_daemons_split_kinesis_shards_and_one_takes_over_a_killed_one(
    tmp_path: Path, aws_env: AwsEnv, redis_server: RedisServer
) -> None:
    kinesis = boto3.client("kinesis", region_name=AWS_REGION, endpoint_url=aws_env.endpoint_url)
    kinesis.create_stream(StreamName=STREAM, ShardCount=SHARDS)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=STREAM, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    for key in client.scan_iter("kinesis-fleet:*"):
        client.delete(key)
    (tmp_path / "kinesis_fleet.py").write_text(HANDLER)
    sent: dict[str, list[int]] = defaultdict(list)
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            records = [{"Data": str(n + i).encode(), "PartitionKey": f"p{i}"} for i in range(8)]
            assert not kinesis.put_records(StreamName=STREAM, Records=records)["FailedRecordCount"]
            for i in range(8):
                sent[f"p{i}"].append(n + i)
            n += 8
            stop.wait(0.1)

    a = _daemon(tmp_path, "a", aws_env, redis_server.url)
    b = _daemon(tmp_path, "b", aws_env, redis_server.url)
    producer = threading.Thread(target=produce, daemon=True)
    try:
        created = cli(
            a.config,
            "mappings",
            "create",
            "--function-name",
            "handle",
            "--event-source-arn",
            f"kinesis://{STREAM}",
            "--starting-position",
            "TRIM_HORIZON",
            "--batch-size",
            "10",
        )
        uuid = json.loads(created.stdout)["UUID"]
        producer.start()
        assert a.proc is not None and b.proc is not None
        pids = {a.proc.pid, b.proc.pid}
        wait_for(
            lambda: (
                set(_leases(client, uuid)) == pids
                and sorted(_leases(client, uuid).values()) == [2, 2]
            ),
            30,
            "the shards split 2 and 2",
        )
        wait_for(lambda: {r["pid"] for r in _handled(tmp_path)} == pids, 30, "both handling")
        b.stop(signal.SIGKILL)
        wait_for(
            lambda: _leases(client, uuid) == Counter({a.proc.pid: SHARDS}),  # type: ignore[union-attr]
            30,
            "the survivor holding every shard",
        )
        stop.set()
        producer.join()

        def all_handled() -> bool:
            got = {(r["pk"], r["n"]) for r in _handled(tmp_path)}
            return all((pk, n) in got for pk, ns in sent.items() for n in ns)

        wait_for(all_handled, 60, "every record handled")
        firsts: dict[str, list[int]] = defaultdict(list)
        seen: set[tuple[str, int]] = set()
        for record in _handled(tmp_path):
            if (record["pk"], record["n"]) not in seen:
                seen.add((record["pk"], record["n"]))
                firsts[record["pk"]].append(record["n"])
        assert firsts == sent  # first deliveries in order per key, nothing lost
        assert "Traceback" not in a.logs()
        assert a.stop() == 0, a.logs()[-4000:]  # a clean exit, not one past a stuck shutdown
    finally:
        stop.set()
        if producer.is_alive():
            producer.join()
        for daemon in (a, b):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
