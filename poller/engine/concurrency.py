"""How many batches a mapping runs at once: the counts its runner reports, the policy that
turns them into a target (fixed, or scaling.py's controller), and the bounds above any target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from poller.engine.scaling import Observation, ScalingController
from poller.runtime.pool import FunctionPool
from poller.sources.base import Depth

LONG_POLL_S: Final = 20.0
# Without ScalingConfig.MaximumConcurrency a mapping may grow to the function's own limit, and
# at most to this (Lambda's per-mapping ceiling is 1,250 concurrent invokes).
MAX_CONCURRENCY_CEILING: Final = 1000


@dataclass(slots=True)
class OutcomeCounts:
    """Outcomes since the scaling controller last looked."""

    ok: int = 0
    errors: int = 0
    throttles: int = 0
    partials: int = 0
    batch_seconds: float = 0.0
    batches_completed: int = 0
    messages: int = 0  # in the completed batches
    empty_polls: int = 0

    def take(self) -> OutcomeCounts:
        taken = OutcomeCounts(
            self.ok,
            self.errors,
            self.throttles,
            self.partials,
            self.batch_seconds,
            self.batches_completed,
            self.messages,
            self.empty_polls,
        )
        self.ok = self.errors = self.throttles = self.partials = 0
        self.batch_seconds = 0.0
        self.batches_completed = self.messages = self.empty_polls = 0
        return taken


class ConcurrencyPolicy:
    """Decides how many batches run at once. The fixed policy; scaling.py supplies a live one."""

    def __init__(self, target: int) -> None:
        self.target = target

    def tick(self, now: float, depth: Depth | None, in_flight: int, counts: OutcomeCounts) -> int:
        return self.target

    @property
    def poll_wait_s(self) -> float:
        return LONG_POLL_S

    @property
    def reason(self) -> str:
        return "fixed concurrency"


class ScaledConcurrency(ConcurrencyPolicy):
    """Concurrency that follows the backlog (engine/scaling.py decides)."""

    def __init__(self, controller: ScalingController) -> None:
        super().__init__(controller.target)
        self.controller = controller
        self._poll_wait_s = 0.0
        self._reason = "starting"

    def tick(self, now: float, depth: Depth | None, in_flight: int, counts: OutcomeCounts) -> int:
        decision = self.controller.observe(
            Observation(
                now=now,
                backlog=depth.backlog if depth is not None else -1,
                in_flight=in_flight,
                ok=counts.ok,
                errors=counts.errors,
                throttles=counts.throttles,
                partials=counts.partials,
                batch_seconds=counts.batch_seconds,
                batches_completed=counts.batches_completed,
                messages=counts.messages,
                empty_polls=counts.empty_polls,
            )
        )
        self.target = decision.target
        self._poll_wait_s = decision.poll_wait_s
        self._reason = decision.reason
        return decision.target

    @property
    def poll_wait_s(self) -> float:
        return self._poll_wait_s

    @property
    def reason(self) -> str:
        return self._reason


def concurrency_bound(maximum_concurrency: int | None, pool: FunctionPool) -> int:
    """The most batches a mapping may run: its own cap, the function's, the memory budget's."""
    config = pool.config
    bounds = [
        maximum_concurrency or MAX_CONCURRENCY_CEILING,
        pool.runtime.memory_budget_mb // config.memory_mb,
    ]
    if config.reserved_concurrency is not None:
        bounds.append(config.reserved_concurrency)
    return max(min(bounds), 1)
