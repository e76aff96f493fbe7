"""The daemon at a glance: the document ``/status`` serves and `poller status` shows.

Built from what the daemon already keeps (the registry as of the last reconcile, each
runner's ``status()``, the mappings that could not start, each function's pool), so
answering it costs no call to a source.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from poller.engine.health import is_problem
from poller.redaction import redact
from poller.runtime.environment import EnvState

if TYPE_CHECKING:
    from poller.daemon import Supervisor
    from poller.mappings import Mapping
    from poller.runtime.pool import FunctionPool, Runtime

# Keys every mapping entry has (None where they do not apply), so a script can rely on them.
MAPPING_KEYS = (
    "backlog",
    "visible",
    "inFlight",
    "iteratorAgeSeconds",
    "concurrency",
    "concurrencyTarget",
    "lastProcessingResult",
    "lastError",
)


def poller_version() -> str:
    try:
        return version("poller")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
        return "unknown"


def mapping_entry(mapping: Mapping, supervisor: Supervisor, draining: bool) -> dict[str, Any]:
    uuid = mapping.uuid
    entry: dict[str, Any] = {
        "uuid": uuid,
        "name": mapping.name,
        "functionName": mapping.function_name,
        "eventSource": mapping.source.display_uri,
        "kind": mapping.kind.name,
        **dict.fromkeys(MAPPING_KEYS),
    }
    running = supervisor.running.get(uuid)
    if running is not None:
        entry.update(running.runner.status())
    elif uuid in supervisor.problems:
        entry["state"] = "not running"
        entry["lastProcessingResult"] = supervisor.problems[uuid]
    elif not mapping.enabled:
        entry["state"] = "disabled"
        entry["lastProcessingResult"] = mapping.last_processing_result
    elif draining:
        entry["state"] = "stopped"
        entry["lastProcessingResult"] = mapping.last_processing_result
    else:
        # Enabled in the registry since the last reconcile: it starts within seconds.
        entry["state"] = "pending"
        entry["lastProcessingResult"] = mapping.last_processing_result
    entry["problem"] = is_problem(entry["lastProcessingResult"])
    return entry


def environment_entry(env: Any, now: float) -> dict[str, Any]:
    idle = env.state is EnvState.IDLE
    return {
        "id": env.id[:12],
        "pid": env.proc.pid if env.proc is not None else None,
        "state": env.state.value,
        "provisioned": env.provisioned,
        "invokes": env.invokes,
        "idleSeconds": round(now - env.last_used, 1) if idle else None,
        "initMs": round(env.init_ms, 1) if env.init_ms is not None else None,
    }


def function_entry(pool: FunctionPool, now: float) -> dict[str, Any]:
    config = pool.config
    envs = sorted(pool.envs, key=lambda env: env.id)
    return {
        "name": config.name,
        "handler": config.handler,
        "memoryMb": config.memory_mb,
        "timeoutSeconds": config.timeout_s,
        "reservedConcurrency": config.reserved_concurrency,
        "provisionedConcurrency": config.provisioned_concurrency,
        "busy": sum(1 for env in envs if env.state is EnvState.BUSY),
        "environments": [environment_entry(env, now) for env in envs],
    }


def status_document(
    *,
    supervisor: Supervisor | None,
    runtime: Runtime | None,
    http_listen: str,
    state_url: str,
    started: float,
    ready: bool,
    draining: bool,
) -> dict[str, Any]:
    """The whole /status answer; ``started`` is the daemon's start in epoch seconds."""
    now = time.time()
    mappings = []
    if supervisor is not None:
        known = dict(supervisor.mappings)
        # A runner whose mapping left the registry since the last reconcile still runs.
        for uuid, running in supervisor.running.items():
            known.setdefault(uuid, running.mapping)
        mappings = [
            mapping_entry(m, supervisor, draining)
            for m in sorted(known.values(), key=lambda m: (m.name or "", m.uuid))
        ]
    monotonic = time.monotonic()
    functions = (
        [function_entry(pool, monotonic) for _, pool in sorted(runtime.pools.items())]
        if runtime is not None
        else []
    )
    return {
        "daemon": {
            "version": poller_version(),
            "pid": os.getpid(),
            "state": "draining" if draining else "running",
            "ready": ready,
            "startedAt": round(started, 3),
            "uptimeSeconds": round(now - started, 1),
            "httpListen": http_listen,
            "stateStore": redact(state_url),
            "memoryBudgetMb": runtime.memory_budget_mb if runtime is not None else None,
            "memoryReservedMb": runtime.memory_used_mb if runtime is not None else None,
        },
        "mappings": mappings,
        "functions": functions,
    }
