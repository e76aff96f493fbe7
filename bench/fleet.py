"""Fleet mode for ordered shards: failover and balance times, and throughput with 1-3 daemons.

    python bench/fleet.py [--keys 8] [--lease 10] [--rounds 3] [--entries 80000]

Real `poller run` daemons share a private redis-server (state and stream keys) and one
redis-stream:// mapping over K keys (BatchSize 100, TRIM_HORIZON, a no-op handler).

  * failover: three daemons while a producer appends ~200 records/s over the keys. One daemon
    is killed (SIGKILL) at a random point of its renewal cycle; timed until each of its shards
    is checkpointed past where it stood by a survivor ("processing again"; the lease must lapse
    first: between 2/3 of the lease duration and all of it, plus the time to notice, take and
    read). Then a new daemon is started; timed from
    its process start (and from its /readyz) until the leases are balanced (at most
    ceil(K/3) each, all held). Then one daemon is stopped gracefully (SIGTERM), timed until its
    shards are processing again elsewhere, and replaced. Repeated --rounds times.
  * throughput: N entries of 100 bytes loaded over the keys, the mapping created disabled,
    D daemons started, then the mapping enabled; timed from the first checkpoint until every
    key is checkpointed at its last entry (start-up and the first batches excluded, as in
    bench/redis_stream.py). D = 1, 2, 3 on the Redis state store, plus one daemon on SQLite
    (no leases) as the single-node reference; the order rotates each round. Also the CPU the
    daemons and their workers used per record, steadier than wall time on a busy machine. On
    a machine with few cores this shows what leases and more processes cost, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from redis_queue import children, cpu_seconds, cpu_used  # noqa: E402

from tests.daemon_helpers import DaemonProcess, cli  # noqa: E402
from tests.servers import RedisServer, free_port  # noqa: E402

BATCH = 100
BODY = "x" * 100
PREFIX = "bench-fleet:"


class Bench:
    def __init__(self, workdir: Path, server: RedisServer, keys: list[str], lease: float) -> None:
        self.workdir = workdir
        self.server = server
        self.client = redis.Redis.from_url(server.url)
        self.keys = keys
        self.lease = lease
        self.uuid = ""
        self.count = 0
        (workdir / "noop.py").write_text("def handler(event, context):\n    return None\n")

    def config(self, state: str) -> tuple[Path, int]:
        self.count += 1
        port = free_port()
        directory = self.workdir / f"d{self.count}"
        directory.mkdir()
        config = directory / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [daemon]
                http_listen = "127.0.0.1:{port}"
                log_level = "warning"
                shutdown_grace_s = 20
                memory_mb = 4096

                [state]
                url = "{state}"
                key_prefix = "{PREFIX}"

                [fleet]
                lease_duration_s = {self.lease}

                [[functions]]
                name = "noop"
                handler = "noop.handler"
                code_path = "{self.workdir}"
                # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
                inherit_environment = ["PYTHONPATH"]
                """
            )
        )
        return config, port

    def start(self, state: str | None = None) -> DaemonProcess:
        config, port = self.config(state or self.server.url)
        daemon = DaemonProcess(config, port)
        daemon.start()
        return daemon

    def create_mapping(self, config: Path, *, enabled: bool = True) -> str:
        uri = self.server.url.replace("redis://", "redis-stream://") + "/" + ",".join(self.keys)
        args = [
            "mappings",
            "create",
            "--function-name",
            "noop",
            "--event-source-arn",
            uri,
            "--starting-position",
            "TRIM_HORIZON",
            "--batch-size",
            str(BATCH),
        ]
        if not enabled:
            args.append("--no-enabled")
        return str(json.loads(cli(config, *args).stdout)["UUID"])

    # -- what the store says -------------------------------------------------------------
    def leases(self) -> dict[str, int]:
        """shard -> pid of the daemon holding its live lease."""
        raw = self.client.hgetall(f"{PREFIX}leases:{self.uuid}")
        seconds, micros = self.client.time()
        now = seconds * 1000 + micros // 1000
        out = {}
        for shard, value in raw.items():
            lease = json.loads(value)
            if lease.get("owner") and lease["expires"] > now:
                out[shard.decode()] = int(lease["owner"].rsplit("-", 2)[1])
        return out

    def checkpoints(self, sqlite_db: Path | None = None) -> dict[str, str]:
        if sqlite_db is not None:
            try:
                with sqlite3.connect(f"file:{sqlite_db}?mode=ro", uri=True, timeout=1) as conn:
                    rows = conn.execute("SELECT shard, position FROM checkpoints").fetchall()
            except sqlite3.Error:
                return {}
            return {shard: position for shard, position in rows if position}
        raw = self.client.hgetall(f"{PREFIX}checkpoints:{self.uuid}")
        return {k.decode(): json.loads(v).get("position") or "" for k, v in raw.items()}

    def balanced(self, pids: set[int]) -> bool:
        load = Counter(self.leases().values())
        share = -(-len(self.keys) // len(pids))
        return (
            set(load) == pids
            and sum(load.values()) == len(self.keys)
            and max(load.values()) <= share
        )


def _id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def _wait(condition: Any, timeout: float, what: str, step: float = 0.01) -> float:
    """Seconds until condition() held."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(step)
    raise SystemExit(f"timed out waiting for {what}")


def _pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def _resumed(bench: Bench, shards: set[str], since: dict[str, str], by: set[int]) -> bool:
    """Every shard held by one of ``by`` and checkpointed past where it stood."""
    leases = bench.leases()
    now = bench.checkpoints()
    return all(
        leases.get(s) in by and _id(now.get(s) or "0-0") > _id(since.get(s) or "0-0")
        for s in shards
    )


def failover(bench: Bench, rounds: int) -> dict[str, list[float]]:
    keys = bench.keys
    bench.client.delete(*keys)
    daemons = [bench.start() for _ in range(3)]
    bench.uuid = bench.create_mapping(daemons[0].config)
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            pipe = bench.client.pipeline(transaction=False)
            for key in keys:
                pipe.xadd(key, {"body": BODY, "pk": f"p{n % 7}"})
            pipe.execute()
            n += 1
            stop.wait(len(keys) / 200)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    times: dict[str, list[float]] = {
        "kill_to_processing": [],
        "start_to_balanced": [],
        "ready_to_balanced": [],
        "sigterm_to_processing": [],
    }
    try:
        _wait(lambda: bench.balanced({_pid(d) for d in daemons}), 120, "first balance", 0.1)
        for round_ in range(rounds):
            for how in ("kill", "sigterm"):
                # A rebalance just renewed every lease: wait a different part of a renewal
                # interval each time, so the kill lands anywhere in the renewal cycle.
                time.sleep(bench.lease / 3 * random.random())
                loads = Counter(bench.leases().values())
                victim = max(daemons, key=lambda d: loads[_pid(d)])
                survivors = [d for d in daemons if d is not victim]
                theirs = {s for s, pid in bench.leases().items() if pid == _pid(victim)}
                since = bench.checkpoints()
                by = {_pid(d) for d in survivors}
                if how == "kill":
                    victim.stop(signal.SIGKILL)
                else:
                    assert victim.proc is not None
                    victim.proc.send_signal(signal.SIGTERM)
                took = _wait(
                    lambda t=theirs, s=since, b=by: _resumed(bench, t, s, b), 60, "processing again"
                )
                key = "kill_to_processing" if how == "kill" else "sigterm_to_processing"
                times[key].append(took)
                if how == "sigterm":
                    victim.stop()
                config, port = bench.config(bench.server.url)
                new = DaemonProcess(config, port)
                launched = time.monotonic()
                new.start()  # returns once /readyz answers
                ready = time.monotonic()
                daemons = [*survivors, new]
                pids = {_pid(d) for d in daemons}
                _wait(lambda pids=pids: bench.balanced(pids), 120, "balance")
                balanced = time.monotonic()
                times["start_to_balanced"].append(balanced - launched)
                times["ready_to_balanced"].append(balanced - ready)
                print(
                    f"  round {round_ + 1} {how:>7}: {len(theirs)} shards processing again "
                    f"after {took:.2f} s; new daemon balanced {balanced - launched:.2f} s after "
                    f"its start ({balanced - ready:.2f} s after ready)",
                    flush=True,
                )
    finally:
        stop.set()
        producer.join()
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
    return times


def _cpu(daemons: list[DaemonProcess]) -> dict[int, float]:
    pids = [_pid(d) for d in daemons]
    return cpu_seconds(pids + [kid for pid in pids for kid in children(pid)])


def throughput(
    bench: Bench, daemons_n: int, entries: int, sqlite: bool, tag: str
) -> tuple[float, float]:
    """Records/s from the first checkpoint until every key is checkpointed at its end, and
    the CPU the daemons and their workers used per record meanwhile (microseconds)."""
    keys = bench.keys
    bench.client.delete(*keys)
    stale = bench.client.keys(f"{PREFIX}*")  # the last run's registry and leases
    if stale:
        bench.client.delete(*stale)
    last = {}
    pipe = bench.client.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(keys[i % len(keys)], {"body": BODY, "pk": f"p{i % 97}"})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    for key in keys:
        last[key] = bench.client.xrevrange(key, count=1)[0][0].decode()
    db = bench.workdir / f"state-{tag}.db" if sqlite else None
    state = f"sqlite:///{db}" if db is not None else bench.server.url
    config, port = bench.config(state)
    bench.uuid = bench.create_mapping(config, enabled=False)
    first = DaemonProcess(config, port)
    first.start()
    daemons = [first] + [bench.start() for _ in range(daemons_n - 1)]
    try:
        cli(daemons[0].config, "mappings", "enable", bench.uuid)
        index = {key: 0 for key in keys}
        started: float | None = None
        counted = 0
        cpu_before: dict[int, float] = {}
        per_key = entries // len(keys)
        while True:
            now = time.perf_counter()
            seen = bench.checkpoints(db)
            if started is None and any(v and v != "0-0" for v in seen.values()):
                started = now
                # Records the first batches already settled are not counted.
                done = {k: v for k, v in seen.items() if v and v != "0-0"}
                for key, position in done.items():
                    index[key] = len(bench.client.xrange(key, "-", position, count=per_key + 1))
                counted = entries - sum(index.values())
                cpu_before = _cpu(daemons)
            if started is not None and all(seen.get(k) == v for k, v in last.items()):
                break
            time.sleep(0.005)
        assert started is not None
        cpu = cpu_used(cpu_before, _cpu(daemons))
        return counted / (now - started), cpu / counted * 1e6
    finally:
        for daemon in daemons:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--lease", type=float, default=10.0, help="lease_duration_s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--entries", type=int, default=80_000)
    parser.add_argument("--skip", default="", help="failover or throughput, to leave one out")
    parser.add_argument("--seed", type=int, default=14, help="of the waits before a kill")
    args = parser.parse_args()
    random.seed(args.seed)
    keys = [f"bench-fleet-{i}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        server.start()
        bench = Bench(workdir, server, keys, args.lease)
        print(
            f"redis-server {bench.client.info()['redis_version']}; {args.keys} keys; lease "
            f"{args.lease:g} s; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        results: dict[str, Any] = {}
        try:
            if args.skip != "failover":
                print("failover and balance:", flush=True)
                times = failover(bench, args.rounds)
                for name, values in times.items():
                    print(
                        f"  {name:>22}: median {statistics.median(values):.2f} s "
                        f"[{min(values):.2f}-{max(values):.2f}] over {len(values)}"
                    )
                results["failover"] = times
            if args.skip != "throughput":
                print(f"throughput ({args.entries} entries, batch {BATCH}):", flush=True)
                variants = [("redis", 1), ("redis", 2), ("redis", 3), ("sqlite", 1)]
                rates: dict[str, list[float]] = {f"{s}-{n}": [] for s, n in variants}
                cpus: dict[str, list[float]] = {tag: [] for tag in rates}
                for round_ in range(args.rounds):
                    shift = round_ % len(variants)
                    for store, n in variants[shift:] + variants[:shift]:
                        tag = f"{store}-{n}"
                        rate, cpu = throughput(
                            bench, n, args.entries, store == "sqlite", f"{tag}-{round_}"
                        )
                        rates[tag].append(rate)
                        cpus[tag].append(cpu)
                        print(
                            f"  round {round_ + 1} {tag:>8}: {rate:,.0f} rec/s, CPU {cpu:.1f} us "
                            "per record",
                            flush=True,
                        )
                base = rates["redis-1"]
                for tag, values in rates.items():
                    ratios = [v / b for v, b in zip(values, base, strict=True)]
                    print(
                        f"  {tag:>8}: median {statistics.median(values):,.0f} rec/s "
                        f"[{min(values):,.0f}-{max(values):,.0f}]; vs redis-1 in the same "
                        f"round {statistics.median(ratios):.2f}x [{min(ratios):.2f}-"
                        f"{max(ratios):.2f}]; CPU per record {statistics.median(cpus[tag]):.1f} "
                        f"us [{min(cpus[tag]):.1f}-{max(cpus[tag]):.1f}]"
                    )
                results["throughput"] = rates
                results["cpu_us_per_record"] = cpus
        finally:
            bench.client.close()
            server.stop()
        print(f"load after: {os.getloadavg()[0]:.2f}")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
