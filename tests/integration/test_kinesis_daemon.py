"""Kinesis end to end against moto: a real `poller run`, a mapping made with the real CLI,
records sent with `poller send`, and a daemon killed mid-batch that resumes from its
checkpoint."""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from tests.conftest import AwsEnv
from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import free_port

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
                    "arn": r["eventSourceARN"],
                }) + "\\n")
    """
)


def _config(tmp: Path, port: int, env: AwsEnv) -> Path:
    (tmp / "kinesis_e2e.py").write_text(HANDLER)
    config = tmp / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            shutdown_grace_s = 20
            reconcile_interval_s = 0.5

            [aws]
            endpoint_url = "{env.endpoint_url}"
            account = "123456789012"

            [[functions]]
            name = "handle"
            handler = "kinesis_e2e.handle"
            timeout_s = 10
            environment = {{ OUT = "{tmp / "handled.jsonl"}", SLEEP = "0.3" }}
            """
        )
    )
    return config


def _handled(tmp: Path) -> list[dict[str, str]]:
    out = tmp / "handled.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


async def _shards(env: AwsEnv) -> dict[str, list[str]]:
    """Every record's sequence number, per shard, in order."""
    per_shard: dict[str, list[str]] = {}
    async with get_session().create_client("kinesis", **env.client_kwargs()) as kinesis:
        listed = await kinesis.list_shards(StreamName="e2e")
        for shard in listed["Shards"]:
            iterator = (
                await kinesis.get_shard_iterator(
                    StreamName="e2e", ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
                )
            )["ShardIterator"]
            records = (await kinesis.get_records(ShardIterator=iterator, Limit=10000))["Records"]
            per_shard[shard["ShardId"]] = [r["SequenceNumber"] for r in records]
    return per_shard


def test_kill_mid_batch_resumes_from_the_checkpoint(tmp_path: Path, aws_env: AwsEnv) -> None:
    async def create() -> None:
        async with get_session().create_client("kinesis", **aws_env.client_kwargs()) as kinesis:
            await kinesis.create_stream(StreamName="e2e", ShardCount=2)

    asyncio.run(create())
    port = free_port()
    config = _config(tmp_path, port, aws_env)
    created = json.loads(
        cli(
            config,
            "mappings",
            "create",
            "--function-name",
            "handle",
            "--event-source-arn",
            "kinesis://e2e",
            "--starting-position",
            "TRIM_HORIZON",
            "--batch-size",
            "10",
            "--parallelization-factor",
            "2",
        ).stdout
    )
    for key in range(6):
        cli(
            config,
            "send",
            "kinesis://e2e",
            "--body",
            f"k{key}",
            "--count",
            "40",
            "--partition-key",
            f"key-{key}",
        )
    every = asyncio.run(_shards(aws_env))
    assert sum(map(len, every.values())) == 240
    daemon = DaemonProcess(config, port)
    daemon.start()
    try:
        wait_for(lambda: len(_handled(tmp_path)) >= 60, 60, "some batches done")
        daemon.stop(signal.SIGKILL)  # mid-batch: a batch is sleeping in the handler
        before = len(_handled(tmp_path))
        daemon = DaemonProcess(config, port)
        daemon.start()
        wanted = {(shard, seq) for shard, seqs in every.items() for seq in seqs}
        wait_for(
            lambda: {(r["shard"], r["seq"]) for r in _handled(tmp_path)} == wanted,
            90,
            "every record handled after the restart",
        )
        metrics = daemon.http("/metrics")[1]
        got = json.loads(cli(config, "mappings", "get", created["UUID"]).stdout)
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    records = _handled(tmp_path)
    # Nothing lost; duplicates only from the batches in flight when the daemon died (two
    # lanes per shard, two shards: at most 4 batches of 10).
    assert len(records) - len({(r["shard"], r["seq"]) for r in records}) <= 40
    assert before < len(records)
    assert {r["arn"] for r in records} == {"arn:aws:kinesis:us-east-1:123456789012:stream/e2e"}
    # Order per key held: first deliveries of each key in the shard's order.
    for key, seqs in _first_deliveries(records).items():
        assert seqs == sorted(seqs, key=int), key
    shards = {s["ShardId"]: s for s in got["Shards"]}
    assert {shard: s["Checkpoint"] for shard, s in shards.items()} == {
        shard: seqs[-1] for shard, seqs in every.items() if seqs
    }
    assert "poller_millis_behind_latest{" in metrics


def _first_deliveries(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    seen: set[tuple[str, str]] = set()
    per_key: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if (record["shard"], record["seq"]) not in seen:
            seen.add((record["shard"], record["seq"]))
            per_key[record["pk"]].append(record["seq"])
    return per_key
