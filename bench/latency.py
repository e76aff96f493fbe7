"""Enqueue-to-handler-start latency through poller, beside a raw blocking consumer, in one run.

    python bench/latency.py [--rate 200] [--seconds 15]

A producer XADDs entries at a fixed rate, each carrying its send time. Two consumers read the
same stream through their own consumer groups at the same time:
  * raw: an in-process blocking XREADGROUP (COUNT 1, BLOCK) loop that takes the time as soon as
    an entry arrives (the floor a hand-written consumer gets), and
  * poller: a real `poller run` daemon with a redis-queue:// mapping (BatchSize 1, no batching
    window) whose handler records the time it starts.
Prints p50/p90/p99/max for both. Target (issue): poller's p99 within 2 ms of the raw p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port  # noqa: E402

STREAM = "latency"

HANDLER = textwrap.dedent(
    """
    import json, os, time
    OUT = open(os.environ["OUT"], "a", buffering=1)

    def handler(event, context):
        now = time.time()
        for record in event["Records"]:
            sent = json.loads(record["body"])["sent"]
            OUT.write(f"{(now - sent) * 1000:.4f}\\n")
    """
)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "n": len(ordered),
        "p50": quantiles[49],
        "p90": quantiles[89],
        "p99": quantiles[98],
        "max": ordered[-1],
    }


def raw_consumer(url: str, stop: threading.Event, out: list[float]) -> None:
    client = redis.Redis.from_url(url)
    while not stop.is_set():
        reply = client.xreadgroup("raw", "c", {STREAM: ">"}, count=1, block=200)
        now = time.time()
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            out.append((now - json.loads(fields[b"body"])["sent"]) * 1000)
            client.xack(STREAM, "raw", entry_id)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poller-latency-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        server.start()
        client = redis.Redis.from_url(server.url)
        client.xgroup_create(STREAM, "raw", id="$", mkstream=True)
        client.xgroup_create(STREAM, "poller", id="$")
        (workdir / "lat.py").write_text(HANDLER)
        out = workdir / "poller-latency.txt"
        port = free_port()
        source = server.url.replace("redis://", "redis-queue://") + f"/{STREAM}?group=poller"
        config = workdir / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
            [daemon]
            http_listen = "127.0.0.1:{port}"
            log_level = "warning"

            [state]
            url = "sqlite:///{workdir}/state.db"

            [[functions]]
            name = "lat"
            handler = "lat.handler"
            code_path = "{workdir}"
            # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
            inherit_environment = ["PYTHONPATH"]
            environment = {{ OUT = "{out}" }}

            [[mappings]]
            name = "latency"
            function_name = "lat"
            event_source_arn = "{source}"
            batch_size = 1
            """
            )
        )
        log = (workdir / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        raw_samples: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=raw_consumer, args=(server.url, stop, raw_samples))
        reader.start()
        try:
            time.sleep(1.5)  # the daemon's start-up and first long poll
            interval = 1.0 / args.rate
            total = int((args.seconds + args.warmup) * args.rate)
            warm = int(args.warmup * args.rate)
            next_at = time.perf_counter()
            for _ in range(total):
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                client.xadd(STREAM, {"body": json.dumps({"sent": time.time()})})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                done = out.exists() and len(out.read_text().splitlines()) >= total
                if done and len(raw_samples) >= total:
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            reader.join()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
            client.close()
            server.stop()
        poller_samples = [float(x) for x in out.read_text().split()] if out.exists() else []
        raw = percentiles(raw_samples[warm:])
        ours = percentiles(poller_samples[warm:])
        print(
            f"{args.rate:g} msg/s for {args.seconds:g} s (after {args.warmup:g} s warm-up); "
            f"batch size 1, no window; {os.cpu_count()} CPUs"
        )
        print(f"{'':8} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, row in (("raw", raw), ("poller", ours)):
            print(
                f"{name:8} {row['n']:>6.0f} {row['p50']:>8.3f} {row['p90']:>8.3f} "
                f"{row['p99']:>8.3f} {row['max']:>8.3f}"
            )
        gap = ours["p99"] - raw["p99"]
        print(f"p99 gap: {gap:.3f} ms (target <= 2 ms: {'met' if gap <= 2 else 'missed'})")


if __name__ == "__main__":
    main()
