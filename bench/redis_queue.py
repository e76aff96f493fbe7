"""Drain a pre-loaded Redis stream with poller, beside a raw redis-py loop, in one run.

    python bench/redis_queue.py [--entries 200000] [--batch-sizes 1,10,100] [--repeat 3]

For each batch size: load N 100-byte entries into a fresh stream on a private redis-server,
then time
  * raw: one redis-py (hiredis) client looping XREADGROUP COUNT=batch / XACK on the same server
    (the baseline a hand-written consumer gets), and
  * poller: a real `poller run` daemon with a redis-queue:// mapping (BatchSize=batch) and a
    no-op handler, from start until the group has no lag and nothing pending.
Both read their own consumer group of the same stream, a fresh one per run; ``--repeat`` runs
alternate which goes first. Prints records/s, the ratio per run and the median ratio, and the
CPU the daemon, its workers and redis-server used per record during poller's drain.
Targets (issue): batch 100 >= 0.6x raw; batch 1 >= 2x raw (raw count=1 is one round trip per
read and per ack; poller overlaps reads, acks and invokes across concurrent workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
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

from tests.servers import RedisServer, free_port  # noqa: E402

STREAM = "bench"
TARGET_SAMPLE_S = 0.5
BODY = "x" * 100


def load(client: redis.Redis, entries: int) -> None:
    client.delete(STREAM)
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(STREAM, {"body": BODY})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def raw_drain(client: redis.Redis, batch: int, group: str) -> float:
    client.xgroup_create(STREAM, group, id="0")
    started = time.perf_counter()
    while True:
        reply = client.xreadgroup(group, "c", {STREAM: ">"}, count=batch)
        if not reply or not reply[0][1]:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(STREAM, group, *ids)
    return time.perf_counter() - started


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each live process, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    # A process started meanwhile counts from zero.
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def group_state(client: redis.Redis, group: str) -> tuple[int, int]:
    """(pending, lag) of the group."""
    for info in client.xinfo_groups(STREAM):
        if info["name"].decode() == group:
            return int(info["pending"]), int(info.get("lag") or 0)
    raise SystemExit(f"group {group} vanished")


def poller_drain(
    client: redis.Redis,
    url: str,
    batch: int,
    workdir: Path,
    entries: int,
    redis_pid: int,
    group: str,
    maximum_concurrency: int | None = None,
    py_spy: Path | None = None,
) -> tuple[float, dict[str, float]]:
    client.xgroup_create(STREAM, group, id="0")
    port = free_port()
    (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")
    window = 0 if batch <= 10 else 1
    config = workdir / f"{group}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{port}"
        log_level = "warning"
        memory_mb = 8192

        [state]
        url = "sqlite:///{workdir}/state-{group}.db"

        [[functions]]
        name = "noop"
        handler = "noop.handler"
        code_path = "{workdir}"
        # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
        inherit_environment = ["PYTHONPATH"]

        [[mappings]]
        name = "bench"
        function_name = "noop"
        event_source_arn = "{url.replace("redis://", "redis-queue://")}/{STREAM}?group={group}&start=0"
        batch_size = {batch}
        maximum_batching_window_in_seconds = {window}
        """
        )
        + (
            f"scaling_config = {{ MaximumConcurrency = {maximum_concurrency} }}\n"
            if maximum_concurrency
            else ""
        )
    )
    log = (workdir / f"daemon-{group}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "poller.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    # The clock starts at the first delivery: daemon start-up (imports, state store) is not
    # part of draining, and the raw loop has none.
    started: float | None = None
    spy: subprocess.Popen[bytes] | None = None
    cpu_before: list[dict[int, float]] = []
    targets: list[float] = []  # the controller's target, every TARGET_SAMPLE_S of the drain
    next_sample = 0.0
    try:
        while True:
            pending, lag = group_state(client, group)
            now = time.perf_counter()
            if started is None and (pending or lag < entries):
                started = now
                if py_spy is not None:
                    spy = start_py_spy(proc.pid, py_spy)
                cpu_before = [
                    cpu_seconds([proc.pid]),
                    cpu_seconds(children(proc.pid)),
                    cpu_seconds([redis_pid]),
                ]
            if started is not None and pending == 0 and lag == 0:
                break
            if started is not None and now >= next_sample:
                next_sample = now + TARGET_SAMPLE_S
                with contextlib.suppress(OSError):
                    targets.append(scrape(port).get("poller_mapping_concurrency_target", 0))
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited: see {log.name}")
            time.sleep(0.005)
        elapsed = now - started
        cpu_after = [
            cpu_seconds([proc.pid]),
            cpu_seconds(children(proc.pid)),
            cpu_seconds([redis_pid]),
        ]
        stats = scrape(port)
        for name, before, after in zip(
            ("daemon", "workers", "redis"), cpu_before, cpu_after, strict=True
        ):
            stats[f"cpu_{name}"] = cpu_used(before, after)
        if targets:
            stats["target_peak"] = max(targets)
            stats["target_mean"] = statistics.fmean(targets)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    return elapsed, stats


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample the daemon (py-spy, from the bench extra) until stopped, as collapsed stacks."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "1000",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def top_of(stacks: Path, count: int = 20) -> list[tuple[str, float, float]]:
    """(function, self %, total %) of the most expensive functions in collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in stacks.read_text().splitlines():
        frames, _, hits = line.rpartition(" ")
        n = int(hits)
        samples += n
        names = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in frames.split(";")
        ]
        own[names[-1]] = own.get(names[-1], 0) + n
        for name in set(names):
            total[name] = total.get(name, 0) + n
    ranked = sorted(own, key=own.__getitem__, reverse=True)[:count]
    return [(name, 100 * own[name] / samples, 100 * total[name] / samples) for name in ranked]


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
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="raw/poller run pairs per batch size (median ratio reported)",
    )
    parser.add_argument(
        "--maximum-concurrency",
        type=int,
        default=None,
        help="ScalingConfig.MaximumConcurrency of the mapping (default: unbounded)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the daemon with py-spy during each drain and print its top functions",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        server.start()
        client = redis.Redis.from_url(server.url)
        print(
            f"redis-server {client.info()['redis_version']} on {server.url}; "
            f"{args.entries} entries of {len(BODY)} bytes; {os.cpu_count()} CPUs"
        )
        print(
            f"{'batch':>5} {'run':>3} {'raw rec/s':>11} {'poller rec/s':>13} {'ratio':>6} "
            f"{'invokes':>8}  target concurrency: mean / peak / at the end"
        )
        results = []
        try:
            for batch in sizes:
                # One stream per batch size, read by a fresh group per run. Runs alternate
                # which of the two goes first, so a drift in machine speed hits both alike.
                load(client, args.entries)
                ratios = []
                for run in range(args.repeat):
                    raw_first = run % 2 == 0
                    if raw_first:
                        raw_s = raw_drain(client, batch, f"raw-{batch}-{run}")
                    stacks = workdir / f"stacks-{batch}-{run}.txt" if args.py_spy else None
                    poller_s, stats = poller_drain(
                        client,
                        server.url,
                        batch,
                        workdir,
                        args.entries,
                        server.proc.pid,
                        f"poller-{batch}-{run}",
                        args.maximum_concurrency,
                        stacks,
                    )
                    if stacks is not None and stacks.exists():
                        print("          daemon's top functions (self % / total % of samples):")
                        for name, own, total in top_of(stacks):
                            print(f"          {own:5.1f} {total:5.1f}  {name}")
                    if not raw_first:
                        raw_s = raw_drain(client, batch, f"raw-{batch}-{run}")
                    raw_rate = args.entries / raw_s
                    poller_rate = args.entries / poller_s
                    ratios.append(poller_rate / raw_rate)
                    print(
                        f"{batch:>5} {run + 1:>3} {raw_rate:>11,.0f} {poller_rate:>13,.0f} "
                        f"{poller_rate / raw_rate:>5.2f}x "
                        f"{stats.get('poller_invocations_total', 0):>8,.0f}  "
                        f"{stats.get('target_mean', 0):.1f} / "
                        f"{stats.get('target_peak', 0):.0f} / "
                        f"{stats.get('poller_mapping_concurrency_target', 0):.0f}"
                    )
                    cpu = {k[4:]: round(v, 2) for k, v in stats.items() if k.startswith("cpu_")}
                    per_record = ", ".join(
                        f"{k} {v / args.entries * 1e6:.1f} us" for k, v in cpu.items()
                    )
                    print(
                        f"          poller CPU during the drain ({poller_s:.2f} s x "
                        f"{os.cpu_count()} cores): per record {per_record}"
                    )
                    results.append(
                        {
                            "batch": batch,
                            "run": run + 1,
                            "raw_per_s": raw_rate,
                            "poller_per_s": poller_rate,
                            "cpu_s": cpu,
                        }
                    )
                target = {1: ">= 2x", 100: ">= 0.6x"}.get(batch, "(no target)")
                print(
                    f"{batch:>5} median ratio {statistics.median(ratios):.2f}x "
                    f"[{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} runs; "
                    f"target {target}"
                )
        finally:
            client.close()
            server.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
