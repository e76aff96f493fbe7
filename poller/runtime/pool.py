"""Execution environments for functions: spawn, reuse, reap, bound, time out, kill.

An environment (environment.py) is one worker process (poller.runtime.worker) started with a
fresh interpreter, never forked from the daemon. The pool hands out *leases*: a lease is one
claimed unit of a function's concurrency, bound to an environment (warm, or one it may start).
The engine takes a lease before it receives a batch, so a batch is never read from a source
without somewhere to run it; ``Runtime.invoke`` without a lease throttles at once when no slot
is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Final

from poller.config import MAX_PAYLOAD_BYTES, FunctionConfig
from poller.logs import JsonLog
from poller.runtime.environment import Environment, EnvState
from poller.runtime.platform import PlatformLines, function_metrics, report
from poller.runtime.results import (
    InvokeResult,
    Outcome,
    error_payload,
    new_request_id,
    throttled_result,
)

MONITOR_INTERVAL_S: Final = 0.1
MAINTENANCE_INTERVAL_S: Final = 0.5


class Lease:
    """One claimed unit of a function's concurrency; good for one invoke, then released."""

    __slots__ = ("_released", "env", "pool")

    def __init__(self, pool: FunctionPool, env: Environment) -> None:
        self.pool = pool
        self.env = env
        self._released = False

    def release(self) -> None:
        """Give the slot back unused (e.g. the source had nothing to deliver)."""
        if self._released:
            return
        self._released = True
        self.pool._return(self.env)

    async def invoke(
        self,
        event: bytes,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        capture_logs: bool = False,
    ) -> InvokeResult:
        if self._released:
            raise RuntimeError("lease already used")
        request_id = request_id or new_request_id()
        try:
            if not self.pool._revive(self):
                return throttled_result(self.pool.name, request_id, "DaemonMemoryBudgetExceeded")
            return await self.pool._run(self.env, event, request_id, client_context, capture_logs)
        finally:
            self.release()


