"""Drain a Kinesis stream on moto with an ordered poller mapping, beside raw aiobotocore
GetRecords loops over the same shards.

    python bench/kinesis.py [--records 20000] [--shards 4] [--repeat 3]

Starts the tests' moto server (tests/moto_kinesis.py: moto's Kinesis made to behave as AWS's
where it matters, serialized) and loads N 100-byte records spread over S shards, then times,
alternating which goes first in each run:
  * raw-100: one aiobotocore client, one task per shard looping GetRecords with Limit 100 from
    TRIM_HORIZON until the shard is read (what a hand-written reader at batch 100 gets, with no
    processing at all) -- the issue's baseline;
  * raw-10k: the same loop with GetRecords' Limit 10,000, the size poller's readers fetch;
  * poller: a real `poller run` daemon with a kinesis:// mapping over the stream (BatchSize
    100, TRIM_HORIZON, ParallelizationFactor 1) and a no-op handler, timed from its launch
    until every shard is checkpointed at its last record: its start-up (interpreter, first
    worker's cold start) is counted against it, which the raw loops do not pay. (Timing from
    its first checkpoint instead would leave out its first GetRecords of each shard, which
    with 10,000 records a call is most of the reading.)
moto is the bottleneck (it serves each GetRecords by walking the shard from its start), so
this checks poller's overhead, not Kinesis's speed. The raw loops parse responses as
aiobotocore does by default (timestamps to datetimes, data decoded from base64); poller keeps
both as the service sent them, since Lambda's events carry them so. Prints records/s and the
ratios per run, their medians, and the CPU the daemon and its workers used per record over
the whole poller run (start-up included).
Target (issue): poller >= 0.8x the raw loop at batch 100.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from redis_queue import children, cpu_seconds  # noqa: E402

from tests.servers import AWS_DUMMY_KEY, AWS_REGION, MotoServer, free_port  # noqa: E402

BODY = b"x" * 100
BATCH = 100
STREAM = "bench"
ACCOUNT = "123456789012"  # moto's


def client(url: str) -> Any:
    return get_session().create_client("kinesis", region_name=AWS_REGION, endpoint_url=url)


async def load(url: str, shards: int, records: int) -> dict[str, list[str]]:
    """Create the stream and put the records (random keys); each shard's sequence numbers."""
    per_shard: dict[str, list[str]] = {}
    async with client(url) as kinesis:
        await kinesis.create_stream(StreamName=STREAM, ShardCount=shards)
        for start in range(0, records, 500):
            entries = [
                {"Data": BODY, "PartitionKey": f"p{i}"}
                for i in range(start, min(start + 500, records))
            ]
            reply = await kinesis.put_records(StreamName=STREAM, Records=entries)
            assert not reply.get("FailedRecordCount"), reply
            for result in reply["Records"]:
                per_shard.setdefault(result["ShardId"], []).append(result["SequenceNumber"])
    return per_shard


async def raw_drain(url: str, per_shard: dict[str, list[str]], limit: int) -> float:
    async with client(url) as kinesis:

        async def shard(shard_id: str, expected: int) -> None:
            iterator = (
                await kinesis.get_shard_iterator(
                    StreamName=STREAM, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
                )
            )["ShardIterator"]
            read = 0
            while read < expected:
                reply = await kinesis.get_records(ShardIterator=iterator, Limit=limit)
                read += len(reply["Records"])
                iterator = reply["NextShardIterator"]

        started = time.perf_counter()
        await asyncio.gather(*(shard(s, len(seqs)) for s, seqs in per_shard.items()))
        return time.perf_counter() - started


