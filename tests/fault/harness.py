"""Rounds of seeded random faults against a real daemon and real servers, and what each round
must prove: every record handled at least once or dead-lettered with a reason, order per key
on ordered sources, duplicates bounded by the batches in flight when a fault hit, the daemon
ready again after each fault, and no traceback in its log.

A round: load part of the records, start `poller run` on a config declaring one mapping, keep
producing the rest while faults are injected at seeded random moments (each healed before the
next: the daemon restarted, the server back, the proxy flowing), then wait until every record
is accounted for and check. ``Workload`` subclasses (workloads.py) say how to make, feed and
read back each kind of source, and which faults apply to it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import textwrap
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tests.daemon_helpers import DaemonProcess, wait_for
from tests.fault.proxy import Proxy
from tests.servers import free_port

# The handler every round runs: it notes each record it was given once it is done with it.
HANDLER = textwrap.dedent(
    """
    import base64, json, os, time

    def _payloads(event):
        if "Records" in event:
            for r in event["Records"]:
                if "body" in r:
                    yield r["body"]
                elif "kinesis" in r:
                    yield base64.b64decode(r["kinesis"]["data"]).decode()
                else:
                    yield r["dynamodb"]["NewImage"]["payload"]["S"]
        else:  # Kafka
            for records in event["records"].values():
                for r in records:
                    yield base64.b64decode(r["value"]).decode()

    def handler(event, context):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        lines = []
        for payload in _payloads(event):
            record = json.loads(payload)
            record["request"] = context.aws_request_id
            lines.append(json.dumps(record) + "\\n")
        with open(os.environ["OUT"], "a") as out:
            out.write("".join(lines))
    """
)

FAULT_KINDS = (
    "kill_daemon",
    "kill_worker",
    "pause_daemon",
    "restart_server",
    "proxy_drop",
    "proxy_stall",
    "proxy_half_close",
)


@dataclass
class Record:
    id: str
    key: str


@dataclass
class Outcome:
    """What a round saw, for its checks and the report."""

    seed: int
    faults: list[str] = field(default_factory=list)
    sent: list[Record] = field(default_factory=list)
    sent_so_far: list[Record] = field(default_factory=list)  # what the source was given
    handled: list[dict[str, Any]] = field(default_factory=list)
    dead: dict[str, str] = field(default_factory=dict)  # id -> reason


class Workload:
    """One kind of source in fault rounds. Subclasses fill in the service's side."""

    name: ClassVar[str]
    ordered: ClassVar[bool] = False
    faults: ClassVar[tuple[str, ...]] = ("kill_daemon", "kill_worker", "pause_daemon")
    batch_size: ClassVar[int] = 10
    concurrency: ClassVar[int] = 4  # batches in flight at most (MaximumConcurrency or lanes)
    pause_s: ClassVar[float] = 3.0  # a SIGSTOP longer than the visibility timeout or lease
    keys: ClassVar[int] = 4

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proxy: Proxy | None = None

    def setup(self) -> None:
        """Create the source (and the proxy in front of its server, if any)."""

    def teardown(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    def mapping(self) -> str:
        """The [[mappings]] entry's lines beyond name and function."""
        raise NotImplementedError

    def config(self) -> str:
        """Config sections the source needs ([aws], [redis], ...)."""
        return ""

    def send(self, records: list[Record]) -> None:
        raise NotImplementedError

    def dead_letters(self) -> dict[str, str]:
        """Records the daemon gave up on: id -> reason."""
        return {}

    def restart_server(self, outcome: Outcome) -> None:
        raise NotImplementedError


class Round:
    def __init__(self, workload: Workload, seed: int, records: int = 240) -> None:
        self.workload = workload
        self.seed = seed
        self.random = random.Random(seed)
        self.total = records
        self.workdir = workload.workdir
        self.out = self.workdir / "handled.jsonl"
        self.outcome = Outcome(seed)
        self.daemon: DaemonProcess | None = None
        # Sends and server restarts do not interleave: a restart resends what was sent so far.
        self._sending = threading.Lock()

    # -- running ------------------------------------------------------------------------------
    def run(self, faults: int) -> Outcome:
        workload = self.workload
        workload.setup()
        records = [Record(f"{self.seed}-{i}", f"k{i % workload.keys}") for i in range(self.total)]
        self.outcome.sent = records
        self._send(records[: self.total // 2])
        port = free_port()
        config = self._config(port)
        self.daemon = DaemonProcess(config, port)
        producer = threading.Thread(target=self._produce, args=(records[self.total // 2 :],))
        try:
            self.daemon.start()
            producer.start()
            for _ in range(faults):
                time.sleep(self.random.uniform(0.3, 2.0))
                kind = self.random.choice(workload.faults)
                self.outcome.faults.append(kind)
                self._inject(kind)
                self.daemon.wait_ready(60)  # back to ready after every fault
            producer.join()
            wait_for(self._accounted, 120, f"every record of round {self.seed} accounted for")
        finally:
            if producer.is_alive():
                producer.join()
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self.daemon.stop()
            workload.teardown()
        self.outcome.handled = self._handled()
        self.outcome.dead = workload.dead_letters()
        return self.outcome

    def _produce(self, records: list[Record]) -> None:
        for start in range(0, len(records), 20):
            self._send(records[start : start + 20])
            time.sleep(0.1)

    def _send(self, records: list[Record]) -> None:
        """Send, waiting out a server the round has just broken (as a producer would)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self._sending:
                    self.workload.send(records)
                    self.outcome.sent_so_far += records
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _config(self, port: int) -> Path:
        workload = self.workload
        (self.workdir / "fault_handler.py").write_text(HANDLER)
        config = self.workdir / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [daemon]
                http_listen = "127.0.0.1:{port}"
                shutdown_grace_s = 10
                reconcile_interval_s = 0.5
                """
            )
            + workload.config()
            + textwrap.dedent(
                f"""
                [[functions]]
                name = "h"
                handler = "fault_handler.handler"
                timeout_s = 10
                environment = {{ OUT = "{self.out}", SLEEP = "0.05" }}

                [[mappings]]
                name = "fault"
                function_name = "h"
                batch_size = {workload.batch_size}
                """
            )
            + workload.mapping()
        )
        return config

    def _inject(self, kind: str) -> None:
        daemon = self.daemon
        assert daemon is not None and daemon.proc is not None
        workload = self.workload
        if kind == "kill_daemon":
            daemon.stop(signal.SIGKILL)
            daemon.start()
        elif kind == "kill_worker":
            workers = _children(daemon.proc.pid)
            if workers:
                os.kill(self.random.choice(workers), signal.SIGKILL)
        elif kind == "pause_daemon":
            daemon.proc.send_signal(signal.SIGSTOP)
            time.sleep(workload.pause_s)
            daemon.proc.send_signal(signal.SIGCONT)
        elif kind == "restart_server":
            with self._sending:
                workload.restart_server(self.outcome)
        elif kind == "proxy_drop":
            assert workload.proxy is not None
            workload.proxy.drop()
        elif kind == "proxy_stall":
            assert workload.proxy is not None
            workload.proxy.stall(self.random.uniform(1.0, 4.0))
        elif kind == "proxy_half_close":
            assert workload.proxy is not None
            workload.proxy.half_close()
        else:
            raise AssertionError(f"unknown fault {kind}")

    # -- accounting ---------------------------------------------------------------------------
    def _handled(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        # A worker killed while writing may leave a torn last line: not a delivery.
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _accounted(self) -> bool:
        done = {r["id"] for r in self._handled()}
        missing = [r for r in self.outcome.sent if r.id not in done]
        if not missing:
            return True
        dead = self.workload.dead_letters()
        return all(r.id in dead for r in missing)

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> dict[str, int]:
        """Assert what every round must hold; return its figures."""
        outcome = self.outcome
        workload = self.workload
        handled_ids = Counter(r["id"] for r in outcome.handled)
        lost = [r.id for r in outcome.sent if r.id not in handled_ids and r.id not in outcome.dead]
        assert not lost, f"seed {outcome.seed}: {len(lost)} records lost, e.g. {lost[:5]}"
        assert all(outcome.dead.values()), f"seed {outcome.seed}: a dead letter has no reason"
        duplicates = sum(n - 1 for n in handled_ids.values())
        # Each fault can replay what was in flight: every batch of every slot, twice over for
        # a delete or checkpoint that was itself in flight; a pause past the visibility
        # timeout replays the same.
        bound = (len(outcome.faults) + 1) * workload.concurrency * workload.batch_size * 2
        assert duplicates <= bound, (
            f"seed {outcome.seed}: {duplicates} duplicates (faults {outcome.faults}, bound {bound})"
        )
        if workload.ordered:
            firsts: dict[str, list[str]] = defaultdict(list)
            seen: set[str] = set()
            for record in outcome.handled:
                if record["id"] not in seen:
                    seen.add(record["id"])
                    firsts[record["key"]].append(record["id"])
            sent: dict[str, list[str]] = defaultdict(list)
            for record in outcome.sent:
                if record.id in seen:
                    sent[record.key].append(record.id)
            assert firsts == sent, f"seed {outcome.seed}: order per key broken"
        assert self.daemon is not None
        log = self.daemon.logs()
        assert "Traceback (most recent call last)" not in log, (
            f"seed {outcome.seed}: a traceback in the daemon's log:\n{_around_traceback(log)}"
        )
        return {
            "records": len(outcome.sent),
            "duplicates": duplicates,
            "dead_lettered": len(outcome.dead),
        }


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _around_traceback(log: str) -> str:
    index = log.index("Traceback (most recent call last)")
    return log[max(index - 500, 0) : index + 2500]