class FunctionPool:
    """The environments of one function and its concurrency accounting."""

    def __init__(self, runtime: Runtime, config: FunctionConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.platform_lines = PlatformLines(config)
        self.cold_starts, self.init_duration = function_metrics(config.name)
        self.idle: list[Environment] = []  # most recently used last: reuse the warmest
        self.envs: set[Environment] = set()
        self.leased = 0

    @property
    def name(self) -> str:
        return self.config.name

    def free_slots(self) -> int:
        """How many more leases could be granted now (an upper bound; memory may evict)."""
        limit = self.config.reserved_concurrency
        by_reserved = (limit - self.leased) if limit is not None else sys.maxsize
        by_memory = len(self.idle) + self.runtime.memory_headroom_mb() // self.config.memory_mb
        return max(min(by_reserved, by_memory), 0)

    def try_acquire(self) -> Lease | None:
        limit = self.config.reserved_concurrency
        if limit is not None and self.leased >= limit:
            return None
        while self.idle:
            env = self.idle.pop()
            if env.state is EnvState.IDLE:
                self.leased += 1
                return Lease(self, env)
        if not self.runtime._reserve_memory(self.config.memory_mb, exclude=self):
            return None
        env = Environment(self)
        self.envs.add(env)
        self.leased += 1
        return Lease(self, env)

    def _revive(self, lease: Lease) -> bool:
        """Give a lease whose environment died while it waited (killed, out of memory) a fresh
        one, as Lambda replaces an environment that is gone; False if there is no memory for
        it. The dead one already gave its memory back."""
        if lease.env.state is not EnvState.DEAD:
            return True
        if not self.runtime._reserve_memory(self.config.memory_mb, exclude=self):
            return False
        lease.env = Environment(self)
        self.envs.add(lease.env)
        return True

    # A timeout parameter, not asyncio.timeout() around the call: running out of time here is an
    # answer ("no slot yet", None), not an error, and the engine polls with it between checks of
    # its own stop flag; a cancelled wait would also have to tell itself apart from shutdown.
    async def acquire(self, timeout: float | None = None) -> Lease | None:  # noqa: ASYNC109
        """Wait for a slot; None if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lease = self.try_acquire()
            if lease is not None:
                return lease
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            waiter = self.runtime._loop.create_future()
            self.runtime._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return None

    async def invoke(
        self,
        event: bytes,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        capture_logs: bool = False,
    ) -> InvokeResult:
        """One invoke now, or a throttled result at once if the function has no free slot."""
        request_id = request_id or new_request_id()
        lease = self.try_acquire()
        if lease is None:
            limit = self.config.reserved_concurrency
            reason = (
                "ReservedFunctionConcurrentInvocationLimitExceeded"
                if limit is not None and self.leased >= limit
                else "DaemonMemoryBudgetExceeded"
            )
            self.runtime.log.warning(
                "invoke throttled", function=self.name, requestId=request_id, reason=reason
            )
            return throttled_result(self.name, request_id, reason)
        lease._released = True  # used here and now: what Lease.invoke does, minus a coroutine
        try:
            return await self._run(lease.env, event, request_id, client_context, capture_logs)
        finally:
            self._return(lease.env)

    def _run(
        self,
        env: Environment,
        event: bytes,
        request_id: str,
        client_context: dict[str, Any] | None,
        capture_logs: bool,
    ) -> Coroutine[Any, Any, InvokeResult]:
        """The coroutine of one invoke: a warm environment's own (one coroutine level less on
        every warm invoke), else the whole path (size check, cold start)."""
        if env.state is EnvState.IDLE and len(event) <= self.runtime.max_request_bytes:
            return env.invoke(request_id, event, client_context, [] if capture_logs else None)
        return self._invoke_on(env, event, request_id, client_context, capture_logs)

    async def _invoke_on(
        self,
        env: Environment,
        event: bytes,
        request_id: str,
        client_context: dict[str, Any] | None,
        capture_logs: bool,
    ) -> InvokeResult:
        runtime = self.runtime
        if len(event) > runtime.max_request_bytes:
            return InvokeResult(
                Outcome.INVALID_REQUEST,
                error_payload(
                    "RequestEntityTooLargeException",
                    f"Request must be smaller than {runtime.max_request_bytes} bytes for the "
                    f"Invoke operation (it was {len(event)} bytes)",
                    request_id,
                ),
                request_id,
            )
        capture: list[str] | None = [] if capture_logs else None
        runtime._ensure_loops()
        if env.state is EnvState.NEW:
            # Module-level output during init belongs to the invoke that caused the cold start.
            env._request_id, env._capture = request_id, capture
            failure = await env.start()
            env._request_id, env._capture = None, None
            if failure is not None:
                failure.request_id = request_id
                runtime.log.error(
                    "function init failed",
                    function=self.name,
                    requestId=request_id,
                    error=failure.error,
                )
                # The invoke still gets its START/END/REPORT, as in Lambda (Status: error).
                runtime.log.write(self.platform_lines.start(request_id))
                if capture is not None:
                    capture.append(f"START RequestId: {request_id} Version: $LATEST")
                report(self, failure, capture)
                failure.log_lines = capture
                return failure
            env.cold = True
        return await env.invoke(request_id, event, client_context, capture)

    def _return(self, env: Environment) -> None:
        self.leased -= 1
        if env.state is EnvState.IDLE:
            env.last_used = time.monotonic()
            self.idle.append(env)
        elif env.state is EnvState.NEW:
            # Claimed but never started: give its memory back.
            self._forget(env)
        elif env.state is not EnvState.DEAD:
            # The invoke was abandoned mid-flight (its task cancelled, e.g. a drain that ran
            # out of grace): the handler is still running and its result would reach nobody,
            # so the environment can never be reused.
            env.kill("abandoned")
        self.runtime._wake()

    def _forget(self, env: Environment) -> None:
        if env in self.envs:
            self.envs.discard(env)
            self.runtime.memory_used_mb -= self.config.memory_mb
            if env in self.idle:
                self.idle.remove(env)
            self.runtime._wake()

    def provisioned_alive(self) -> int:
        return sum(1 for env in self.envs if env.provisioned and env.state is not EnvState.DEAD)

    async def provision(self) -> None:
        """Start environments until ``provisioned_concurrency`` are alive."""
        missing = self.config.provisioned_concurrency - self.provisioned_alive()
        starts = []
        for _ in range(missing):
            if not self.runtime._reserve_memory(self.config.memory_mb, exclude=self):
                self.runtime.log.error(
                    "cannot keep provisioned environments: daemon memory budget exhausted",
                    function=self.name,
                    memory_budget_mb=self.runtime.memory_budget_mb,
                )
                break
            env = Environment(self, provisioned=True)
            self.envs.add(env)
            starts.append(self._start_provisioned(env))
        if starts:
            await asyncio.gather(*starts)

    async def _start_provisioned(self, env: Environment) -> None:
        failure = await env.start()
        if failure is not None:
            env.kill("init failed")
            self.runtime.log.error(
                "provisioned environment failed to initialise",
                function=self.name,
                error=failure.error,
            )
            return
        self.idle.insert(0, env)
        self.runtime._wake()

    def reap_idle(self, now: float) -> None:
        cutoff = now - self.config.idle_timeout_s
        for env in list(self.idle):
            if not env.provisioned and env.last_used < cutoff:
                self.idle.remove(env)
                env.kill("idle")

    def close(self) -> None:
        for env in list(self.envs):
            env.kill("shutdown")


class Runtime:
    """Every function's pool, plus the daemon-wide memory budget they share."""

    def __init__(
        self,
        functions: Iterable[FunctionConfig],
        *,
        memory_budget_mb: int,
        max_request_bytes: int = MAX_PAYLOAD_BYTES,
        max_response_bytes: int = MAX_PAYLOAD_BYTES,
        region: str = "us-east-1",
        account: str = "000000000000",
        log: JsonLog,
    ) -> None:
        self.memory_budget_mb = memory_budget_mb
        self.memory_used_mb = 0
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.region = region
        self.account = account
        self.log = log
        self._loop = asyncio.get_running_loop()
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.pools = {fn.name: FunctionPool(self, fn) for fn in functions}

    def function_arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"

    def pool(self, name: str) -> FunctionPool:
        try:
            return self.pools[name]
        except KeyError:
            known = ", ".join(sorted(self.pools)) or "none"
            raise KeyError(
                f"function {name!r} is not defined (defined: {known}); add it under [[functions]]"
            ) from None

    async def invoke(self, function: str, event: bytes, **kwargs: Any) -> InvokeResult:
        return await self.pool(function).invoke(event, **kwargs)

    def memory_headroom_mb(self) -> int:
        return max(self.memory_budget_mb - self.memory_used_mb, 0)

    def _reserve_memory(self, needed_mb: int, exclude: FunctionPool) -> bool:
        if self.memory_used_mb + needed_mb > self.memory_budget_mb:
            self._evict_idle(needed_mb - self.memory_headroom_mb(), exclude)
        if self.memory_used_mb + needed_mb > self.memory_budget_mb:
            return False
        self.memory_used_mb += needed_mb
        return True

    def _evict_idle(self, needed_mb: int, exclude: FunctionPool) -> None:
        """Free memory held by idle environments of other functions, least recently used first."""
        candidates = sorted(
            (
                env
                for pool in self.pools.values()
                if pool is not exclude
                for env in pool.idle
                if not env.provisioned
            ),
            key=lambda env: env.last_used,
        )
        freed = 0
        for env in candidates:
            if freed >= needed_mb:
                break
            env.pool.idle.remove(env)
            env.kill("evicted")
            freed += env.config.memory_mb

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def start(self) -> None:
        """Start provisioned environments and the monitor and reaper loops."""
        await asyncio.gather(*(pool.provision() for pool in self.pools.values()))
        self._ensure_loops()

    def _ensure_loops(self) -> None:
        """The memory monitor and the reaper run from start(), or from the first invoke when
        start() was never called (``poller invoke``): a memory limit holds either way."""
        if self._tasks or self._closed:
            return
        self._tasks.append(self._loop.create_task(self._monitor_memory()))
        self._tasks.append(self._loop.create_task(self._maintain()))

    async def _monitor_memory(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for pool in self.pools.values():
                limit = pool.config.memory_mb
                for env in list(pool.envs):
                    if env.state is EnvState.BUSY or env.state is EnvState.STARTING:
                        rss = env.rss_mb()
                        if rss > limit:
                            env._peak_mb = rss
                            env.kill("memory")

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                try:
                    pool.reap_idle(now)
                    if pool.provisioned_alive() < pool.config.provisioned_concurrency:
                        await pool.provision()
                except Exception as exc:  # one function's trouble must not stop the reaper
                    self.log.error(
                        "environment maintenance failed", function=pool.name, error=repr(exc)
                    )

    def environments(self) -> int:
        return sum(len(pool.envs) for pool in self.pools.values())

    async def close(self) -> None:
        """Kill every environment and wait until each is reaped and its TMPDIR removed."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        envs = [env for pool in self.pools.values() for env in pool.envs]
        for pool in self.pools.values():
            pool.close()
        for env in envs:
            await env._gone()
        self.log.flush()