def checkpoints(db: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT shard, position FROM checkpoints").fetchall()
    except sqlite3.Error:
        return {}
    return {shard: position for shard, position in rows if position}


def poller_drain(
    url: str, per_shard: dict[str, list[str]], workdir: Path, tag: str
) -> tuple[float, float, dict[str, float]]:
    """(seconds from launch to every shard checkpointed at its last record, seconds from launch
    to the first checkpoint, CPU seconds by process kind over the whole run)."""
    port = free_port()
    (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")
    db = workdir / f"state-{tag}.db"
    config = workdir / f"{tag}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"
        log_level = "warning"
        memory_mb = 8192

        [state]
        url = "sqlite:///{db}"

        [aws]
        endpoint_url = "{url}"
        account = "{ACCOUNT}"

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        code_path = "{workdir}"
        # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
        inherit_environment = ["PYTHONPATH"]

        [[mappings]]
        name = "bench"
        function_name = "noop"
        event_source_arn = "kinesis://{STREAM}"
        starting_position = "TRIM_HORIZON"
        batch_size = {BATCH}
        """
        )
    )
    last = {s: seqs[-1] for s, seqs in per_shard.items()}
    log = (workdir / f"daemon-{tag}.log").open("wb")
    launched = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **aws_env()},
    )
    first: float | None = None
    try:
        while True:
            now = time.perf_counter()
            seen = checkpoints(db)
            if first is None and any(s in last for s in seen):
                first = now - launched
            if all(seen.get(s) == v for s, v in last.items()):
                break
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {log.name}")
            time.sleep(0.005)
        elapsed = now - launched
        cpu = {
            "daemon": sum(cpu_seconds([proc.pid]).values()),
            "workers": sum(cpu_seconds(children(proc.pid)).values()),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert first is not None
    return elapsed, first, cpu


def aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": AWS_DUMMY_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_DUMMY_KEY,
        "AWS_DEFAULT_REGION": AWS_REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs (each: raw loops and poller)")
    args = parser.parse_args()
    os.environ.update(aws_env())
    results = []
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = MotoServer(workdir / "moto")
        server.start()
        try:
            per_shard = asyncio.run(load(server.url, args.shards, args.records))
            print(
                f"moto on {server.url}; {args.records} records of {len(BODY)} bytes over "
                f"{args.shards} shards ({', '.join(str(len(s)) for s in per_shard.values())}); "
                f"batch {BATCH}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}"
            )
            print(
                f"{'run':>3} {'raw-100 rec/s':>14} {'raw-10k rec/s':>14} {'poller rec/s':>13} "
                f"{'vs 100':>7} {'vs 10k':>7} {'1st ckpt':>8}  poller CPU/record: daemon / workers"
            )
            for run in range(args.repeat):
                raw_first = run % 2 == 0
                if raw_first:
                    raw_100 = asyncio.run(raw_drain(server.url, per_shard, 100))
                    raw_10k = asyncio.run(raw_drain(server.url, per_shard, 10_000))
                poller_s, first_s, cpu = poller_drain(server.url, per_shard, workdir, f"r{run}")
                if not raw_first:
                    raw_100 = asyncio.run(raw_drain(server.url, per_shard, 100))
                    raw_10k = asyncio.run(raw_drain(server.url, per_shard, 10_000))
                row = {
                    "run": run + 1,
                    "raw_100_per_s": args.records / raw_100,
                    "raw_10k_per_s": args.records / raw_10k,
                    "poller_per_s": args.records / poller_s,
                    "poller_first_checkpoint_s": first_s,
                    "cpu_us_per_record": {k: v / args.records * 1e6 for k, v in cpu.items()},
                    "load": os.getloadavg()[0],
                }
                results.append(row)
                per = row["cpu_us_per_record"]
                print(
                    f"{run + 1:>3} {row['raw_100_per_s']:>14,.0f} {row['raw_10k_per_s']:>14,.0f} "
                    f"{row['poller_per_s']:>13,.0f} "
                    f"{row['poller_per_s'] / row['raw_100_per_s']:>6.2f}x "
                    f"{row['poller_per_s'] / row['raw_10k_per_s']:>6.2f}x {first_s:>7.2f}s  "
                    f"{per['daemon']:.0f} us / {per['workers']:.0f} us"
                )
        finally:
            server.stop()
    for base in ("raw_100_per_s", "raw_10k_per_s"):
        ratios = [r["poller_per_s"] / r[base] for r in results]
        print(
            f"poller / {base[:-6]}: median {statistics.median(ratios):.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} runs"
        )
    print("target: poller >= 0.8x raw-100")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
