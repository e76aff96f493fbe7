"""Poller beside its peers: the same no-op jobs, the same broker, the same machine, one run.

    python bench/peers.py [--jobs 10000] [--rate 200] [--seconds 10] [--repeat 3]
                          [--only NAME,...] [--quick]

Set-up, once: the peers come with the bench extra (pip install -e '.[dev,bench]'), except arq,
which needs a virtualenv of its own (see below):

    python3 -m venv .venv/arq && .venv/arq/bin/pip install 'arq>=0.28'

Contenders (``--only`` takes these names, or ``redis`` / ``kafka`` for a whole table):

  Redis queue, on one private redis-server:
    poller-b1, poller-b10  ``poller run`` with a redis-queue:// mapping, BatchSize 1 / 10
    celery                 ``celery -A APP worker --pool prefork --concurrency CORES``,
                           Redis broker, ``task_acks_late=True``
    dramatiq               ``dramatiq APP`` (its default processes and threads), Redis broker
    arq                    ``arq APP.WorkerSettings``, from its own virtualenv (``--arq-python``):
                           arq pins redis-py < 6 and kombu (Celery) needs >= 6.4, so the two
                           cannot share one
  Kafka, on one tansu broker, a fresh one-partition topic per run:
    poller-kafka           ``poller run`` with a kafka:// mapping (BatchSize 100, no window),
                           when this checkout's poller can run one (poller_consumes_kafka)
    faust                  ``faust -A APP worker``, faust-streaming, a no-op agent
    kafka-python           the baseline: a bare KafkaConsumer poll / run / commit loop
    kafka-python-10ms      the same with fetch_max_wait_ms=10 (see contenders() for why)

Every worker is a subprocess started the way its users start it, with its defaults (log level,
prefetch, pool size) except where named above; the apps are in ``bench/peers_apps/``. Every
job runs the same no-op: it appends "enqueued-at started-at" to a file (``peers_record.py``).
For each contender and each of ``--repeat`` rounds (the order rotates every round):

  * drain: N jobs are enqueued first with the contender's own client, then the worker
    starts; records/s = N / (last job's start - first job's start), so start-up is not
    counted. CPU per record = user + system CPU of the worker's whole process tree (and,
    apart, of the broker) from its first job to its last, over N. At the end of the drain,
    "procs" is the number of processes in the worker's tree and "PSS MB" their memory
    (proportional set size, so pages a forked pool shares count once). "start s" is from
    launching the worker to its first job (for Kafka mostly the broker's group join delay).
    A drain still short after ``--drain-timeout`` is reported on what it did ("capped").
  * latency: the worker starts on an empty queue; once it has run a probe job, a producer
    enqueues jobs at ``--rate`` for ``--warmup`` + ``--seconds`` s; p50/p99 of started-at -
    enqueued-at over the jobs after the warm-up (wall clock, one machine).

The figure per contender is the median over the rounds, with the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "bench" / "peers_apps"
# bench/ itself off the path: bench/kafka.py would stand in for kafka-python.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(APPS))

from peers_record import LINE_BYTES  # noqa: E402

from tests.servers import RedisServer, TansuServer, free_port  # noqa: E402

CORES = os.cpu_count() or 1
STREAM = "peers"
KAFKA_BATCH = 100
STOP_TIMEOUT_S = 30.0


@dataclass
class Run:
    """Where one contender's worker runs this time, and what it may need."""

    workdir: Path
    redis_url: str
    kafka: str
    topic: str = field(default_factory=lambda: f"peers-{uuid.uuid4().hex[:8]}")
    group: str = field(default_factory=lambda: f"peers-{uuid.uuid4().hex[:8]}")

    @property
    def out(self) -> Path:
        return self.workdir / "jobs.txt"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(APPS), os.environ.get("PYTHONPATH")])),
            "PEERS_OUT": str(self.out),
            "PEERS_REDIS_URL": self.redis_url,
            "PEERS_STREAM": STREAM,
            "PEERS_KAFKA": self.kafka,
            "PEERS_TOPIC": self.topic,
            "PEERS_GROUP": self.group,
        }


