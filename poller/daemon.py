"""The daemon: reconcile the registry with running mapping runners; signals; drain; HTTP.

Signal handlers only record what happened; one loop acts on it. The first SIGTERM/SIGINT
drains (stop receiving, let in-flight invokes finish within shutdown_grace_s, settle them);
a second one exits at once. Either way nothing is lost: an unsettled message reappears after
its visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from poller import metrics
from poller.config import Config
from poller.engine.filter_compiler import compile_filter_criteria
from poller.engine.health import is_problem, problem_text
from poller.engine.lease_ownership import keep_membership
from poller.engine.ownership import DAEMON_ID
from poller.engine.runners import Runner, RunnerError, Services, build_runner
from poller.logs import JsonLog
from poller.mappings import Mapping, MappingError
from poller.redaction import redact
from poller.registry import Registry
from poller.runtime.pool import Runtime
from poller.sdnotify import Notifier
from poller.state.base import StateError, StateStore, open_store
from poller.status import status_document

# Fields that describe what a runner does; a change to any other field (status, timestamps)
# does not restart the runner.
_VOLATILE = ("last_processing_result", "last_modified", "state_transition_reason")

# After the grace, what is left to close (runners, leases, sources, the HTTP server, the state
# store) takes well under a second. A shutdown still running this long after its grace is stuck
# on something: it says what every task waits on, and the daemon exits, well before systemd's
# TimeoutStopSec or Kubernetes' grace period would kill it without a word.
STUCK_AFTER_GRACE_S = 10.0


class DaemonError(Exception):
    """Start-up failed in a way the operator must fix (the message says how)."""


def waiting_tasks() -> list[str]:
    """Each pending task of the running loop but the caller's, as the chain of awaits it is
    suspended in, outermost first (``file:line function`` each)."""
    current = asyncio.current_task()
    described = []
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        chain = []
        awaitable: Any = task.get_coro()
        while awaitable is not None:
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
            if frame is not None:
                chain.append(
                    f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} "
                    f"{frame.f_code.co_name}"
                )
            else:  # a future, a task, or something else that is not a coroutine
                chain.append(type(awaitable).__name__)
                break
            awaitable = getattr(awaitable, "cr_await", None) or getattr(
                awaitable, "gi_yieldfrom", None
            )
        described.append(f"{task.get_name()}: " + " > ".join(chain))
    return sorted(described)


def _spec(mapping: Mapping) -> dict[str, Any]:
    data = mapping.to_dict()
    for key in _VOLATILE:
        data.pop(key, None)
    return data


@dataclass
class RunningMapping:
    mapping: Mapping
    spec: dict[str, Any]
    runner: Runner
    task: asyncio.Task[None]


class Supervisor:
    """Keeps one runner per enabled mapping, following registry changes."""

    def __init__(self, config: Config, store: StateStore, runtime: Runtime, log: JsonLog) -> None:
        self.config = config
        self.store = store
        self.registry = Registry(store, validate_filters=compile_filter_criteria)
        self.runtime = runtime
        self.log = log
        self.services = Services(config, store, runtime, log)
        # Every mapping of the registry as of the last reconcile, enabled or not.
        self.mappings: dict[str, Mapping] = {}
        self.running: dict[str, RunningMapping] = {}
        # Mappings that could not start: their status line, and the function of the
        # poller_mapping_problem series it set.
        self.problems: dict[str, str] = {}
        self._problem_functions: dict[str, str] = {}
        self.reconciled = asyncio.Event()
        self._revision: int | None = None
        self._status_wanted: dict[str, str] = {}
        self._status_writers: dict[str, asyncio.Task[None]] = {}

    async def watch(self, stopping: asyncio.Event) -> None:
        interval = self.config.daemon.reconcile_interval_s
        while not stopping.is_set():
            try:
                revision = await self.store.revision()
                if revision != self._revision:
                    await self.reconcile()
                    self._revision = revision
            except StateError as exc:
                self.log.error(f"state store unavailable: {exc}")
            self._reap_finished()
            self.reconciled.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    def _reap_finished(self) -> None:
        for uuid, running in list(self.running.items()):
            task = running.task
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                self.log.error(f"mapping runner failed: {exc!r}; restarting it", mapping=uuid)
                del self.running[uuid]
                self._revision = None  # forces a reconcile that starts it again

    async def reconcile(self) -> None:
        mappings = {m.uuid: m for m in await self.registry.list()}
        self.mappings = mappings
        wanted = {uuid: m for uuid, m in mappings.items() if m.enabled}
        stops = []
        for uuid, running in list(self.running.items()):
            mapping = wanted.get(uuid)
            if mapping is None or _spec(mapping) != running.spec:
                reason = (
                    "deleted"
                    if uuid not in mappings
                    else ("disabled" if mapping is None else "updated")
                )
                self.log.info(f"mapping {reason}: stopping its runner", mapping=uuid)
                del self.running[uuid]
                stops.append(
                    self._stop(
                        running, self.config.daemon.shutdown_grace_s, for_good=reason != "updated"
                    )
                )
        if stops:
            await asyncio.gather(*stops)
        for uuid in list(self.problems):
            if uuid not in wanted:
                self._forget_problem(uuid)
        for uuid, mapping in wanted.items():
            if uuid not in self.running:
                self._start(mapping)

    def _start(self, mapping: Mapping) -> None:
        uuid = mapping.uuid
        try:
            runner = build_runner(
                mapping, self.services, lambda status: self._record_status(uuid, status)
            )
        except (RunnerError, MappingError) as exc:
            self._problem(mapping, f"PROBLEM: {exc}")
            return
        task = asyncio.get_running_loop().create_task(runner.run())
        self.running[uuid] = RunningMapping(mapping, _spec(mapping), runner, task)
        self._forget_problem(uuid, started=mapping.function_name)
        self.log.info(
            "mapping runner starting",
            mapping=uuid,
            function=mapping.function_name,
            source=mapping.source.display_uri,
            batch_size=mapping.batch_size,
        )

    def _problem(self, mapping: Mapping, status: str) -> None:
        uuid, function = mapping.uuid, mapping.function_name
        if self.problems.get(uuid) != status:
            self.log.error(status, mapping=uuid, function=function)
            self.problems[uuid] = status
            self._record_status(uuid, status)
        previous = self._problem_functions.get(uuid)
        if previous is not None and previous != function:
            with contextlib.suppress(KeyError):
                metrics.mapping_problem.remove(uuid, previous)
        self._problem_functions[uuid] = function
        metrics.mapping_problem.labels(uuid, function).set(1)

    def _forget_problem(self, uuid: str, started: str | None = None) -> None:
        """The mapping no longer has a start problem: it started (running ``started``'s
        function) or it is no longer wanted."""
        self.problems.pop(uuid, None)
        function = self._problem_functions.pop(uuid, None)
        if function is None:
            return
        if function == started:
            # The runner's own metrics hold this series now: clear it, do not drop it.
            metrics.mapping_problem.labels(uuid, function).set(0)
            return
        with contextlib.suppress(KeyError):
            metrics.mapping_problem.remove(uuid, function)

    def current_problems(self) -> dict[str, str]:
        """Every mapping whose status is a PROBLEM, with what explains it: those that could
        not start, and running ones whose source, function or destination fails."""
        found = dict(self.problems)
        for uuid, running in self.running.items():
            status = running.runner.status()
            result = status.get("lastProcessingResult")
            if is_problem(result):
                found[uuid] = problem_text(result, status.get("lastError"))
        return found

    def _record_status(self, uuid: str, status: str) -> None:
        """Store the mapping's status line, and the error that explains it, for `poller
        mappings get`. One write in flight per mapping, always of the latest status: writes
        cannot land out of order, and a burst of changes costs one more write, not one each."""
        self._status_wanted[uuid] = status
        if uuid not in self._status_writers:
            task = asyncio.get_running_loop().create_task(self._write_status(uuid))
            self._status_writers[uuid] = task

    async def _write_status(self, uuid: str) -> None:
        try:
            while uuid in self._status_wanted:
                status = self._status_wanted.pop(uuid)
                running = self.running.get(uuid)
                why = running.runner.status().get("lastError") if running is not None else None
                with contextlib.suppress(StateError):
                    await self.store.set_status(
                        uuid, {"LastProcessingResult": status, "LastError": why}
                    )
        finally:
            self._status_writers.pop(uuid, None)

    async def _stop(self, running: RunningMapping, grace_s: float, for_good: bool = False) -> None:
        await running.runner.stop(grace_s)
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task
        if for_good:
            running.runner.metrics.remove()

    async def stop_all(self, grace_s: float) -> None:
        running = list(self.running.values())
        self.running.clear()
        await asyncio.gather(*(self._stop(r, grace_s) for r in running))
        # The last status lines reach the store before it closes.
        writers = list(self._status_writers.values())
        if writers:
            await asyncio.wait(writers, timeout=5)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        waiting = [uuid for uuid, r in self.running.items() if not r.runner.started]
        ok = self.reconciled.is_set() and not waiting
        return ok, {
            "reconciled": self.reconciled.is_set(),
            "runners": len(self.running),
            "starting": waiting,
            "problems": self.current_problems(),
        }


class Daemon:
    def __init__(self, config: Config, log: JsonLog | None = None) -> None:
        self.config = config
        self.log = log or JsonLog(level=config.daemon.log_level)
        self.stopping = asyncio.Event()
        self._signals = 0
        self.store: StateStore | None = None
        self.runtime: Runtime | None = None
        self.supervisor: Supervisor | None = None
        self._http: web.AppRunner | None = None
        self.started = time.time()

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._start()
        except DaemonError as exc:
            self.log.error(str(exc))
            await self._close()
            return 1
        self.log.info(
            "poller daemon running",
            config=config.path,
            http=config.daemon.http_listen,
            state=redact(config.state_url),
            functions=[f.name for f in config.functions],
            daemon=DAEMON_ID,
        )
        assert self.supervisor is not None and self.store is not None
        membership = None
        if self.store.leases is not None:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "startedAt": time.time(),
                "http": config.daemon.http_listen,
            }
            membership = loop.create_task(
                keep_membership(
                    self.store.leases, DAEMON_ID, config.fleet.lease_duration_s, info, self.log
                )
            )
        watcher = loop.create_task(self.supervisor.watch(self.stopping))
        systemd = Notifier(self.log)
        announce = loop.create_task(systemd.ready_when(self.supervisor.ready))
        await self.stopping.wait()
        announce.cancel()
        systemd.stopping(config.daemon.shutdown_grace_s)
        self.log.info(
            "draining: no new receives; waiting for in-flight invokes",
            grace_s=config.daemon.shutdown_grace_s,
        )
        started = time.monotonic()
        stuck = loop.call_later(
            config.daemon.shutdown_grace_s + STUCK_AFTER_GRACE_S, self._stuck, started
        )
        try:
            await watcher
            await self.supervisor.stop_all(config.daemon.shutdown_grace_s)
            if membership is not None:
                membership.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await membership
            await self._close()
        finally:
            stuck.cancel()
        self.log.info("poller daemon stopped", drain_s=round(time.monotonic() - started, 3))
        self.log.flush()
        return 0

    def _stuck(self, started: float) -> None:
        self.log.error(
            f"shutdown still not done {STUCK_AFTER_GRACE_S:g} s after its grace: exiting now; "
            "unsettled messages will be redelivered after their visibility timeout. Please "
            "report this with the tasks below (where each one waits)",
            after_s=round(time.monotonic() - started, 1),
            waiting=waiting_tasks(),
        )
        self._exit_now()

    def _exit_now(self) -> None:
        """Stop every worker and exit at once, status 1."""
        self.log.flush()
        if self.runtime is not None:
            for pool in self.runtime.pools.values():
                pool.close()
        os._exit(1)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            self.log.info(
                f"received {sig.name}: shutting down gracefully (send it again to exit at once)"
            )
            self.stopping.set()
            return
        self.log.warning(
            f"received {sig.name} again: exiting now; unsettled messages will be "
            "redelivered after their visibility timeout"
        )
        self._exit_now()

    async def _start(self) -> None:
        config = self.config
        try:
            self.store = open_store(config.state_url, key_prefix=config.state.key_prefix)
            await self.store.open()
        except StateError as exc:
            raise DaemonError(f"cannot open the state store: {exc}") from None
        registry = Registry(self.store)
        try:
            declared = await registry.upsert_declared(config.mappings, config.path)
        except MappingError as exc:
            raise DaemonError(f"invalid mapping in the config file: {exc}") from None
        for mapping in declared:
            self.log.info(
                "declared mapping registered",
                mapping=mapping.uuid,
                name=mapping.name,
                function=mapping.function_name,
                source=mapping.source.display_uri,
            )
        self.runtime = Runtime(
            config.functions,
            memory_budget_mb=config.daemon.memory_mb,
            max_request_bytes=config.daemon.max_request_bytes,
            max_response_bytes=config.daemon.max_response_bytes,
            region=config.aws.region,
            account=config.aws.account,
            log=self.log,
        )
        await self.runtime.start()
        self.supervisor = Supervisor(config, self.store, self.runtime, self.log)
        await self._start_http()

    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = self.config.daemon.http_host_port
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise DaemonError(
                f"cannot listen on {self.config.daemon.http_listen} ([daemon] http_listen): "
                f"{exc.strerror}; pick a free port"
            ) from None
        self._http = runner

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.runtime is not None:
            for name, pool in self.runtime.pools.items():
                metrics.environments.labels(name).set(len(pool.envs))
            metrics.memory_used.set(self.runtime.memory_used_mb)
        await self._readiness()
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        """What /readyz answers; keeps poller_daemon_ready in step with it."""
        store_ok = False
        if self.store is not None:
            with contextlib.suppress(Exception):
                store_ok = await asyncio.wait_for(self.store.ping(), 2)
        runners_ok, detail = self.supervisor.ready() if self.supervisor else (False, {})
        ok = store_ok and runners_ok and not self.stopping.is_set()
        metrics.daemon_ready.set(1 if ok else 0)
        return ok, {"status": "ready" if ok else "not ready", "store": store_ok, **detail}

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = await self._readiness()
        return web.json_response(body, status=200 if ok else 503)

    async def _status(self, request: web.Request) -> web.Response:
        ok, _ = await self._readiness()
        document = status_document(
            supervisor=self.supervisor,
            runtime=self.runtime,
            http_listen=self.config.daemon.http_listen,
            state_url=self.config.state_url,
            started=self.started,
            ready=ok,
            draining=self.stopping.is_set(),
        )
        return web.json_response(document)

    async def _close(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
        if self.runtime is not None:
            await self.runtime.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
