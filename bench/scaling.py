"""Scaling benchmark: a step from an empty local queue to a big backlog, and back to idle.

    python bench/scaling.py                          # the figures in bench/RESULTS.md
    python bench/scaling.py --mode warm --repeat 1 --no-floors
    python bench/scaling.py -n 5000 --concurrency 10

One mapping is built exactly as the daemon builds it (poller/daemon.py Supervisor._start):
``ScalingController(maximum=concurrency_bound(MaximumConcurrency, pool), batch_size=...)``
behind ``ScaledConcurrency``, driving a ``QueueRunner`` over a ``local://`` queue in a SQLite
state file, with a real ``Runtime`` whose environments are worker processes running a handler
that sleeps ``--sleep`` seconds. Everything runs on uvloop, logs go to /dev/null through
JsonLog, as in the daemon.

Each step run:

1. starts the runner on the empty queue and waits until the target has stepped down to the idle
   minimum (1);
2. t0: sends ``-n`` messages at once (``LocalQueue.send``, 1,000 rows per transaction, from
   the same process, so the idle long poll wakes at once);
3. samples ``runner.target`` (the controller's target) and ``runner.in_flight`` (invokes
   running: the ``poller_concurrent_executions`` gauge) every 10 ms, until every message is
   deleted and the target is back at the idle minimum.

Ideal drain time: ``ceil(messages / batch_size) * sleep / concurrency``: every slot busy with
a full batch from t0, zero overhead per invoke. The default, BatchSize 1, is the issue's
formula, messages x 50 ms / 50 = 20 s: one 50 ms invoke per message. ``--batch-size 10``
is the harder case (20,000 / 10 x 0.05 / 50 = 2.0 s), where the ramp weighs ten times more.

Two kinds of step run: "cold" (no environment exists at t0: the ramp includes spawning up to
``concurrency`` worker processes) and "warm" (``provisioned_concurrency = concurrency``: the
environments are started before t0, so the run shows the controller and the data path alone).
``--repeat`` runs of each, interleaved so machine noise hits both alike; the summary gives the
median and the range. The full report (figures, SQLite and CPU accounting, the ASCII trace)
is printed for the last run of each mode. Two floors, measured first, say where time goes:

* queue floor: receive + delete of batches of ``batch_size`` by ``concurrency`` concurrent
  tasks, no invoke at all: the most batches/s the local queue's SQLite thread can serve.
* pipeline floor: the warm run again with a handler that returns at once: the most batches/s
  the whole daemon path (receive, invoke over the pipe, delete, scaling) can serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from poller.config import FunctionConfig
from poller.engine.queue import (
    MANAGE_INTERVAL_S,
    QueueRunner,
    QueueSettings,
    ScaledConcurrency,
    concurrency_bound,
)
from poller.engine.scaling import ScalingController
from poller.logs import JsonLog
from poller.metrics import MappingMetrics
from poller.runtime.pool import Runtime
from poller.sources.base import Message
from poller.sources.local.queue import LocalQueue
from poller.state.sqlite import SqliteStore

HANDLER_MODULE = "bench_sleep_handler"
HANDLER_SOURCE = (
    "import os, time\n"
    "SLEEP = float(os.environ['SLEEP_S'])\n"
    "def handler(event, context):\n"
    "    if SLEEP:\n"
    "        time.sleep(SLEEP)\n"
)
MEMORY_MB = 128  # Lambda's and poller's default function memory
SAMPLE_S = 0.01
IDLE_MINIMUM = 1  # ScalingController's default idle_minimum
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- an instrumented local queue ------------------------------------------------------------------


class MeteredQueue(LocalQueue):
    """LocalQueue that counts deletions and times its SQLite thread, per statement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deleted = 0
        self.last_delete_at = 0.0
        self.thread_s: dict[str, float] = defaultdict(float)  # busy time on the store thread
        self.calls: dict[str, int] = defaultdict(int)
        self.wait_s: dict[str, list[float]] = defaultdict(list)  # await time seen by the loop
        self.received_messages = 0

    def snapshot(self) -> dict[str, tuple[int, float, float]]:
        """Per statement: calls, busy seconds on the store thread, median await seconds."""
        return {
            name: (count, self.thread_s[name], statistics.median(self.wait_s[name]))
            for name, count in self.calls.items()
        }

    def reset_stats(self) -> None:
        self.thread_s.clear()
        self.calls.clear()
        self.wait_s.clear()
        self.received_messages = 0

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        name = getattr(fn, "__name__", "call").strip("_").removesuffix("_sync")
        busy = self.thread_s

        def timed(conn: Any, *rest: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(conn, *rest)
            finally:
                busy[name] += time.perf_counter() - started

        self.calls[name] += 1
        started = time.perf_counter()
        try:
            return await super()._run(timed, *args)
        finally:
            self.wait_s[name].append(time.perf_counter() - started)

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        messages = await super().receive(max_messages, wait_s)
        self.received_messages += len(messages)
        return messages

    async def delete(self, messages: list[Message]) -> None:
        await super().delete(messages)
        self.deleted += len(messages)
        self.last_delete_at = time.monotonic()


def bodies(n: int) -> list[str]:
    return [f'{{"n": {i}}}' for i in range(n)]


def cpu_of(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def workers_cpu(runtime: Runtime) -> float:
    return sum(
        cpu_of(env.proc.pid)
        for pool in runtime.pools.values()
        for env in pool.envs
        if env.proc is not None
    )


class LoopLag:
    """How late a 5 ms sleep wakes up: the event loop's own queueing delay."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.samples.append(time.perf_counter() - started - 0.005)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- one step run ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    label: str
    messages: int
    batch_size: int
    sleep_s: float
    bound: int
    ideal_s: float
    send_s: float = 0.0
    target_at: float | None = None  # first time target == bound, from t0
    concurrency_at: float | None = None  # first time in-flight invokes == bound
    first_delete_at: float | None = None
    drain_s: float = 0.0  # t0 -> last message deleted
    idle_after_drain_s: float | None = None  # drain -> target back at the idle minimum
    # (t, target, in-flight invokes, messages deleted so far), every SAMPLE_S
    trace: list[tuple[float, int, int, int]] = field(default_factory=list)
    mean_in_flight: float = 0.0  # over [concurrency_at or target_at, drain]
    # batches/s while the middle of the backlog drains (from 10 % to 90 % deleted)
    mid_rate: float | None = None
    init_ms: list[float] = field(default_factory=list)  # cold starts during the run
    daemon_cpu_s: float = 0.0  # this process (event loop + SQLite thread) during the drain
    workers_cpu_s: float = 0.0
    loop_lag_ms: tuple[float, float] = (0.0, 0.0)  # median, p99
    store: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    lost: int = 0  # messages still in the queue after the drain (or the time limit)
    redelivered: int = 0  # receives beyond one per message


async def step_run(
    label: str,
    workdir: Path,
    *,
    messages: int,
    batch_size: int,
    concurrency: int,
    sleep_s: float,
    provisioned: bool,
) -> StepResult:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=workdir))
    (run_dir / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
    function = FunctionConfig(
        name="sleeper",
        handler=f"{HANDLER_MODULE}.handler",
        code_path=str(run_dir),
        memory_mb=MEMORY_MB,
        timeout_s=30.0,
        environment={"SLEEP_S": repr(sleep_s)},
        provisioned_concurrency=concurrency if provisioned else 0,
    )
    devnull = open(os.devnull, "wb")  # noqa: SIM115, ASYNC230 - closed at the end
    log = JsonLog(devnull)
    # The budget must hold `concurrency` environments of 128 MB: 50 x 128 = 6,400 MB.
    runtime = Runtime([function], memory_budget_mb=concurrency * MEMORY_MB, log=log)
    store = SqliteStore(f"sqlite:///{run_dir / 'state.db'}")
    await store.open()
    queue = MeteredQueue(store, "bench", visibility_timeout_s=60, max_receive_count=None)
    await runtime.start()  # provisioned environments are up after this
    pool = runtime.pool("sleeper")
    settings = QueueSettings(
        uuid=str(uuid.uuid4()),
        function_name="sleeper",
        batch_size=batch_size,
        batching_window_s=0.0,
        report_batch_item_failures=False,
        maximum_concurrency=concurrency,
        max_payload_bytes=6 * 1024 * 1024,
    )
    bound = concurrency_bound(concurrency, pool)
    controller = ScalingController(maximum=bound, batch_size=batch_size)
    runner = QueueRunner(
        settings,
        queue,
        pool,
        log=log,
        metrics=MappingMetrics(settings.uuid, "sleeper"),
        policy=ScaledConcurrency(controller),
    )
    result = StepResult(
        label,
        messages,
        batch_size,
        sleep_s,
        bound,
        ideal_s=math.ceil(messages / batch_size) * sleep_s / bound,
    )
    task = asyncio.get_running_loop().create_task(runner.run())
    lag = LoopLag()
    try:
        deadline = time.monotonic() + 30
        while not (runner.started and runner.target == IDLE_MINIMUM):
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "runner did not settle at the idle minimum"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * MANAGE_INTERVAL_S)

        cpu0, wcpu0 = os.times(), workers_cpu(runtime)
        queue.reset_stats()
        lag.start()
        payload = bodies(messages)
        t0 = time.monotonic()
        await queue.send(payload)
        result.send_s = time.monotonic() - t0
        seen_envs = set(pool.envs)
        trace = result.trace
        drained_at: float | None = None
        cpu1: Any = None
        wcpu1 = 0.0
        limit = t0 + 120 + messages / batch_size * sleep_s
        while True:
            now = time.monotonic()
            trace.append((now - t0, runner.target, runner.in_flight, queue.deleted))
            seen_envs.update(pool.envs)
            if drained_at is None and queue.deleted >= messages:
                drained_at = queue.last_delete_at
                cpu1, wcpu1 = os.times(), workers_cpu(runtime)
                store_stats = queue.snapshot()
            if drained_at is not None and (runner.target <= IDLE_MINIMUM or now - drained_at > 30):
                break
            if now > limit:
                break
            await asyncio.sleep(SAMPLE_S)
        await lag.stop()

        end = drained_at if drained_at is not None else time.monotonic()
        result.drain_s = end - t0
        if drained_at is None:
            cpu1, wcpu1 = os.times(), workers_cpu(runtime)
            store_stats = queue.snapshot()
        result.daemon_cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        result.workers_cpu_s = wcpu1 - wcpu0
        for t, target, in_flight, _ in trace:
            if result.target_at is None and target >= bound:
                result.target_at = t
            if result.concurrency_at is None and in_flight >= bound:
                result.concurrency_at = t
        if drained_at is not None and trace[-1][1] <= IDLE_MINIMUM:
            result.idle_after_drain_s = trace[-1][0] - result.drain_s
        start = result.concurrency_at or result.target_at or 0.0
        busy = [f for t, _, f, _ in trace if start <= t <= result.drain_s]
        result.mean_in_flight = statistics.fmean(busy) if busy else 0.0
        first = next((s for s in trace if s[3] >= 0.1 * messages), None)
        last = next((s for s in trace if s[3] >= 0.9 * messages), None)
        if first is not None and last is not None and last[0] > first[0]:
            result.mid_rate = (last[3] - first[3]) / batch_size / (last[0] - first[0])
        result.init_ms = sorted(
            e.init_ms for e in seen_envs if e.init_ms is not None and not e.provisioned
        )
        result.lost = (await queue.depth()).backlog
        result.redelivered = max(queue.received_messages - messages, 0)
        lags = sorted(lag.samples)
        if lags:
            result.loop_lag_ms = (
                statistics.median(lags) * 1e3,
                lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3,
            )
        result.store = store_stats
    finally:
        await lag.stop()
        await runner.stop(10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runtime.close()
        await store.close()
        devnull.close()
    return result


# -- the queue floor ------------------------------------------------------------------------------


async def queue_floor(workdir: Path, *, messages: int, batch_size: int, tasks: int) -> float:
    """Batches/s the local queue serves to `tasks` receive+delete loops, no invoke."""
    store = SqliteStore(f"sqlite:///{workdir / 'floor.db'}")
    await store.open()
    queue = LocalQueue(store, "floor", visibility_timeout_s=60, max_receive_count=None)
    await queue.send(bodies(messages))
    done = 0

    async def consume() -> None:
        nonlocal done
        while True:
            got = await queue.receive(batch_size, 0)
            if not got:
                return
            await queue.delete(got)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(consume() for _ in range(tasks)))
    elapsed = time.perf_counter() - started
    await store.close()
    return done / elapsed


# -- report ---------------------------------------------------------------------------------------


def plot(
    trace: list[tuple[float, int, int, int]], bound: int, *, width: int = 72, height: int = 10
) -> str:
    """Time across, concurrency up. '#': mean in-flight invokes over the column's samples;
    '-': the controller's target (its last value in the column); '+': both."""
    if not trace:
        return "(no samples)"
    end = trace[-1][0]
    step = end / width
    cols: list[tuple[float, int]] = []
    for c in range(width):
        lo, hi = c * step, (c + 1) * step
        inside = [(target, f) for t, target, f, _ in trace if lo <= t < hi]
        if inside:
            cols.append((statistics.fmean(f for _, f in inside), inside[-1][0]))
        else:
            cols.append(cols[-1] if cols else (0.0, trace[0][1]))
    unit = bound / height
    lines = []
    for row in range(height, 0, -1):
        level = row * unit
        label = f"{level:5.0f} |" if row % 2 == 0 else "      |"
        chars = []
        for mean_f, target in cols:
            bar = mean_f >= level - unit / 2
            tgt = level - unit / 2 <= target < level + unit / 2
            chars.append("+" if bar and tgt else "#" if bar else "-" if tgt else " ")
        lines.append((label + "".join(chars)).rstrip())
    lines.append("    0 +" + "-" * width)
    ticks = [" "] * width
    labels = [" "] * (width + 8)
    # Label every 1, 2, 5, 10 ... seconds, whichever leaves room for the widest label.
    spacing = next(
        n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n / step >= len(f"{int(end)}s") + 1
    )
    for second in range(0, int(end) + 1, spacing):
        c = int(second / step)
        if c >= width:
            break
        ticks[c] = "|"
        for i, ch in enumerate(f"{second}s"):
            if c + 7 + i < len(labels):
                labels[c + 7 + i] = ch
    lines.append("       " + "".join(ticks))
    lines.append("".join(labels).rstrip())
    return "\n".join(lines)


def fmt(value: float | None, unit: str = "s") -> str:
    return "never" if value is None else f"{value:.2f} {unit}"


def report(r: StepResult) -> None:
    print(
        f"\n== step, {r.label}: {r.messages} messages, batch {r.batch_size}, "
        f"{r.sleep_s * 1000:.0f} ms handler, bound {r.bound} =="
    )
    print(f"  send (t0 -> all enqueued)           {fmt(r.send_s)}")
    print(f"  {f'target reached {r.bound}':<36}{fmt(r.target_at)}")
    print(f"  {f'in-flight invokes reached {r.bound}':<36}{fmt(r.concurrency_at)}")
    print(
        f"  drain (t0 -> last delete)           {fmt(r.drain_s)}   ideal {r.ideal_s:.2f} s"
        f"   ratio {r.drain_s / r.ideal_s:.2f}x"
    )
    print(f"  mean in-flight once at the bound    {r.mean_in_flight:.1f} of {r.bound}")
    rate = "n/a" if r.mid_rate is None else f"{r.mid_rate:.0f}"
    print(f"  batches/s, 10 % -> 90 % deleted     {rate}   (ideal {r.bound / r.sleep_s:.0f})")
    print(f"  target back at idle minimum         {fmt(r.idle_after_drain_s)} after the drain")
    print(f"  messages left / received twice      {r.lost} / {r.redelivered}")
    if r.init_ms:
        print(
            f"  cold starts                         {len(r.init_ms)}, init median "
            f"{statistics.median(r.init_ms):.0f} ms, max {r.init_ms[-1]:.0f} ms"
        )
    print(
        f"  CPU during the drain                daemon process {r.daemon_cpu_s:.2f} s, "
        f"workers {r.workers_cpu_s:.2f} s, of {2 * r.drain_s:.2f} CPU-s (2 cores x wall)"
    )
    print(
        f"  event-loop lag (5 ms timer)         median {r.loop_lag_ms[0]:.2f} ms, "
        f"p99 {r.loop_lag_ms[1]:.2f} ms"
    )
    print("  SQLite thread until the drain:      calls   busy s   median await ms")
    for name, (count, busy, wait) in sorted(r.store.items()):
        print(f"    {name:<32}{count:7d} {busy:8.2f} {wait * 1e3:12.2f}")
    print()
    print(plot(r.trace, r.bound))


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="poller-bench-scaling-"))
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, uvloop")
    try:
        await measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    common = {
        "messages": args.messages,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
    }
    batches = math.ceil(args.messages / args.batch_size)
    ideal = batches * args.sleep / args.concurrency
    print(
        f"ideal drain = ceil({args.messages} / {args.batch_size}) x {args.sleep} s / "
        f"{args.concurrency} = {ideal:.2f} s, i.e. {batches / ideal:.0f} batches/s"
    )
    if not args.no_floors:
        rate = await queue_floor(
            workdir, messages=args.messages, batch_size=args.batch_size, tasks=args.concurrency
        )
        print(
            f"queue floor:    {rate:5.0f} batches/s (receive + delete, "
            f"{args.concurrency} tasks, no invoke)"
        )
        floor = await step_run("pipeline floor", workdir, sleep_s=0.0, provisioned=True, **common)
        print(
            f"pipeline floor: {batches / floor.drain_s:5.0f} batches/s "
            f"(0 ms handler, warm; drain {floor.drain_s:.2f} s incl. ramp; daemon "
            f"process CPU {floor.daemon_cpu_s:.2f} s)"
        )
    modes = ["cold", "warm"] if args.mode == "both" else [args.mode]
    results: dict[str, list[StepResult]] = defaultdict(list)
    for repeat in range(args.repeat):
        for mode in modes:
            label = (
                "cold (no environment at t0)"
                if mode == "cold"
                else (f"warm (provisioned_concurrency = {args.concurrency})")
            )
            r = await step_run(
                label, workdir, sleep_s=args.sleep, provisioned=mode == "warm", **common
            )
            results[mode].append(r)
            if repeat == args.repeat - 1:
                report(r)
    print(f"\n== summary: {args.repeat} run(s) each, interleaved; median [min-max] ==")
    print(
        f"{'mode':<6}{'target@bound s':>22}{'in-flight@bound s':>22}"
        f"{'drain s':>22}{'drain/ideal':>20}{'batches/s mid':>18}"
    )

    def cell(values: list[float | None], digits: int = 2) -> str:
        known = sorted(v for v in values if v is not None)
        if not known:
            return "never"
        mid, low, high = statistics.median(known), known[0], known[-1]
        text = f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"
        return text + ("*" if len(known) < len(values) else "")  # *: some runs never got there

    for mode, runs in results.items():
        print(
            f"{mode:<6}{cell([r.target_at for r in runs]):>22}"
            f"{cell([r.concurrency_at for r in runs]):>22}"
            f"{cell([r.drain_s for r in runs]):>22}"
            f"{cell([r.drain_s / r.ideal_s for r in runs]):>20}"
            f"{cell([r.mid_rate for r in runs], 0):>18}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=50, help="MaximumConcurrency")
    parser.add_argument("--sleep", type=float, default=0.05, help="handler sleep, seconds")
    parser.add_argument("--mode", choices=("cold", "warm", "both"), default="both")
    parser.add_argument("--no-floors", action="store_true", help="skip the two floors")
    parser.add_argument("--repeat", type=int, default=3, help="step runs per mode")
    uvloop.run(main(parser.parse_args()))