@dataclass(frozen=True)
class Contender:
    name: str
    broker: str  # "redis" or "kafka"
    python: str
    producer: str  # module in bench/peers_apps with open_producer()
    package: str  # distribution whose version is reported
    command: Callable[[Run], list[str]]
    prepare: Callable[[Run], None] = lambda run: None
    env: dict[str, str] = field(default_factory=dict)  # on top of Run.env(), for the worker


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    broker_us: list[float] = field(default_factory=list)
    procs: list[int] = field(default_factory=list)
    pss_mb: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    capped: bool = False

    def add(self, kind: str, got: dict[str, float]) -> None:
        if kind == "drain":
            self.rates.append(got["rate"])
            self.cpu_us.append(got["cpu_us"])
            self.broker_us.append(got["broker_us"])
            self.procs.append(int(got["procs"]))
            self.pss_mb.append(got["pss_mb"])
            self.start_s.append(got["start_s"])
            self.capped = self.capped or bool(got["capped"])
        else:
            self.p50.append(got["p50"])
            self.p99.append(got["p99"])


# -- the contenders ----------------------------------------------------------------------------


def poller_config(run: Run, source: str, batch: int, extra: str = "") -> Path:
    config = run.workdir / "poller.toml"
    config.write_text(
        textwrap.dedent(
            f"""
        [daemon]
        http_listen = "127.0.0.1:{free_port()}"

        [state]
        url = "sqlite:///{run.workdir}/state.db"

        [[functions]]
        name = "noop"
        handler = "poller_noop.handler"
        code_path = "{APPS}"
        # Workers of a bench run with PYTHONPATH=<checkout> run that checkout's worker too.
        inherit_environment = ["PYTHONPATH"]
        environment = {{ PEERS_OUT = "{run.out}" }}

        [[mappings]]
        name = "peers"
        function_name = "noop"
        event_source_arn = "{source}"
        batch_size = {batch}
        maximum_batching_window_in_seconds = 0
        """
        )
        + extra
    )
    return config


def poller_redis(batch: int) -> Contender:
    def prepare(run: Run) -> None:
        client = redis.Redis.from_url(run.redis_url)
        client.xgroup_create(STREAM, "peers", id="0", mkstream=True)
        client.close()

    def command(run: Run) -> list[str]:
        source = run.redis_url.replace("redis://", "redis-queue://") + f"/{STREAM}?group=peers"
        return [
            sys.executable,
            "-m",
            "poller.cli",
            "run",
            "--config",
            str(poller_config(run, source, batch)),
        ]

    return Contender(
        f"poller-b{batch}", "redis", sys.executable, "poller_noop", "poller", command, prepare
    )


def poller_kafka(run: Run) -> list[str]:
    source = f"kafka://{run.kafka}/{run.topic}"
    extra = f'starting_position = "TRIM_HORIZON"\nconsumer_group_id = "{run.group}"\n'
    return [
        sys.executable,
        "-m",
        "poller.cli",
        "run",
        "--config",
        str(poller_config(run, source, KAFKA_BATCH, extra)),
    ]


def poller_consumes_kafka() -> bool:
    """Whether this checkout's poller can run a kafka:// mapping.

    poller.sources.kafka may exist for the URI alone: since the sources became one module
    each, a kind without an ``open`` is refused by the daemon as not supported.
    """
    try:
        module = importlib.import_module("poller.sources.kafka")
    except ImportError:
        return False
    kind = getattr(module, "SOURCE", None)
    return kind is None or getattr(kind, "open", None) is not None


