"""A fleet of real `poller run` daemons on one redis-server sharing a redis-stream mapping of
8 keys by leases: kill -9, SIGSTOP past the lease, a rolling restart; nothing lost, order per
key kept, duplicates only from the batches a killed daemon left unfinished."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.servers import free_port

KEYS = [f"fleet-k{i}" for i in range(8)]
BATCH = 10
LANES = 2

HANDLER = textwrap.dedent(
    """
    import base64, json, os, time

    # The daemon that started this worker (a worker orphaned by a kill -9 is reparented).
    DAEMON = os.getppid()

    def handle(event, context):
        with open(os.environ["STARTS"], "a") as f:
            f.write(json.dumps({"pid": DAEMON, "request": context.aws_request_id}) + "\\n")
        time.sleep(float(os.environ["SLEEP"]))
        now = time.time()
        with open(os.environ["OUT"], "a") as f:
            f.write("".join(json.dumps({
                "pid": DAEMON,
                "shard": r["eventID"].rsplit(":", 1)[0],
                "seq": r["kinesis"]["sequenceNumber"],
                "pk": r["kinesis"]["partitionKey"],
                "t": now,
                "request": context.aws_request_id,
            }) + "\\n" for r in event["Records"]))
    """
)


def _entry(record: dict[str, Any]) -> tuple[str, str]:
    """Entry ids repeat across keys: a record is its key and its id."""
    return record["shard"], record["seq"]


def _id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)


@dataclass
class Fleet:
    tmp: Path
    redis_url: str
    lease_s: float | None = None
    prefix: str = "stream-fleet:"
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)
    uuid: str = ""

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.redis_url)
        self.out = self.tmp / "handled.jsonl"
        self.starts = self.tmp / "starts.jsonl"
        (self.tmp / "fleet_stream.py").write_text(HANDLER)

    def config(self, name: str, sleep: float) -> tuple[Path, int]:
        port = free_port()
        directory = self.tmp / name
        directory.mkdir(exist_ok=True)
        fleet = f"[fleet]\nlease_duration_s = {self.lease_s}\n" if self.lease_s else ""
        config = directory / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [daemon]
                http_listen = "127.0.0.1:{port}"
                shutdown_grace_s = 20

                [state]
                url = "{self.redis_url}"
                key_prefix = "{self.prefix}"

                [[functions]]
                name = "handle"
                handler = "fleet_stream.handle"
                code_path = "{self.tmp}"
                timeout_s = 60
                environment = {{ OUT = "{self.out}", STARTS = "{self.starts}", SLEEP = "{sleep}" }}
                """
            )
            + fleet
        )
        return config, port

    def start(self, name: str, sleep: float = 0.05) -> DaemonProcess:
        config, port = self.config(name, sleep)
        daemon = DaemonProcess(config, port)
        daemon.start()
        self.daemons[name] = daemon
        return daemon

    def create_mapping(self) -> None:
        host_port = self.redis_url.removeprefix("redis://").split("/")[0]
        uri = f"redis-stream://{host_port}/0/{','.join(KEYS)}"
        config = next(iter(self.daemons.values())).config
        created = cli(
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
            str(BATCH),
            "--parallelization-factor",
            str(LANES),
        )
        self.uuid = json.loads(created.stdout)["UUID"]

    def pid(self, name: str) -> int:
        proc = self.daemons[name].proc
        assert proc is not None
        return proc.pid

    def leases(self) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(f"{self.prefix}leases:{self.uuid}")
        seconds, micros = self.client.time()
        now = seconds * 1000 + micros // 1000
        out = {}
        for shard, value in raw.items():
            lease = json.loads(value)
            if lease.get("owner") and lease["expires"] > now:
                # Daemon ids are HOST-PID-RANDOM.
                out[shard.decode()] = {**lease, "pid": int(lease["owner"].rsplit("-", 2)[1])}
        return out

    def load(self) -> Counter[int]:
        return Counter(lease["pid"] for lease in self.leases().values())

    def balanced(self, names: list[str]) -> bool:
        load = self.load()
        share = -(-len(KEYS) // len(names))
        return (
            set(load) == {self.pid(n) for n in names}
            and sum(load.values()) == len(KEYS)
            and max(load.values()) <= share
        )

    def handled(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def in_stream(self) -> set[tuple[str, str]]:
        return {(key, entry[0].decode()) for key in KEYS for entry in self.client.xrange(key)}

    def all_handled(self) -> bool:
        return {_entry(r) for r in self.handled()} >= self.in_stream()

    def checkpoints(self) -> dict[str, str]:
        raw = self.client.hgetall(f"{self.prefix}checkpoints:{self.uuid}")
        return {k.decode(): json.loads(v)["position"] for k, v in raw.items()}

    def stop_all(self) -> None:
        for daemon in self.daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)
                daemon.stop(signal.SIGKILL)


@contextmanager
def _fleet(tmp: Path, redis_url: str, lease_s: float | None = None) -> Iterator[Fleet]:
    fleet = Fleet(tmp, redis_url, lease_s)
    fleet.client.delete(*KEYS)
    try:
        yield fleet
    finally:
        fleet.stop_all()


@contextmanager
def _producing(fleet: Fleet, per_second: float = 80) -> Iterator[None]:
    """Records on every key, each key's partition keys spread over the lanes, until the end."""
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            pipe = fleet.client.pipeline(transaction=False)
            for key in KEYS:
                pipe.xadd(key, {"body": f"{key}-{n}", "pk": f"{key}-p{n % 3}"})
            pipe.execute()
            n += 1
            stop.wait(len(KEYS) / per_second)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _first_deliveries_in_order(records: list[dict[str, Any]]) -> None:
    seen: set[tuple[str, str]] = set()
    per_key: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if _entry(record) not in seen:
            seen.add(_entry(record))
            per_key[record["pk"]].append(record["seq"])
    for pk, seqs in per_key.items():
        assert seqs == sorted(seqs, key=_id), f"order of {pk} broken"


def _leases_held_metric(daemon: DaemonProcess, uuid: str) -> float | None:
    for line in daemon.http("/metrics")[1].splitlines():
        if line.startswith("poller_leases_held{") and uuid in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _check_views(fleet: Fleet) -> None:
    """`poller fleet`, `poller mappings get` and each daemon's poller_leases_held agree with
    the lease table."""
    config = fleet.daemons["a"].config
    pids = {fleet.pid(n): n for n in fleet.daemons}

    def metrics_agree() -> bool:
        held = {pid: _leases_held_metric(fleet.daemons[n], fleet.uuid) for pid, n in pids.items()}
        return held == {pid: fleet.load()[pid] for pid in pids}

    wait_for(metrics_agree, 10, "poller_leases_held of each daemon")
    load = fleet.load()

    def reported() -> dict[str, Any]:
        view = json.loads(cli(config, "fleet").stdout)
        return {
            s["ShardId"]: (m["Pid"], s["State"], s["IteratorAgeSeconds"])
            for m in view["Members"]
            for s in m["Shards"]
        }

    # Reports follow the leases within a second or two.
    wait_for(lambda: all(state for _, state, _ in reported().values()), 10, "shard reports")
    view = json.loads(cli(config, "fleet").stdout)
    assert {m["Pid"] for m in view["Members"]} == set(pids)
    assert {m["Pid"]: m["LeasesHeld"] for m in view["Members"]} == dict(load)
    assert view["UnownedShards"] == []
    leases = fleet.leases()
    assert {shard: pid for shard, (pid, _, _) in reported().items()} == {
        shard: lease["pid"] for shard, lease in leases.items()
    }
    table = cli(config, "fleet", "--output", "table").stdout
    assert all(str(pid) in table for pid in pids) and all(key in table for key in KEYS)
    got = json.loads(cli(config, "mappings", "get", fleet.uuid).stdout)
    assert sorted(s["ShardId"] for s in got["Shards"]) == sorted(KEYS)
    assert all(s["State"] != "not running" for s in got["Shards"])


def _resumed_within(fleet: Fleet, shards: set[str], after: float, by: set[int]) -> float:
    """Seconds from ``after`` until every shard had a record handled by one of ``by``."""
    first: dict[str, float] = {}
    for record in fleet.handled():
        if record["pid"] in by and record["t"] > after and record["shard"] in shards:
            first.setdefault(record["shard"], record["t"])
    assert set(first) == shards, f"not resumed: {shards - set(first)}"
    return max(first.values()) - after


def test_kill_9_hands_the_shards_to_the_survivors_within_15_s(
    tmp_path: Path, redis_url: str
) -> None:
    with _fleet(tmp_path, redis_url) as fleet:  # the default lease: 10 s
        for name in ("a", "b", "c"):
            fleet.start(name)
        fleet.create_mapping()
        with _producing(fleet):
            wait_for(lambda: fleet.balanced(["a", "b", "c"]), 60, "leases 3, 3, 2")
            _check_views(fleet)

            victim = next(n for n in "abc" if fleet.load()[fleet.pid(n)] == 3)
            victim_pid = fleet.pid(victim)
            victim_shards = {s for s, lease in fleet.leases().items() if lease["pid"] == victim_pid}
            survivors = [n for n in "abc" if n != victim]
            wait_for(
                lambda: (
                    {r["shard"] for r in fleet.handled() if r["pid"] == victim_pid} >= victim_shards
                ),
                30,
                "the victim processing its shards",
            )
            killed_at = time.time()
            fleet.daemons[victim].stop(signal.SIGKILL)
            survivor_pids = {fleet.pid(n) for n in survivors}
            wait_for(
                lambda: (
                    {
                        r["shard"]
                        for r in fleet.handled()
                        if r["pid"] in survivor_pids and r["t"] > killed_at
                    }
                    >= victim_shards
                ),
                30,
                "the victim's shards processed again",
            )
            assert _resumed_within(fleet, victim_shards, killed_at, survivor_pids) <= 15
            wait_for(lambda: fleet.balanced(survivors), 30, "leases 4, 4")
        wait_for(fleet.all_handled, 60, "every record handled")
        for name in survivors:
            assert fleet.daemons[name].stop() == 0
        records = fleet.handled()
    # Nothing lost; duplicates only on the victim's shards, of records it had handled in the
    # batches it left unchecked (one per lane per shard at most).
    counts = Counter(_entry(r) for r in records)
    duplicates = {entry for entry, n in counts.items() if n > 1}
    assert set(counts) == fleet.in_stream()
    by_victim = {_entry(r) for r in records if r["pid"] == victim_pid}
    assert duplicates <= by_victim
    assert {shard for shard, _ in duplicates} <= victim_shards
    assert len(duplicates) <= len(victim_shards) * LANES * BATCH
    assert all(n <= 2 for n in counts.values())
    _first_deliveries_in_order(records)


def test_a_daemon_woken_after_its_lease_expired_cannot_checkpoint(
    tmp_path: Path, redis_url: str
) -> None:
    with _fleet(tmp_path, redis_url, lease_s=2) as fleet:
        fleet.start("a")
        fleet.start("b")
        # The one to be paused runs its batches slowly, so one is in flight when it stops.
        fleet.start("sleeper", sleep=1.5)
        fleet.create_mapping()
        with _producing(fleet, per_second=40):
            wait_for(lambda: fleet.balanced(["a", "b", "sleeper"]), 60, "balanced")
            sleeper = fleet.daemons["sleeper"]
            pid = fleet.pid("sleeper")
            its_shards = {s for s, lease in fleet.leases().items() if lease["pid"] == pid}

            def in_flight() -> bool:
                started = [
                    json.loads(line)["request"]
                    for line in fleet.starts.read_text().splitlines()
                    if json.loads(line)["pid"] == pid
                ]
                done = {r["request"] for r in fleet.handled()}
                return bool(started) and started[-1] not in done

            wait_for(in_flight, 30, "a batch of the sleeper in its handler")
            assert sleeper.proc is not None
            sleeper.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            others = {fleet.pid("a"), fleet.pid("b")}
            wait_for(lambda: fleet.balanced(["a", "b"]), 30, "its leases taken over")
            wait_for(
                lambda: (
                    {
                        r["shard"]
                        for r in fleet.handled()
                        if r["pid"] in others and r["t"] > stopped_at
                    }
                    >= its_shards
                ),
                30,
                "its shards processed by the others",
            )
            sleeper.proc.send_signal(signal.SIGCONT)

            def refused() -> list[dict[str, Any]]:
                return [
                    r
                    for r in sleeper.log_records()
                    if r.get("level") == "ERROR" and "refused" in r.get("message", "")
                ]

            wait_for(refused, 30, "the woken daemon's checkpoint refused and logged")
            assert "letting the shard go" in refused()[0]["message"]
            assert refused()[0]["shard"] in its_shards
            # It lets its shards go, rejoins, and gets a share back by asking for it.
            wait_for(lambda: fleet.balanced(["a", "b", "sleeper"]), 60, "balanced again")
        wait_for(fleet.all_handled, 60, "every record handled")
        for daemon in fleet.daemons.values():
            assert daemon.stop() == 0
        # No checkpoint went back: each is the newest entry of its key.
        newest = {key: fleet.client.xrevrange(key, count=1)[0][0].decode() for key in KEYS}
        assert fleet.checkpoints() == newest
        records = fleet.handled()
    assert {_entry(r) for r in records} == fleet.in_stream()
    _first_deliveries_in_order(records)


def test_a_rolling_restart_loses_nothing_and_hands_over_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    with _fleet(tmp_path, redis_url, lease_s=30) as fleet:
        names = ["a", "b", "c"]
        for name in names:
            fleet.start(name)
        fleet.create_mapping()
        handovers = []
        with _producing(fleet):
            wait_for(lambda: fleet.balanced(names), 60, "balanced")
            for index, name in enumerate(list(names)):
                pid = fleet.pid(name)
                held = {s for s, lease in fleet.leases().items() if lease["pid"] == pid}
                stopped_at = time.time()
                assert fleet.daemons[name].stop() == 0
                rest = {fleet.pid(n) for n in names if n != name}
                # Leases of 30 s: taken over long before one could lapse.
                wait_for(
                    lambda rest=rest, held=held, at=stopped_at: (
                        {r["shard"] for r in fleet.handled() if r["pid"] in rest and r["t"] > at}
                        >= held
                    ),
                    20,
                    "its shards processed by the others",
                )
                handovers.append(_resumed_within(fleet, held, stopped_at, rest))
                names[index] = f"{name}2"
                fleet.start(names[index])
                wait_for(lambda: fleet.balanced(names), 60, "balanced with the new daemon")
        wait_for(fleet.all_handled, 60, "every record handled")
        for name in names:
            assert fleet.daemons[name].stop() == 0
        records = fleet.handled()
    counts = Counter(_entry(r) for r in records)
    assert set(counts) == fleet.in_stream()
    # Every hand-over waited for the batches in flight to settle: nothing ran twice.
    assert max(counts.values()) == 1
    _first_deliveries_in_order(records)
    assert max(handovers) < 10, handovers


def test_the_fleet_command_needs_a_redis_store(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    result = cli(config, "fleet", check=False)
    assert result.returncode == 1
    assert "[state] url is SQLite" in result.stderr and "redis://" in result.stderr
