"""The runtime's pools with real workers: leases, throttling, the memory budget, idle reaping,
provisioned environments, and the request/response size caps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable

from test_runtime import alive, env_pids, event, fn, make_runtime, wait_dead

from poller.runtime.environment import EnvState
from poller.runtime.results import NOT_RUN, Outcome


async def wait_for(
    predicate: Callable[[], bool], within_s: float = 5.0, step_s: float = 0.05
) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step_s)
    return bool(predicate())


# -- throttling and leases ------------------------------------------------------------------------


async def test_reserved_concurrency_throttles_at_once_while_a_slot_is_busy() -> None:
    async with make_runtime(fn("sleep", reserved_concurrency=1)) as (runtime, logs):
        slow = asyncio.create_task(runtime.invoke("f", event({"seconds": 1.0})))
        pool = runtime.pool("f")
        assert await wait_for(lambda: pool.leased == 1)
        started = time.monotonic()
        throttled = await runtime.invoke("f", event({"seconds": 0}))
        assert time.monotonic() - started < 0.5  # at once: not after the 1 s invoke in flight
        assert throttled.outcome is Outcome.THROTTLED and throttled.outcome in NOT_RUN
        error = json.loads(throttled.payload)
        assert error["errorType"] == "TooManyRequestsException"
        assert error["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert pool.try_acquire() is None
        assert pool.free_slots() == 0
        assert runtime.environments() == 1
        first = await slow
        assert first.outcome is Outcome.OK
        # The slot is back: the next invoke runs, on the same warm environment.
        after = await runtime.invoke("f", event({"seconds": 0}))
        assert after.outcome is Outcome.OK
        assert json.loads(after.payload)["pid"] == json.loads(first.payload)["pid"]
    # A throttled invoke never ran: no START for it.
    assert not [
        r for r in logs.for_request(throttled.request_id) if r.get("type") == "platform.start"
    ]


async def test_memory_budget_throttles_when_nothing_can_be_evicted() -> None:
    functions = (fn("sleep", name="a", memory_mb=128), fn("noop", name="b", memory_mb=128))
    async with make_runtime(*functions, memory_budget_mb=128) as (runtime, _):
        slow = asyncio.create_task(runtime.invoke("a", event({"seconds": 0.6})))
        assert await wait_for(lambda: runtime.pool("a").leased == 1)
        throttled = await runtime.invoke("b", b"{}")
        assert throttled.outcome is Outcome.THROTTLED
        assert json.loads(throttled.payload)["Reason"] == "DaemonMemoryBudgetExceeded"
        # A second environment of the busy function does not fit either.
        assert (await runtime.invoke("a", event({"seconds": 0}))).outcome is Outcome.THROTTLED
        assert (await slow).outcome is Outcome.OK
        assert runtime.memory_used_mb == 128


async def test_memory_budget_evicts_another_functions_idle_environment() -> None:
    functions = (fn("pid", name="a", memory_mb=128), fn("pid", name="b", memory_mb=128))
    async with make_runtime(*functions, memory_budget_mb=128) as (runtime, _):
        a = await runtime.invoke("a", b"{}")
        a_pid = json.loads(a.payload)
        b = await runtime.invoke("b", b"{}")  # a is idle: evicted to make room
        assert b.outcome is Outcome.OK
        assert wait_dead(a_pid)
        assert runtime.environments() == 1 and runtime.memory_used_mb == 128
        a2 = await runtime.invoke("a", b"{}")
        assert a2.outcome is Outcome.OK and a2.init_ms is not None  # a cold start again


async def test_leases_acquire_wait_release() -> None:
    async with make_runtime(fn("noop", reserved_concurrency=1)) as (runtime, _):
        pool = runtime.pool("f")
        lease = pool.try_acquire()
        assert lease is not None
        assert pool.try_acquire() is None
        started = time.monotonic()
        assert await pool.acquire(timeout=0.2) is None
        assert 0.15 <= time.monotonic() - started < 1.0
        # A waiter gets the slot as soon as it is given back, unused.
        waiter = asyncio.create_task(pool.acquire(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        lease.release()
        lease.release()  # idempotent
        second = await asyncio.wait_for(waiter, 1)
        assert second is not None
        result = await second.invoke(b"{}")
        assert result.outcome is Outcome.OK
        assert pool.leased == 0
        try:
            await second.invoke(b"{}")
        except RuntimeError as exc:
            assert "lease already used" in str(exc)
        else:
            raise AssertionError("a lease is good for one invoke")
        # Never-started environments give their memory back with the lease.
        third = pool.try_acquire()
        assert third is not None
        third.release()
        assert runtime.memory_used_mb == 128  # just the one warm environment


async def test_a_lease_whose_idle_environment_died_invokes_on_a_fresh_one() -> None:
    """The queue engine leases a warm environment before it receives; a worker killed in
    between (OOM killer, an operator) must not fail the batch, nor crash the engine."""
    async with make_runtime(fn("count")) as (runtime, _):
        warm = await runtime.invoke("f", event({}))
        assert warm.outcome is Outcome.OK
        pool = runtime.pool("f")
        lease = pool.try_acquire()
        assert lease is not None and lease.env.state is EnvState.IDLE
        dead = lease.env
        os.kill(json.loads(warm.payload)["pid"], signal.SIGKILL)
        assert await wait_for(lambda: dead.state is EnvState.DEAD)
        result = await lease.invoke(event({}))
        assert result.outcome is Outcome.OK, result.payload
        assert result.init_ms is not None  # a cold start on its replacement
        assert json.loads(result.payload)["pid"] != json.loads(warm.payload)["pid"]
        assert pool.leased == 0 and runtime.environments() == 1
        again = await runtime.invoke("f", event({}))
        assert again.init_ms is None  # the replacement stayed warm for the next invoke


async def test_concurrent_invokes_use_separate_environments() -> None:
    async with make_runtime(fn("sleep", reserved_concurrency=3)) as (runtime, _):
        results = await asyncio.gather(
            *(runtime.invoke("f", event({"seconds": 0.3})) for _ in range(3))
        )
        assert {r.outcome for r in results} == {Outcome.OK}
        assert len({json.loads(r.payload)["pid"] for r in results}) == 3
        assert runtime.environments() == 3


# -- idle reaping and provisioned environments ----------------------------------------------------


async def test_idle_environments_are_reaped_after_idle_timeout() -> None:
    async with make_runtime(fn("pid", idle_timeout_s=0.3), start=True) as (runtime, _):
        first = await runtime.invoke("f", b"{}")
        pid = json.loads(first.payload)
        # Maintenance runs every 0.5 s: the environment goes within idle_timeout + 0.5 s.
        assert await wait_for(lambda: runtime.environments() == 0, within_s=3)
        assert wait_dead(pid)
        assert runtime.memory_used_mb == 0
        second = await runtime.invoke("f", b"{}")
        assert second.init_ms is not None and json.loads(second.payload) != pid


async def test_busy_environments_are_not_reaped() -> None:
    async with make_runtime(fn("sleep", idle_timeout_s=0.2), start=True) as (runtime, _):
        result = await runtime.invoke("f", event({"seconds": 1.2}))
        assert result.outcome is Outcome.OK


async def test_provisioned_environments_start_with_the_runtime_and_report_no_init() -> None:
    config = fn("count", provisioned_concurrency=2, idle_timeout_s=0.2)
    async with make_runtime(config, start=True) as (runtime, logs):
        pool = runtime.pool("f")
        # Warm before any invoke.
        assert runtime.environments() == 2
        assert all(env.state is EnvState.IDLE for env in pool.envs)
        pids = set(env_pids(runtime))
        result = await runtime.invoke("f", b"{}", capture_logs=True)
        assert result.outcome is Outcome.OK
        assert json.loads(result.payload)["pid"] in pids
        # Init happened ahead of the invoke: no Init Duration, as Lambda reports it.
        assert result.init_ms is None
        report = logs.for_request(result.request_id)[-1]
        assert report["type"] == "platform.report" and "initDurationMs" not in report["metrics"]
        assert result.log_lines is not None and "Init Duration" not in result.log_lines[-1]
        # idle_timeout_s does not apply to provisioned environments.
        await asyncio.sleep(1.0)
        assert set(env_pids(runtime)) == pids


async def test_provisioned_environments_are_replaced_when_they_die() -> None:
    config = fn("spawn_then", provisioned_concurrency=1, timeout_s=0.3)
    async with make_runtime(config, start=True) as (runtime, _):
        (first,) = env_pids(runtime)
        os.kill(first, signal.SIGKILL)  # dies while idle
        assert await wait_for(
            lambda: (
                (pids := env_pids(runtime)) != []
                and pids != [first]
                and all(e.state is EnvState.IDLE for e in runtime.pool("f").envs)
            ),
            within_s=5,
        )
        (second,) = env_pids(runtime)
        assert not alive(first)
        # Killed by a timeout: replaced too.
        result = await runtime.invoke("f", event({"then": "hang"}))
        assert result.outcome is Outcome.TIMEOUT
        assert await wait_for(
            lambda: (pids := env_pids(runtime)) != [] and pids != [second], within_s=5
        )
        assert runtime.pool("f").provisioned_alive() == 1


# -- request and response caps ---------------------------------------------------------------------


async def test_request_over_the_cap_is_rejected_and_the_worker_stays_healthy() -> None:
    async with make_runtime(fn("event_size"), max_request_bytes=2048) as (runtime, logs):
        ok = await runtime.invoke("f", event({"data": "x" * 1000}))
        too_big = await runtime.invoke("f", event({"data": "x" * 3000}))
        after = await runtime.invoke("f", event({"data": "x" * 2000}))
    assert ok.outcome is Outcome.OK
    assert too_big.outcome is Outcome.INVALID_REQUEST and too_big.outcome in NOT_RUN
    error = json.loads(too_big.payload)
    assert error["errorType"] == "RequestEntityTooLargeException"
    assert "2048 bytes" in error["errorMessage"]
    assert not logs.for_request(too_big.request_id)  # nothing ran, nothing logged for it
    assert after.outcome is Outcome.OK
    assert json.loads(after.payload)["pid"] == json.loads(ok.payload)["pid"]


async def test_response_over_the_cap_is_an_error_and_the_worker_stays_healthy() -> None:
    async with make_runtime(fn("big_response"), max_response_bytes=4096) as (runtime, _):
        too_big = await runtime.invoke("f", event({"bytes": 5000}))
        fits = await runtime.invoke("f", event({"bytes": 4000}))
        pids = env_pids(runtime)
    assert too_big.outcome is Outcome.FUNCTION_ERROR
    error = json.loads(too_big.payload)
    assert error["errorType"] == "Function.ResponseSizeTooLarge"
    assert "5002 bytes" in error["errorMessage"] and "4096 bytes" in error["errorMessage"]
    assert fits.outcome is Outcome.OK and len(fits.payload) == 4002
    assert len(pids) == 1  # the same worker answered both


async def test_payloads_near_the_default_6_mb_cap_round_trip() -> None:
    big = {"data": "y" * (5 * 1024 * 1024)}
    async with make_runtime(fn("echo", timeout_s=30), memory_budget_mb=4096) as (runtime, _):
        result = await runtime.invoke("f", event(big))
        over = await runtime.invoke("f", event({"data": "y" * (6 * 1024 * 1024)}))
        small = await runtime.invoke("f", b'{"after": 1}')
    assert result.outcome is Outcome.OK, (result.outcome, result.payload[:500], result.duration_ms)
    assert json.loads(result.payload) == big
    assert over.outcome is Outcome.INVALID_REQUEST
    assert small.outcome is Outcome.OK and json.loads(small.payload) == {"after": 1}


# -- shutdown ------------------------------------------------------------------------------------


async def test_close_during_init_and_during_an_invoke_leaves_no_process() -> None:
    functions = (
        fn("rt_slow_init.handler", name="slow-init", init_timeout_s=60),
        fn("sleep", name="busy", timeout_s=60),
    )
    async with make_runtime(*functions) as (runtime, _):
        initing = asyncio.create_task(runtime.invoke("slow-init", b"{}"))
        busy = asyncio.create_task(runtime.invoke("busy", event({"seconds": 30})))
        assert await wait_for(
            lambda: (
                len(env_pids(runtime, "slow-init")) == 1
                and bool(runtime.pool("busy").envs)
                and all(e.state is EnvState.BUSY for e in runtime.pool("busy").envs)
            )
        ), (
            [(e.state, e.proc) for p in runtime.pools.values() for e in p.envs],
            initing.done() and initing.result().payload,
            busy.done() and busy.result().payload,
        )
        pids = env_pids(runtime, "slow-init") + env_pids(runtime, "busy")
        started = time.monotonic()
        await runtime.close()
        assert time.monotonic() - started < 3
        init_result, busy_result = await asyncio.wait_for(asyncio.gather(initing, busy), 3)
    assert init_result.outcome is Outcome.INIT_ERROR
    assert busy_result.outcome is Outcome.CRASHED
    assert all(wait_dead(pid) for pid in pids)
    assert runtime.environments() == 0 and runtime.memory_used_mb == 0


async def test_an_abandoned_invoke_kills_its_environment_and_frees_the_slot() -> None:
    async with make_runtime(fn("sleep", reserved_concurrency=1)) as (runtime, _):
        pool = runtime.pool("f")
        task = asyncio.create_task(runtime.invoke("f", event({"seconds": 30})))
        assert await wait_for(lambda: any(e.state is EnvState.BUSY for e in pool.envs))
        [pid] = env_pids(runtime)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Nobody will read that result: the environment goes, its slot and memory come back.
        assert wait_dead(pid, 3)
        assert pool.leased == 0 and runtime.memory_used_mb == 0
        after = await runtime.invoke("f", event({"seconds": 0}))
        assert after.outcome is Outcome.OK
