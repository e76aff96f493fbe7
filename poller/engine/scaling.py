"""Concurrency controller for queue (SQS-like) event source mappings.

Pure logic: no I/O, no asyncio, no clock. On every tick the queue poller calls
:meth:`ScalingController.observe` with what it saw since the previous tick. It gets back
how many batches it may have in flight at once, plus a long-poll hint.

Model (ESM_SEMANTICS.md §3.1, §3.5, §12 items 2-4, §13 "Queue poller"):

* Need. Little's law: a slot busy for ``d`` seconds per batch of ``batch_size``
  processes ``batch_size / d`` messages a second. Two terms:
  * Draining the waiting backlog within ``target_delay_s`` takes
    ``backlog / batch_size * d / target_delay_s`` slots: the issue's formula. Messages
    already in flight are left out, since their slots are counted by the next term.
  * Keeping up with the arrival rate takes ``rate / batch_size * d`` slots.
  The rate term is why a steady load settles with a near-empty queue rather than one
  ``rate * target_delay_s`` deep. It is also why a surge in arrivals reaches the bound
  within a few ticks. The rate is estimated from the backlog's change plus the messages
  the batches removed.
  The sum is capped at the batches running, waiting, or arriving within the target delay,
  because a slot without a batch is useless.
* Up. Fast, because slow scale-up is pain point §12.4. At most x2 per tick, but a need
  of up to ``UP_SMALL_JUMP`` is granted at once. With no duration measured yet, the need
  is one slot per waiting batch, so the target doubles while the backlog exceeds what is
  in flight; with nothing in flight either, the target holds until a batch has run.
* Down. Gradual: -25 % or -1 per tick. It goes only as low as the highest need of the
  last ``down_hold_s`` (so never within ``down_hold_s`` of an up-step), only when that is
  clearly lower (deadband), and never below the batches in flight (they hold their
  slots) or the minimum.
* Errors. Function errors shrink the target multiplicatively (AIMD, as Lambda
  "gradually backs off", §3.5) and freeze growth for a cool-off. Valid partial batch
  responses are not errors: Lambda doesn't scale down on them (§3.4). Throttles cut the
  target to what is actually running, so the caller stops receiving messages it cannot
  invoke (§12.2).
* Idle. The target steps down to ``idle_minimum``, and ``poll_wait_s`` grows towards the
  20 s long poll, so an idle mapping costs almost nothing (§12.3).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = [
    "DOWN_DEADBAND",
    "DOWN_STEP_FRACTION",
    "DURATION_TAU_S",
    "ERROR_DECREASE",
    "ERROR_SHRINK_MIN_INTERVAL_S",
    "INITIAL_TARGET",
    "POLL_WAIT_FIRST_S",
    "POLL_WAIT_MAX_S",
    "RATE_TAU_S",
    "UP_MAX_FACTOR",
    "UP_SMALL_JUMP",
    "Decision",
    "Observation",
    "ScalingController",
]

# Lambda starts an SQS mapping with 5 concurrent batches (§3.1, §13).
INITIAL_TARGET = 5
# Growth is at most x2 per tick, so 1 -> 1000 takes about 10 ticks. Any need up to
# UP_SMALL_JUMP batches is granted at once: stepping 1, 2, 4, 8 towards a need of 8
# adds latency and protects nothing.
UP_MAX_FACTOR = 2.0
UP_SMALL_JUMP = 10
# A down-step removes 25 % of the target (at least 1), so 50 -> 1 takes 13 ticks and
# 1000 -> 1 about 25: gradual, yet an idle mapping is cheap again within seconds.
DOWN_STEP_FRACTION = 0.25
# Step down only when the peak need of the hold window is at least this fraction (and at
# least 1) below the target. With the window and the in-flight floor, this hysteresis stops
# a steady load from flapping between neighbouring targets while measurements jitter.
DOWN_DEADBAND = 0.05
# Multiplicative decrease on function errors. 0.75 rather than TCP's 0.5: Lambda backs
# off "gradually", and one poison message should not halve a busy mapping.
ERROR_DECREASE = 0.75
# Errors from batches already running when we shrank tell us nothing new. So shrink at
# most once per max(this, mean batch duration), like TCP's "once per round trip".
ERROR_SHRINK_MIN_INTERVAL_S = 1.0
# EWMA time constants. They are time-based rather than per-tick, so the smoothing per
# second does not depend on how often the caller ticks.
# * Duration (2 s) only sets the slope of the need, and one slow batch should not double it.
# * The arrival rate (2 s) is a derivative of a noisy count, so it needs smoothing. It is
#   also what makes a burst scale up within a few ticks, so the smoothing stays short.
# The backlog itself is used raw: growth must react to it at once, and the sliding peak of
# the need (see _scale) already keeps a noisy backlog from pulling the target down.
DURATION_TAU_S = 2.0
RATE_TAU_S = 2.0
# Long-poll hint: 0 with backlog, then 1, 2, 4, 8, 16, 20 s over consecutive empty polls.
# 20 s is the SQS WaitTimeSeconds ceiling (§3.2).
POLL_WAIT_FIRST_S = 1.0
POLL_WAIT_MAX_S = 20.0


@dataclass(slots=True)
class Observation:
    """What the poller saw since the previous tick."""

    now: float  # monotonic seconds
    backlog: int  # visible + in-flight messages reported by the source, -1 if unknown
    in_flight: int  # batches currently being processed (invoked, not yet finished)
    ok: int = 0  # batches that succeeded
    errors: int = 0  # function errors: exception, timeout, invalid/complete-failure response
    throttles: int = 0  # invokes refused because no function slot was free
    partials: int = 0  # valid partial batch responses: NOT errors for scaling (§3.4)
    batch_seconds: float = 0.0  # summed duration of the batches completed since last tick
    batches_completed: int = 0  # how many batches batch_seconds covers
    # Messages in those batches. Needed to tell a busy queue from a trickle of small batches.
    # 0 means not reported: the batches are then assumed full, which overestimates the
    # arrival rate when the queue is nearly empty.
    messages: int = 0
    empty_polls: int = 0  # receives that returned no message since last tick


@dataclass(slots=True, frozen=True)
class Decision:
    target: int  # concurrent batches the mapping may have in flight
    changed: bool  # whether this tick changed the target
    reason: str  # why the target has its current value (the last change), for a debug log
    poll_wait_s: float  # long-poll wait the caller should use for its next receive


def _ewma(old: float, sample: float, dt: float, tau: float) -> float:
    # alpha = 1 - exp(-dt/tau) gives the same smoothing per second whatever the tick interval.
    alpha = 1.0 - math.exp(-max(dt, 0.0) / tau)
    return old + alpha * (sample - old)


class ScalingController:
    """Target concurrency of one queue mapping. Call :meth:`observe` once per tick."""

    __slots__ = (
        "_batch_size",
        "_cooloff_until",
        "_down_hold_s",
        "_duration",
        "_duration_at",
        "_empty_streak",
        "_error_cooloff_s",
        "_idle_minimum",
        "_last_now",
        "_maximum",
        "_needs",
        "_next_error_shrink",
        "_prev_backlog",
        "_rate",
        "_reason",
        "_target",
        "_target_delay_s",
    )

    def __init__(
        self,
        *,
        maximum: int,
        batch_size: int,
        idle_minimum: int = 1,
        initial: int | None = None,
        target_delay_s: float = 5.0,
        down_hold_s: float = 5.0,
        error_cooloff_s: float = 10.0,
    ) -> None:
        """Set up the controller for one mapping.

        ``maximum`` is min(MaximumConcurrency or the function's limit, reserved
        concurrency, memory budget), computed by the caller. ``initial`` defaults to
        Lambda's 5 and is clamped to [idle_minimum, maximum].
        """
        if idle_minimum < 1:
            # At 0 the mapping would never poll again, so it could never see new messages.
            raise ValueError("idle_minimum must be >= 1")
        if target_delay_s <= 0:
            raise ValueError("target_delay_s must be > 0")
        if down_hold_s < 0 or error_cooloff_s < 0:
            raise ValueError("down_hold_s and error_cooloff_s must be >= 0")
        self._idle_minimum = idle_minimum
        self._target_delay_s = float(target_delay_s)
        self._down_hold_s = float(down_hold_s)
        self._error_cooloff_s = float(error_cooloff_s)
        self._maximum = 1
        self._batch_size = 1
        self._duration: float | None = None  # EWMA seconds per batch; None = cold start
        self._duration_at = 0.0
        self._prev_backlog: int | None = None  # raw backlog at the previous tick
        self._rate: float | None = None  # EWMA arrival rate, messages/s
        self._last_now: float | None = None
        self._cooloff_until = -math.inf
        self._next_error_shrink = -math.inf
        self._empty_streak = 0
        self._target = 0  # set below, once the bounds are known
        self._reason = ""
        # (time, need) over the last down_hold_s, needs decreasing: [0] is the window's peak.
        self._needs: deque[tuple[float, int]] = deque()
        self.set_bounds(maximum=maximum, batch_size=batch_size)
        self._target = self._clamp(INITIAL_TARGET if initial is None else initial)
        self._reason = f"initial {self._target}"

    # -- public API ---------------------------------------------------------------------

    @property
    def target(self) -> int:
        return self._target

    @property
    def maximum(self) -> int:
        return self._maximum

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def mean_batch_seconds(self) -> float | None:
        """Smoothed batch duration; None until a batch has completed."""
        return self._duration

    @property
    def arrival_rate(self) -> float | None:
        """Smoothed arrival rate in messages/s; None until two backlog readings."""
        return self._rate

    def set_bounds(self, *, maximum: int | None = None, batch_size: int | None = None) -> None:
        """Apply an updated mapping or function limit.

        A lower maximum takes effect at once: the target is clamped here, not at the next
        tick.
        """
        if maximum is not None:
            if maximum < 1:
                raise ValueError("maximum must be >= 1")
            self._maximum = maximum
            if self._target > maximum:
                self._target = maximum
                self._reason = f"maximum lowered to {maximum}"
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError("batch_size must be >= 1")
            if batch_size != self._batch_size:
                # The measured duration was for batches of the old size, so it no longer
                # predicts anything, nor do needs counted in old-size batches. Fall back to
                # the cold-start rule until re-measured.
                self._duration = None
                self._needs.clear()
            self._batch_size = batch_size

    def observe(self, obs: Observation) -> Decision:
        """Feed one tick and return the target for the next one."""
        dt = 0.0 if self._last_now is None else max(obs.now - self._last_now, 0.0)
        self._last_now = obs.now
        self._update_duration(obs)
        self._update_rate(obs, dt)
        poll_wait = self._poll_wait(obs)
        before = self._target

        if not self._backoff(obs):
            self._scale(obs)

        # Hard bounds whatever path was taken; set_bounds may also have moved them.
        self._target = self._clamp(self._target)
        return Decision(
            target=self._target,
            changed=self._target != before,
            reason=self._reason,
            poll_wait_s=poll_wait,
        )

    # -- internals ----------------------------------------------------------------------

    def _clamp(self, value: int) -> int:
        # The maximum wins over the minimum: it is a hard limit (reserved concurrency,
        # memory), while idle_minimum is only a polling preference.
        return max(min(self._idle_minimum, self._maximum), min(value, self._maximum))

    def _update_duration(self, obs: Observation) -> None:
        if obs.batches_completed <= 0 or obs.batch_seconds <= 0:
            return
        sample = obs.batch_seconds / obs.batches_completed
        if self._duration is None:
            self._duration = sample
        else:
            self._duration = _ewma(
                self._duration, sample, obs.now - self._duration_at, DURATION_TAU_S
            )
        self._duration_at = obs.now

    def _update_rate(self, obs: Observation, dt: float) -> None:
        prev, self._prev_backlog = self._prev_backlog, (obs.backlog if obs.backlog >= 0 else None)
        if prev is None or obs.backlog < 0 or dt <= 0:
            return
        # arrivals = growth of the backlog + messages that left it. Messages leave only when
        # deleted, so messages in errored batches (they return to the queue) do not count.
        done = obs.messages if obs.messages > 0 else obs.batches_completed * self._batch_size
        finished = obs.ok + obs.partials + obs.errors
        if finished > 0:
            done = done * (obs.ok + obs.partials) / finished
        sample = max(0.0, (obs.backlog - prev + done) / dt)
        if obs.backlog == 0 and done == 0 and obs.in_flight <= 0:
            # Nothing queued, nothing processed, nothing running: the rate is exactly 0, and
            # letting the EWMA decay would keep a phantom need alive for seconds.
            self._rate = 0.0
        elif self._rate is None:
            self._rate = sample
        else:
            self._rate = _ewma(self._rate, sample, dt, RATE_TAU_S)

    def _poll_wait(self, obs: Observation) -> float:
        if obs.backlog > 0 or (obs.backlog < 0 and obs.messages + obs.batches_completed > 0):
            self._empty_streak = 0
        elif obs.empty_polls > 0:
            self._empty_streak += obs.empty_polls
        if self._empty_streak == 0:
            return 0.0
        # Bounding the exponent avoids overflow; 2 ** 5 already passes the ceiling.
        exponent = min(self._empty_streak - 1, 5)
        return min(POLL_WAIT_MAX_S, POLL_WAIT_FIRST_S * 2.0**exponent)

    def _backoff(self, obs: Observation) -> bool:
        """Throttle and error handling. Returns True if the target shrank this tick."""
        shrunk = False
        if obs.throttles > 0:
            # No function slot was free, so only what runs now can run. Going lower would be
            # a guess. Staying higher would keep receiving messages that then burn receive
            # counts (§12.2).
            running = self._clamp(max(obs.in_flight, 0))
            if running < self._target:
                self._target = running
                self._reason = f"{obs.throttles} throttled: shrink to {running} running"
                shrunk = True
            self._cooloff_until = obs.now + self._error_cooloff_s
        if obs.errors > 0:
            self._cooloff_until = obs.now + self._error_cooloff_s
            if obs.now >= self._next_error_shrink:
                # This may go below in_flight on purpose. Those batches finish; the caller
                # just does not replace them. With an in-flight floor, backoff would do
                # nothing whenever all slots are busy, which is exactly when it matters.
                new = self._clamp(math.floor(self._target * ERROR_DECREASE))
                if new < self._target:
                    self._target = new
                    self._reason = f"{obs.errors} errors: x{ERROR_DECREASE} to {new}"
                    shrunk = True
                interval = max(ERROR_SHRINK_MIN_INTERVAL_S, self._duration or 0.0)
                self._next_error_shrink = obs.now + interval
        return shrunk

    def _need(self, obs: Observation) -> tuple[int, str]:
        """Batches needed now, and the explanation for the log."""
        backlog = obs.backlog
        if backlog < 0:
            # Unknown backlog. Empty receives mean there is no more work than is in flight.
            # All slots busy with no empty receive means there is probably more.
            if obs.empty_polls > 0:
                return max(obs.in_flight, 0), "receives came back empty"
            if obs.in_flight >= self._target:
                # Grow by a quarter, not x2: without a backlog figure, overshoot only shows
                # up as empty receives, so large steps would flap.
                need = self._target + max(1, round(self._target * DOWN_STEP_FRACTION))
                return need, f"all {self._target} slots busy, backlog unknown"
            return self._target, "backlog unknown"
        rate = self._rate or 0.0
        if backlog <= 0 and rate == 0.0:
            return 0, "queue idle"
        bs = self._batch_size
        # Batches' worth of messages not yet in a slot. In-flight messages are part of the
        # reported backlog, but their slots are already counted by the rate term below.
        waiting = max(0.0, backlog - max(obs.in_flight, 0) * bs) / bs
        d = self._duration
        if d is None:
            if obs.in_flight <= 0:
                # Nothing measured and nothing running yet (a mapping that has just started):
                # the first batches will say how long a batch takes within a tick. Growing on
                # no evidence would start environments a fast handler never needs.
                return self._target, f"backlog {backlog}, waiting for a first batch duration"
            # Cold start: no duration yet, so one slot per waiting batch. The x2 step limit
            # turns this into "double while the backlog exceeds in-flight capacity".
            need = math.ceil(waiting)
            return need, f"backlog {backlog} is {need} batches, no duration measured yet"
        # Drain the backlog within the target delay, and keep up with arrivals: by Little's
        # law, concurrency = batch arrival rate x batch duration.
        need_f = waiting * d / self._target_delay_s + rate / bs * d
        # A slot without a batch is useless. Cap at the batches running, waiting, or
        # arriving within the target delay. This only bites when batches outlast the target
        # delay (d > target_delay_s), where the formula would give one batch several slots.
        cap = max(obs.in_flight, 0) + waiting + rate * self._target_delay_s / bs
        need = math.ceil(min(need_f, cap) - 1e-9)  # 1e-9: float error must not add a slot
        return need, (
            f"backlog {backlog} + {rate:.0f} msg/s needs {need} batches to drain in "
            f"{self._target_delay_s:.1f}s at {d:.3f}s/batch"
        )

    def _peak_need(self, now: float, need: int) -> int:
        """Highest need seen over the last down_hold_s (monotonic-deque sliding maximum)."""
        needs = self._needs
        while needs and needs[-1][1] <= need:
            needs.pop()
        needs.append((now, need))
        while needs[0][0] < now - self._down_hold_s:
            needs.popleft()
        return needs[0][1]

    def _scale(self, obs: Observation) -> None:
        need, why = self._need(obs)
        peak = self._peak_need(obs.now, need)
        target = self._target
        if need > target:
            if obs.now < self._cooloff_until:
                return  # growth is frozen after errors or throttles (§3.5)
            limit = max(math.ceil(target * UP_MAX_FACTOR), UP_SMALL_JUMP)
            new = self._clamp(min(need, limit))
            if new > target:
                self._target = new
                self._reason = why
            return
        # Down only to the highest need of the last down_hold_s: up at once, down only
        # after the need has stayed low for the whole window. This is the hysteresis that
        # lets a noisy steady load sit on its upper envelope instead of flapping. It also
        # gives the hold after an up-step for free: the need that caused the step is at
        # least the new target, and it stays in the window for down_hold_s.
        if target - peak < max(1.0, target * DOWN_DEADBAND):
            return  # inside the deadband
        step = max(1, round(target * DOWN_STEP_FRACTION))
        new = self._clamp(max(peak, target - step, obs.in_flight))
        if new < target:
            self._target = new
            self._reason = f"{why}: step down to {new}"
