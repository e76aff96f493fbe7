"""Drain a pre-loaded Redis stream with poller, beside a raw redis-py loop, in one run.

    python bench/redis_queue.py [--entries 200000] [--batch-sizes 1,10,100]

For each batch size: load N 100-byte entries into a fresh stream on a private redis-server,
then time
  * raw: one redis-py (hiredis) client looping XREADGROUP COUNT=batch / XACK on the same server
    (the baseline a hand-written consumer gets), and
  * poller: a real `poller run` daemon with a redis-queue:// mapping (BatchSize=batch) and a
    no-op handler, from start until the group has no lag and nothing pending.
Both read their own consumer group of the same stream. Prints records/s and the ratio.
Targets (issue): batch 100 >= 0.6x raw; batch 1 >= 2x raw (raw count=1 is one round trip per
read and per ack; poller overlaps reads, acks and invokes across concurrent workers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port  # noqa: E402

STREAM = "bench"
BODY = "x" * 100


def load(client: redis.Redis, entries: int) -> None:
    client.delete(STREAM)
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(STREAM, {"body": BODY})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def raw_drain(client: redis.Redis, batch: int) -> float:
    group = f"raw-{batch}"
    client.xgroup_create(STREAM, group, id="0")
    started = time.perf_counter()
    while True:
        reply = client.xreadgroup(group, "c", {STREAM: ">"}, count=batch)
        if not reply or not reply[0][1]:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(STREAM, group, *ids)
    return time.perf_counter() - started


def group_state(client: redis.Redis, group: str) -> tuple[int, int]:
    """(pending, lag) of the group."""
    for info in client.xinfo_groups(STREAM):
        if info["name"].decode() == group:
            return int(info["pending"]), int(info.get("lag") or 0)
    raise SystemExit(f"group {group} vanished")


def poller_drain(client: redis.Redis, url: str, batch: int, workdir: Path,
                 entries: int) -> tuple[float, dict[str, float]]:
    group = f"poller-{batch}"
    client.xgroup_create(STREAM, group, id="0")
    port = free_port()
    (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")
    window = 0 if batch <= 10 else 1
    config = workdir / f"bench-{batch}.toml"
    config.write_text(textwrap.dedent(
        f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"
        log_level = "warning"
        memory_mb = 8192

        [state]
        url = "sqlite:///{workdir}/state-{batch}.db"

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        code_path = "{workdir}"

        [[mappings]]
        name = "bench"
        function_name = "noop"
        event_source_arn = "{url.replace("redis://", "redis-queue://")}/{STREAM}?group={group}&start=0"
        batch_size = {batch}
        maximum_batching_window_in_seconds = {window}
        """
    ))
    log = (workdir / f"daemon-{batch}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    # The clock starts at the first delivery: daemon start-up (imports, state store) is not
    # part of draining, and the raw loop has none.
    started: float | None = None
    try:
        while True:
            pending, lag = group_state(client, group)
            now = time.perf_counter()
            if started is None and (pending or lag < entries):
                started = now
            if started is not None and pending == 0 and lag == 0:
                break
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {log.name}")
            time.sleep(0.005)
        elapsed = now - started
        stats = scrape(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    return elapsed, stats


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    stats: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("poller_mapping_concurrency_target", "poller_invocations_total"):
            if line.startswith(name + "{"):
                stats[name] = stats.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--batch-sizes", default="1,10,100")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        server.start()
        client = redis.Redis.from_url(server.url)
        print(f"redis-server {client.info()['redis_version']} on {server.url}; "
              f"{args.entries} entries of {len(BODY)} bytes; {os.cpu_count()} CPUs")
        print(f"{'batch':>5} {'raw rec/s':>11} {'poller rec/s':>13} {'ratio':>6} "
              f"{'target':>8} {'invokes':>8} {'final target conc.':>18}")
        results = []
        try:
            for batch in sizes:
                load(client, args.entries)
                raw_s = raw_drain(client, batch)
                poller_s, stats = poller_drain(client, server.url, batch, workdir, args.entries)
                raw_rate = args.entries / raw_s
                poller_rate = args.entries / poller_s
                target = ">= 2x" if batch == 1 else (">= 0.6x" if batch == 100 else "")
                print(f"{batch:>5} {raw_rate:>11,.0f} {poller_rate:>13,.0f} "
                      f"{poller_rate / raw_rate:>5.2f}x {target:>8} "
                      f"{stats.get('poller_invocations_total', 0):>8,.0f} "
                      f"{stats.get('poller_mapping_concurrency_target', 0):>18,.0f}")
                results.append({"batch": batch, "raw_per_s": raw_rate,
                                "poller_per_s": poller_rate})
        finally:
            client.close()
            server.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