def create_topic(run: Run) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=run.kafka, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(run.topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()


def contenders(arq_python: str) -> list[Contender]:
    bin_dir = Path(sys.executable).parent
    found = [
        poller_redis(1),
        poller_redis(10),
        Contender(
            "celery",
            "redis",
            sys.executable,
            "celery_app",
            "celery",
            lambda run: [
                str(bin_dir / "celery"),
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(CORES),
            ],
        ),
        Contender(
            "dramatiq",
            "redis",
            sys.executable,
            "dramatiq_app",
            "dramatiq",
            lambda run: [str(bin_dir / "dramatiq"), "dramatiq_app"],
        ),
        Contender(
            "arq",
            "redis",
            arq_python,
            "arq_app",
            "arq",
            lambda run: [str(Path(arq_python).parent / "arq"), "arq_app.WorkerSettings"],
        ),
    ]
    if poller_consumes_kafka():
        found.append(
            Contender(
                "poller-kafka",
                "kafka",
                sys.executable,
                "kafka_raw",
                "poller",
                poller_kafka,
                create_topic,
            )
        )
    found += [
        Contender(
            "faust",
            "kafka",
            sys.executable,
            "kafka_raw",
            "faust-streaming",
            lambda run: [str(bin_dir / "faust"), "-A", "faust_app", "worker"],
            create_topic,
        ),
        Contender(
            "kafka-python",
            "kafka",
            sys.executable,
            "kafka_raw",
            "kafka-python",
            lambda run: [sys.executable, str(APPS / "kafka_raw.py")],
            create_topic,
        ),
        # tansu holds a fetch for a good part of its max wait even when records arrive, so
        # on it a consumer's latency follows that setting (kafka-python 500 ms, faust 1.5 s);
        # this row shows what the same loop gets with a short one.
        Contender(
            "kafka-python-10ms",
            "kafka",
            sys.executable,
            "kafka_raw",
            "kafka-python",
            lambda run: [sys.executable, str(APPS / "kafka_raw.py")],
            create_topic,
            {"PEERS_FETCH_MAX_WAIT_MS": "10"},
        ),
    ]
    return found


def version(contender: Contender) -> str:
    code = f"import importlib.metadata as m; print(m.version({contender.package!r}))"
    try:
        found = subprocess.run(
            [contender.python, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    if contender.package == "poller":
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{found}+{commit}" if commit else found
    return found


# -- one run -----------------------------------------------------------------------------------


class Worker:
    """A contender's worker as its own session, so stopping it reaches every process it made."""

    def __init__(self, contender: Contender, run: Run) -> None:
        self.log = (run.workdir / "worker.log").open("wb")
        self.launched = time.time()
        self.proc = subprocess.Popen(
            contender.command(run),
            cwd=run.workdir,
            env=run.env() | contender.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log.name}")

    def tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        return []

    def stop(self) -> None:
        tree = self.tree()
        self.proc.send_signal(signal.SIGTERM)  # what `kill PID` or Ctrl-C does for a user
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"    (worker ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killed)")
        # Whatever a graceful exit left behind, or all of it after a timeout. psutil checks a
        # process's start time, so a pid reused since is never hit.
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out: dict[int, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    # A process started meanwhile counts from zero.
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def pss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total / 2**20


def jobs_done(out: Path) -> int:
    return out.stat().st_size // LINE_BYTES


def read_lines(out: Path) -> list[tuple[float, float]]:
    return [
        (float(sent), float(start))
        for sent, start in (line.split() for line in out.read_text().splitlines())
    ]


def produce(contender: Contender, run: Run, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [contender.python, str(APPS / "produce.py"), contender.producer, *args],
        env=run.env(),
        cwd=run.workdir,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"producer failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def drain(
    contender: Contender, run: Run, jobs: int, broker: psutil.Process, timeout: float
) -> dict[str, float]:
    contender.prepare(run)
    produce(contender, run, "--count", str(jobs))
    worker = Worker(contender, run)
    try:
        start_deadline = time.monotonic() + 120
        drain_deadline = math.inf
        before: tuple[dict[int, float], dict[int, float]] | None = None
        while (done := jobs_done(run.out)) < jobs:
            now = time.monotonic()
            if before is None and done:
                before = cpu_seconds(worker.tree()), cpu_seconds([broker])
                drain_deadline = now + timeout
            if before is None and now > start_deadline:
                raise RuntimeError(f"no job ran within 120 s; see {worker.log.name}")
            if now > drain_deadline:
                break
            worker.check()
            time.sleep(0.005)
        tree = worker.tree()
        after = cpu_seconds(tree), cpu_seconds([broker])
        memory = pss_mb(tree)
    finally:
        worker.stop()
    lines = read_lines(run.out)
    starts = sorted(start for _, start in lines)
    counted = starts[: min(done, jobs)]
    # Unknown (not start-up CPU passed off as drain CPU) when all N ran between two looks.
    cpu = [
        cpu_used(b, a) / len(counted) * 1e6 if before else math.nan
        for b, a in zip(before or ({}, {}), after, strict=True)
    ]
    return {
        "rate": len(counted) / (counted[-1] - counted[0]),
        "cpu_us": cpu[0],
        "broker_us": cpu[1],
        "procs": len(tree),
        "pss_mb": memory,
        "start_s": counted[0] - worker.launched,
        "capped": float(done < jobs),
        "duplicates": max(0, len(lines) - jobs),
    }


def latency(
    contender: Contender, run: Run, rate: float, seconds: float, warmup: float
) -> dict[str, float]:
    contender.prepare(run)
    worker = Worker(contender, run)
    try:
        sent = produce(
            contender,
            run,
            "--rate",
            str(rate),
            "--seconds",
            str(warmup + seconds),
            "--probe-until",
            str(run.out),
        )
        deadline = time.monotonic() + 30
        while True:
            measured = [(s, t) for s, t in read_lines(run.out) if s > 0]
            if len(measured) >= sent["sent"] or time.monotonic() > deadline:
                break
            worker.check()
            time.sleep(0.1)
    finally:
        worker.stop()
    cutoff = sent["first"] + warmup
    samples = sorted((t - s) * 1000 for s, t in measured if s >= cutoff)
    if len(samples) < 2:
        raise RuntimeError(f"only {len(samples)} jobs ran after the warm-up")
    quantiles = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50": quantiles[49],
        "p99": quantiles[98],
        "n": len(samples),
        "lost": sent["sent"] - len(measured),
        "offered": (sent["sent"] - 1) / (sent["last"] - sent["first"]),
    }


# -- the report --------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    middle = format(statistics.median(values), fmt)
    if len(values) == 1:
        return middle
    return f"{middle} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def table(title: str, rows: list[tuple[Contender, str, Result]]) -> str:
    header = (
        f"| {title} | version | drain rec/s | p50 ms | p99 ms | worker CPU µs/rec "
        f"| broker CPU µs/rec | procs | PSS MB | start s |"
    )
    lines = [header, "|" + "---|" * 10]
    for contender, ver, result in rows:
        name = contender.name + (" (capped)" if result.capped else "")
        lines.append(
            f"| {name} | {ver} | {spread(result.rates, ',.0f')} | {spread(result.p50, '.2f')} "
            f"| {spread(result.p99, '.2f')} | {spread(result.cpu_us, '.0f')} "
            f"| {spread(result.broker_us, '.0f')} | {spread(result.procs, '.0f')} "
            f"| {spread(result.pss_mb, '.0f')} | {spread(result.start_s, '.1f')} |"
        )
    return "\n".join(lines)


def measure(
    kind: str, contender: Contender, run: Run, broker: psutil.Process, args: argparse.Namespace
) -> dict[str, float]:
    if kind == "drain":
        return drain(contender, run, args.jobs, broker, args.drain_timeout)
    return latency(contender, run, args.rate, args.seconds, args.warmup)


def describe(kind: str, got: dict[str, float], args: argparse.Namespace) -> str:
    if kind == "drain":
        text = (
            f"{got['rate']:,.0f} rec/s, {got['cpu_us']:.0f} µs CPU/rec, {got['procs']:.0f} "
            f"procs, {got['pss_mb']:.0f} MB, first job after {got['start_s']:.1f} s"
        )
        if got["capped"]:
            text += f"; CAPPED after {args.drain_timeout:g} s"
        if got["duplicates"]:
            text += f"; {got['duplicates']:.0f} jobs ran twice"
        return text
    text = (
        f"p50 {got['p50']:.2f} ms, p99 {got['p99']:.2f} ms "
        f"over {got['n']:.0f} jobs at {got['offered']:.0f}/s"
    )
    if got["lost"]:
        text += f"; {got['lost']:.0f} jobs never ran"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per drain")
    parser.add_argument("--rate", type=float, default=200.0, help="offered load, jobs/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured latency window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the order rotates")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="stop a drain after this long and report what it did",
    )
    parser.add_argument("--only", help="comma-separated contender names, or redis / kafka")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 1,000 jobs, 3 s of latency, one round"
    )
    parser.add_argument(
        "--arq-python",
        default=str(ROOT / ".venv" / "arq" / "bin" / "python"),
        help="interpreter of a virtualenv with arq installed",
    )
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.seconds, args.warmup, args.repeat = 1000, 3.0, 1.0, 1

    everyone = contenders(args.arq_python)
    if not poller_consumes_kafka():
        print("poller: kafka source not available in this checkout")
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in everyone} - {"redis", "kafka", "poller-kafka"}
        if unknown:
            parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
        everyone = [c for c in everyone if c.name in wanted or c.broker in wanted]
    chosen = []
    for contender in everyone:
        if not Path(contender.python).exists():
            print(
                f"{contender.name}: skipped, no {contender.python}; make it with:\n"
                f"    python3 -m venv .venv/arq && .venv/arq/bin/pip install 'arq>=0.28'"
            )
        else:
            chosen.append(contender)
    if not chosen:
        parser.exit(1, "nothing to run\n")
    versions = {c.name: version(c) for c in chosen}
    results = {c.name: Result() for c in chosen}
    raw: list[dict[str, object]] = []

    with tempfile.TemporaryDirectory(prefix="poller-peers-") as tmp:
        workdir = Path(tmp)
        servers: dict[str, RedisServer | TansuServer] = {}
        if any(c.broker == "redis" for c in chosen):
            servers["redis"] = RedisServer(workdir / "redis")
        if any(c.broker == "kafka" for c in chosen):
            servers["kafka"] = TansuServer(workdir / "tansu")
        for server in servers.values():
            server.start()
        load_before = os.getloadavg()
        try:
            redis_url = servers["redis"].url if "redis" in servers else ""
            kafka = servers["kafka"].url if "kafka" in servers else ""
            print(
                f"{CORES} CPUs, load {load_before[0]:.2f}; {args.jobs:,} jobs per drain; "
                f"latency at {args.rate:g} jobs/s for {args.seconds:g} s after "
                f"{args.warmup:g} s; {args.repeat} round(s)"
            )
            print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
            for round_no in range(args.repeat):
                order = chosen[round_no % len(chosen) :] + chosen[: round_no % len(chosen)]
                for kind in ("drain", "latency"):
                    for contender in order:
                        if contender.broker == "redis":
                            with redis.Redis.from_url(redis_url) as client:
                                client.flushall()
                        run = Run(workdir / f"{contender.name}-{kind}-{round_no}", redis_url, kafka)
                        run.workdir.mkdir()
                        run.out.touch()
                        broker = psutil.Process(servers[contender.broker].proc.pid)
                        try:
                            got = measure(kind, contender, run, broker, args)
                            results[contender.name].add(kind, got)
                            summary = describe(kind, got, args)
                        except RuntimeError as exc:
                            got = {"error": str(exc)}
                            summary = f"FAILED: {exc}"
                        print(
                            f"  round {round_no + 1} {kind:7} {contender.name:17} {summary}",
                            flush=True,
                        )
                        raw.append(
                            {"round": round_no + 1, "kind": kind, "contender": contender.name} | got
                        )
        finally:
            for server in servers.values():
                server.stop()
        load_after = os.getloadavg()

    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    for broker, title in (("redis", "Redis queue"), ("kafka", "Kafka topic")):
        rows = [(c, versions[c.name], results[c.name]) for c in chosen if c.broker == broker]
        if rows:
            print()
            print(table(title, rows))
    print()
    print(json.dumps(raw))


if __name__ == "__main__":
    main()
