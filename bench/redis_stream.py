"""Drain Redis stream keys with an ordered poller mapping, beside a raw redis-py XREAD loop.

    python bench/redis_stream.py [--entries 200000] [--keys 4] [--factors 1,4] [--repeat 3]

Loads N 100-byte entries spread over K stream keys on a private redis-server, then times
  * raw: one redis-py (hiredis) client looping ``XREAD COUNT 100 STREAMS k1..kK id1..idK``
    until every key is read (what a hand-written reader gets, with no processing at all);
  * poller: a real `poller run` daemon with a redis-stream:// mapping over the same keys
    (BatchSize 100, TRIM_HORIZON, ParallelizationFactor F) and a no-op handler, from its first
    checkpoint until every key is checkpointed at its last entry. The records the first batches
    settled before that are not counted, so daemon start-up and cold starts stay out, as the
    raw loop has none.
Runs alternate which goes first; prints records/s, the ratio per run and the median ratio, and
the CPU the daemon and its workers used per record during poller's drain.
Target (issue): batch 100, ParallelizationFactor 1 >= 0.6x raw.
"""

from __future__ import annotations

import argparse
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

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from redis_queue import children, cpu_seconds, cpu_used  # noqa: E402

from tests.servers import RedisServer, free_port  # noqa: E402

BODY = "x" * 100
BATCH = 100


def load(client: redis.Redis, keys: list[str], entries: int) -> dict[str, list[bytes]]:
    """XADD the entries round-robin over the keys; the ids of each key, in order."""
    client.delete(*keys)
    ids: dict[str, list[bytes]] = {key: [] for key in keys}
    pipe = client.pipeline(transaction=False)
    order: list[str] = []
    for i in range(entries):
        key = keys[i % len(keys)]
        pipe.xadd(key, {"body": BODY, "pk": f"p{i % 97}"})
        order.append(key)
        if len(order) == 5000:
            for key_of, entry_id in zip(order, pipe.execute(), strict=True):
                ids[key_of].append(entry_id)
            order = []
    for key_of, entry_id in zip(order, pipe.execute(), strict=True):
        ids[key_of].append(entry_id)
    return ids


def raw_drain(client: redis.Redis, keys: list[str]) -> float:
    positions = {key: "0-0" for key in keys}
    started = time.perf_counter()
    while True:
        reply = client.xread(positions, count=BATCH)
        if not reply:
            break
        for key, entries in reply:
            positions[key.decode()] = entries[-1][0]
    return time.perf_counter() - started


def checkpoints(db: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT shard, position FROM checkpoints").fetchall()
    except sqlite3.Error:
        return {}
    return {shard: position for shard, position in rows if position}


def poller_drain(
    url: str, ids: dict[str, list[bytes]], factor: int, workdir: Path, tag: str
) -> tuple[float, int, dict[str, float]]:
    """(seconds, records drained in them, CPU seconds by process kind)."""
    port = free_port()
    (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")
    db = workdir / f"state-{tag}.db"
    keys = ",".join(ids)
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

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        code_path = "{workdir}"
        # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
        inherit_environment = ["PYTHONPATH"]

        [[mappings]]
        name = "bench"
        function_name = "noop"
        event_source_arn = "{url.replace("redis://", "redis-stream://")}/{keys}"
        starting_position = "TRIM_HORIZON"
        batch_size = {BATCH}
        parallelization_factor = {factor}
        """
        )
    )
    index = {key: {entry: i + 1 for i, entry in enumerate(entries)} for key, entries in ids.items()}
    last = {key: entries[-1].decode() for key, entries in ids.items()}
    log = (workdir / f"daemon-{tag}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started: float | None = None
    counted = 0
    cpu_before: list[dict[int, float]] = []
    try:
        while True:
            now = time.perf_counter()
            seen = checkpoints(db)
            done = {k: index[k].get(v.encode(), 0) for k, v in seen.items() if v != "0-0"}
            if started is None and any(done.values()):
                started = now
                counted = sum(len(e) for e in ids.values()) - sum(done.values())
                cpu_before = [cpu_seconds([proc.pid]), cpu_seconds(children(proc.pid))]
            if started is not None and all(seen.get(k) == v for k, v in last.items()):
                break
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {log.name}")
            time.sleep(0.005)
        elapsed = now - started
        cpu_after = [cpu_seconds([proc.pid]), cpu_seconds(children(proc.pid))]
        cpu = {
            name: cpu_used(before, after)
            for name, before, after in zip(
                ("daemon", "workers"), cpu_before, cpu_after, strict=True
            )
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    return elapsed, counted, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--factors", default="1,4", help="ParallelizationFactor values")
    parser.add_argument("--repeat", type=int, default=3, help="raw/poller pairs per factor")
    args = parser.parse_args()
    keys = [f"bench-{i}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        server.start()
        client = redis.Redis.from_url(server.url)
        print(
            f"redis-server {client.info()['redis_version']} on {server.url}; {args.entries} "
            f"entries of {len(BODY)} bytes over {args.keys} keys; batch {BATCH}; "
            f"{os.cpu_count()} CPUs"
        )
        print(
            f"{'PF':>3} {'run':>3} {'raw rec/s':>11} {'poller rec/s':>13} {'ratio':>6}  "
            "poller CPU per record: daemon / workers"
        )
        results = []
        try:
            ids = load(client, keys, args.entries)
            for factor in [int(f) for f in args.factors.split(",")]:
                ratios = []
                for run in range(args.repeat):
                    raw_first = run % 2 == 0
                    if raw_first:
                        raw_s = raw_drain(client, keys)
                    poller_s, drained, cpu = poller_drain(
                        server.url, ids, factor, workdir, f"pf{factor}-{run}"
                    )
                    if not raw_first:
                        raw_s = raw_drain(client, keys)
                    raw_rate = args.entries / raw_s
                    poller_rate = drained / poller_s
                    ratios.append(poller_rate / raw_rate)
                    per = {k: v / drained * 1e6 for k, v in cpu.items()}
                    print(
                        f"{factor:>3} {run + 1:>3} {raw_rate:>11,.0f} {poller_rate:>13,.0f} "
                        f"{poller_rate / raw_rate:>5.2f}x  {per['daemon']:.1f} us / "
                        f"{per['workers']:.1f} us"
                    )
                    results.append(
                        {
                            "factor": factor,
                            "run": run + 1,
                            "raw_per_s": raw_rate,
                            "poller_per_s": poller_rate,
                            "cpu_us_per_record": per,
                        }
                    )
                target = ">= 0.6x" if factor == 1 else "(no target)"
                print(
                    f"{factor:>3} median ratio {statistics.median(ratios):.2f}x "
                    f"[{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} runs; "
                    f"target {target}"
                )
        finally:
            client.close()
            server.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
