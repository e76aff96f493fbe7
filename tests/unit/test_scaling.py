"""Unit tests for the queue-mapping scaling controller (poller.engine.scaling).

Most tests drive the controller with a tiny simulated queue instead of hand-written
observations. Each tick of DT seconds the queue receives arrivals. The current target's
slots then process up to ``target * batch_size * DT / batch_s`` messages, and the tick
is reported back the way the real poller would.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest

from poller.engine.scaling import (
    DOWN_STEP_FRACTION,
    ERROR_DECREASE,
    INITIAL_TARGET,
    POLL_WAIT_MAX_S,
    Decision,
    Observation,
    ScalingController,
)

DT = 0.25  # seconds per tick
BATCH_S = 0.05  # 50 ms per batch
BATCH_SIZE = 10
MAXIMUM = 50  # 50 slots x 10 messages / 50 ms = 10,000 msg/s at most


@dataclass
class SimQueue:
    """A queue plus an idealised worker pool running the controller's target."""

    ctrl: ScalingController
    batch_s: float = BATCH_S
    batch_size: int = BATCH_SIZE
    now: float = 0.0
    visible: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    decisions: list[Decision] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)

    def tick(
        self,
        arrivals: int = 0,
        *,
        error_fraction: float = 0.0,
        partial_fraction: float = 0.0,
        noise: float = 0.0,
    ) -> Decision:
        self.now += DT
        jitter = (lambda: 1.0 + self.rng.uniform(-noise, noise)) if noise else (lambda: 1.0)
        self.visible += int(arrivals * jitter())
        batch_s = self.batch_s * jitter()
        capacity = int(self.ctrl.target * self.batch_size * DT / batch_s)
        done = min(self.visible, capacity)
        self.visible -= done
        batches = math.ceil(done / self.batch_size)
        errors = round(batches * error_fraction)
        partials = round(batches * partial_fraction)
        # Errored batches go back to the queue (visibility timeout shortened to one tick);
        # partial responses give back only their failed items, here 1 message per batch.
        self.visible += errors * self.batch_size + partials
        in_flight = min(self.ctrl.target, math.ceil(self.visible / self.batch_size))
        obs = Observation(
            now=self.now,
            backlog=int(self.visible * jitter()),
            in_flight=in_flight,
            ok=batches - errors - partials,
            errors=errors,
            partials=partials,
            batch_seconds=batches * batch_s,
            batches_completed=batches,
            messages=done,
            empty_polls=0 if done or self.visible else 1,
        )
        decision = self.ctrl.observe(obs)
        self.observations.append(obs)
        self.decisions.append(decision)
        return decision

    def run(self, seconds: float, rate: float = 0.0, **kw: float) -> list[Decision]:
        """Tick for `seconds` of simulated time at `rate` messages/s."""
        return [self.tick(round(rate * DT), **kw) for _ in range(round(seconds / DT))]


def controller(**kw: int | float) -> ScalingController:
    args: dict[str, int | float] = {"maximum": MAXIMUM, "batch_size": BATCH_SIZE}
    args.update(kw)
    return ScalingController(**args)  # type: ignore[arg-type]


def assert_bounds(sim: SimQueue, minimum: int = 1) -> None:
    """Hard bounds on every decision taken so far."""
    floor = min(minimum, sim.ctrl.maximum)
    for d in sim.decisions:
        assert floor <= d.target <= sim.ctrl.maximum, d


def steady(rate: float, seconds: float = 30.0, **kw: int | float) -> SimQueue:
    """A mapping that has run `seconds` at a constant `rate`."""
    sim = SimQueue(controller(**kw))
    sim.run(seconds, rate)
    return sim


# -- construction and validation ---------------------------------------------------------


def test_initial_target_is_lambdas_five_clamped_to_bounds() -> None:
    assert controller().target == INITIAL_TARGET == 5
    assert controller(maximum=3).target == 3
    assert controller(initial=0, idle_minimum=2).target == 2
    assert controller(initial=500).target == MAXIMUM


@pytest.mark.parametrize(
    "kw",
    [{"maximum": 0}, {"batch_size": 0}, {"idle_minimum": 0}, {"target_delay_s": 0.0}],
)
def test_invalid_bounds_are_rejected(kw: dict[str, int | float]) -> None:
    with pytest.raises(ValueError):
        controller(**kw)


# -- up ----------------------------------------------------------------------------------


def test_ramp_reaches_the_bound_within_two_seconds_when_arrivals_exceed_capacity() -> None:
    sim = SimQueue(controller())
    decisions = sim.run(4.0, rate=20_000)  # twice what 50 slots can process
    reached = next(((i + 1) * DT for i, d in enumerate(decisions) if d.target == MAXIMUM), None)
    assert reached is not None and reached <= 2.0, [d.target for d in decisions]
    assert sim.ctrl.target == MAXIMUM
    assert_bounds(sim)


def test_burst_of_20000_messages_on_a_running_mapping_drains_within_the_target_delay() -> None:
    sim = SimQueue(controller())
    sim.run(2.0)  # idle for a while
    assert sim.ctrl.target == 1
    start = sim.now
    sim.tick(20_000)
    sim.tick()
    # Within two ticks at least the Little's-law need: 20000 / 10 * 0.050 / 5.0 = 20.
    assert sim.ctrl.target >= 20, [d.target for d in sim.decisions]
    while sim.visible and sim.now - start < 10.0:
        sim.tick()
    assert sim.now - start <= 5.0  # drained within target_delay_s
    sim.run(12.0)
    assert sim.ctrl.target == 1  # and back down once idle
    assert_bounds(sim)


def test_a_single_slow_tick_does_not_multiply_the_target() -> None:
    sim = steady(6_000)
    busy = sim.ctrl.target
    sim.batch_s = BATCH_S * 3  # one tick of batches three times slower (a GC pause, a blip)
    sim.tick(round(6_000 * DT))
    sim.batch_s = BATCH_S
    assert sim.ctrl.target <= busy * 1.5  # the duration is smoothed, not taken raw


def test_slow_batches_get_no_more_slots_than_batches() -> None:
    # 30 s batches against a 5 s target delay: the formula alone would give each of the
    # 10 waiting batches 6 slots, but a batch cannot be split.
    ctrl = controller(maximum=100, initial=10)
    d = ctrl.observe(
        Observation(
            now=30.0,
            backlog=100,
            in_flight=0,
            ok=1,
            batch_seconds=30.0,
            batches_completed=1,
            messages=10,
        )
    )
    assert ctrl.mean_batch_seconds == 30.0
    assert d.target == 10
    d = ctrl.observe(Observation(now=30.25, backlog=100, in_flight=10))
    assert d.target == 10  # all 10 batches running, nothing else to do: hold the slots


def test_backlog_alone_is_drained_in_about_the_target_delay_littles_law() -> None:
    # A backlog that is already there on the first tick is backlog, not arrival rate.
    # With no arrivals the need is exactly the formula:
    # ceil(20000 / 10 * 0.050 / 5.0) = 20 batches, reached in two ticks.
    sim = SimQueue(controller())
    sim.visible = 20_000
    targets = [sim.tick().target for _ in range(2)]
    assert targets[0] == 10  # cold start: no duration yet, x2 from 5
    assert 19 <= targets[1] <= 20
    assert "to drain in 5.0s at 0.050s/batch" in sim.decisions[-1].reason
    for _ in range(round(6.0 / DT)):
        sim.tick()
        if sim.visible == 0:
            break
    assert sim.visible == 0 and sim.now <= 6.0  # drained in about target_delay_s
    assert max(d.target for d in sim.decisions) <= 20  # no overshoot past the need


def test_cold_start_doubles_while_backlog_exceeds_in_flight_capacity() -> None:
    # Long batches: nothing completes, so no duration is ever measured.
    ctrl = controller(initial=1, maximum=100)
    targets = []
    for i in range(1, 7):
        d = ctrl.observe(Observation(now=i * DT, backlog=100_000, in_flight=ctrl.target))
        targets.append(d.target)
    # 1 -> 10 at once (small need), then x2 per tick, capped at the maximum.
    assert targets == [10, 20, 40, 80, 100, 100]
    assert ctrl.mean_batch_seconds is None


def test_cold_start_waits_for_a_first_batch_before_growing() -> None:
    # A mapping that has just started on a deep backlog (200,000 messages, batches of 100):
    # nothing runs yet, nothing is measured. Growing now would spawn environments a fast
    # handler never needs.
    ctrl = controller(batch_size=100)  # 5 slots
    d = ctrl.observe(Observation(now=0.0, backlog=200_000, in_flight=0))
    assert d.target == INITIAL_TARGET
    # A tick later 5 ms batches have run: 2,000 batches x 5 ms drain in 5 s with 2 slots.
    d = ctrl.observe(
        Observation(
            now=DT,
            backlog=198_000,
            in_flight=5,
            ok=20,
            batch_seconds=20 * 0.005,
            batches_completed=20,
            messages=2_000,
        )
    )
    assert d.target == INITIAL_TARGET
    # Slow batches instead (none finished, all slots busy): the cold-start ramp goes on.
    ctrl = controller(batch_size=100)
    ctrl.observe(Observation(now=0.0, backlog=200_000, in_flight=0))
    d = ctrl.observe(Observation(now=DT, backlog=200_000, in_flight=5))
    assert d.target == 10


def test_cold_start_does_not_grow_when_in_flight_batches_hold_the_backlog() -> None:
    ctrl = controller()  # 5 slots
    d = ctrl.observe(Observation(now=1.0, backlog=50, in_flight=5))
    assert d.target == 5  # 50 messages = the 5 batches already running


# -- steady state --------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_steady_load_does_not_oscillate(noise: float) -> None:
    rate = 6_000  # needs 6000 / 10 * 0.05 = 30 batches
    sim = SimQueue(controller())
    sim.run(30.0, rate, noise=noise)  # settle
    window = [d.target for d in sim.run(60.0, rate, noise=noise)]
    assert (max(window) - min(window)) / min(window) < 0.10, window
    # ...and it settles at the right level: enough slots, not a lot more.
    assert min(window) >= 30 and max(window) <= 34, window
    # The arrival-rate term keeps the queue short; the backlog alone would settle around
    # rate x target delay = 30,000 messages.
    assert max(o.backlog for o in sim.observations[-240:]) < rate * 1.0
    assert_bounds(sim)


def test_arrival_rate_estimate_ignores_messages_that_errored_back_to_the_queue() -> None:
    sim = steady(6_000)
    assert sim.ctrl.arrival_rate == pytest.approx(6_000, rel=0.02)
    # 30 % of batches fail and their messages stay in the backlog: they did not leave
    # it, so they must not be counted as processed (which would read as extra arrivals).
    sim.run(3.0, 6_000, error_fraction=0.3)
    assert sim.ctrl.arrival_rate == pytest.approx(6_000, rel=0.05)


# -- down ----------------------------------------------------------------------------------


@pytest.mark.parametrize("idle_minimum", [1, 2])
def test_scale_down_when_idle_is_held_then_gradual(idle_minimum: int) -> None:
    sim = steady(8_000, idle_minimum=idle_minimum)  # 40 batches
    busy = sim.ctrl.target
    assert busy >= 40
    last_up = max(
        o.now
        for o, d in zip(sim.observations, sim.decisions, strict=True)
        if d.changed and "step down" not in d.reason
    )
    stop = sim.now
    previous = busy
    for d in sim.run(15.0):
        if d.target < previous:
            # Not within down_hold_s of the last up-step, nor of the load changing.
            assert sim.now - max(last_up, stop) >= 5.0
            # Gradual: at most -25 % (or -1) per tick.
            assert previous - d.target <= max(1, round(previous * DOWN_STEP_FRACTION))
        previous = d.target
    assert sim.ctrl.target == idle_minimum
    assert "idle" in sim.decisions[-1].reason
    assert_bounds(sim, idle_minimum)


def test_steps_down_as_load_drops_but_holds_on_a_short_dip() -> None:
    sim = steady(8_000)
    busy = sim.ctrl.target
    sim.run(2.0, 2_000)  # a dip shorter than down_hold_s
    assert sim.ctrl.target == busy
    sim.run(2.0, 8_000)
    assert sim.ctrl.target == busy
    sim.run(15.0, 2_000)  # a real drop: 2000 msg/s needs 10 batches
    assert 10 <= sim.ctrl.target <= 11


def test_step_down_never_goes_below_batches_in_flight() -> None:
    ctrl = controller(initial=20, down_hold_s=0.0)
    # Eight long batches are still running and nothing else is queued: the need is 0.
    for i in range(1, 40):
        d = ctrl.observe(Observation(now=i * DT, backlog=80, in_flight=8))
        assert d.target >= 8
    assert ctrl.target == 8
    ctrl.observe(Observation(now=20.0, backlog=0, in_flight=0))
    ctrl.observe(Observation(now=20.25, backlog=0, in_flight=0))
    assert ctrl.target < 8


# -- errors, partial responses, throttles ----------------------------------------------------


def test_function_errors_shrink_multiplicatively_and_freeze_growth() -> None:
    sim = steady(6_000)
    busy = sim.ctrl.target
    d = sim.tick(round(6_000 * DT), error_fraction=0.3)
    assert d.changed and d.target == math.floor(busy * ERROR_DECREASE)
    assert "errors" in d.reason
    # Errors keep coming for 3 s: one more multiplicative cut per second, never growth,
    # although the returned messages make the backlog grow.
    targets = [d.target for d in sim.run(3.0, 6_000, error_fraction=0.3)]
    assert all(b <= a for a, b in itertools.pairwise(targets))
    assert targets[-1] <= math.floor(busy * ERROR_DECREASE**3) + 1
    assert targets[-1] >= math.floor(busy * ERROR_DECREASE**5)  # gradual, not a collapse
    # Errors stop; the backlog is large but growth stays frozen for the cool-off (10 s)...
    low = sim.ctrl.target
    sim.run(9.0, 6_000)
    assert sim.ctrl.target == low
    assert sim.visible > 10_000
    # ...then growth resumes.
    sim.run(4.0, 6_000)
    assert sim.ctrl.target > low * 1.5
    assert_bounds(sim)


def test_error_shrink_may_go_below_in_flight() -> None:
    ctrl = controller(initial=40)
    d = ctrl.observe(
        Observation(
            now=1.0,
            backlog=10_000,
            in_flight=40,
            ok=9,
            errors=1,
            batch_seconds=0.5,
            batches_completed=10,
            messages=100,
        )
    )
    # The 40 running batches finish; the caller just does not replace them.
    assert d.target == 30


def test_partial_batch_responses_do_not_shrink() -> None:
    sim = steady(6_000)
    busy = sim.ctrl.target
    # Every batch reports a valid partial failure for 10 s.
    targets = [d.target for d in sim.run(10.0, 6_000, partial_fraction=1.0)]
    assert min(targets) >= busy
    # Growth is not frozen either: a higher load is followed at once.
    sim.run(3.0, 8_000, partial_fraction=1.0)
    assert sim.ctrl.target >= 40


def test_throttles_shrink_the_target_to_what_is_running() -> None:
    ctrl = controller(initial=30)
    d = ctrl.observe(Observation(now=1.0, backlog=50_000, in_flight=12, throttles=3))
    assert d.target == 12 and d.changed
    assert "throttled" in d.reason
    # The backlog is still huge, but no growth during the cool-off.
    for i in range(2, 30):
        d = ctrl.observe(
            Observation(
                now=1.0 + i * DT,
                backlog=50_000,
                in_flight=12,
                ok=12,
                batch_seconds=0.6,
                batches_completed=12,
                messages=120,
            )
        )
        assert d.target == 12
    d = ctrl.observe(
        Observation(
            now=12.0,
            backlog=50_000,
            in_flight=12,
            ok=12,
            batch_seconds=0.6,
            batches_completed=12,
            messages=120,
        )
    )
    assert d.target > 12


def test_throttle_with_nothing_running_keeps_the_minimum() -> None:
    ctrl = controller(idle_minimum=2)
    d = ctrl.observe(Observation(now=1.0, backlog=500, in_flight=0, throttles=1))
    assert d.target == 2


# -- hard bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_hard_bounds_hold_under_random_input(seed: int) -> None:
    rng = random.Random(seed)
    maximum, minimum = rng.randint(1, 60), rng.randint(1, 3)
    ctrl = controller(maximum=maximum, idle_minimum=minimum)
    now = 0.0
    for _ in range(2_000):
        now += rng.choice([0.0, 0.1, 0.25, 1.0, 7.0])
        before = ctrl.target
        in_flight = rng.randint(0, maximum)
        batches = rng.randint(0, 50)
        obs = Observation(
            now=now,
            backlog=rng.choice([-1, 0, rng.randint(0, 100), rng.randint(0, 200_000)]),
            in_flight=in_flight,
            ok=batches,
            errors=rng.choice([0] * 9 + [1]),
            throttles=rng.choice([0] * 19 + [1]),
            partials=rng.choice([0, 0, 2]),
            batch_seconds=batches * rng.uniform(0.001, 3.0),
            batches_completed=batches,
            messages=batches * rng.randint(1, BATCH_SIZE),
            empty_polls=rng.choice([0, 0, 1, 3]),
        )
        d = ctrl.observe(obs)
        assert min(minimum, maximum) <= d.target <= maximum
        assert d.target == ctrl.target
        assert 0.0 <= d.poll_wait_s <= POLL_WAIT_MAX_S
        if d.target < before and not (obs.errors or obs.throttles):
            assert d.target >= min(in_flight, maximum)  # load-driven steps keep busy slots
        if obs.throttles and not obs.errors:
            assert d.target >= min(max(in_flight, minimum), before)
        if rng.random() < 0.01:
            maximum = rng.randint(1, 60)
            ctrl.set_bounds(maximum=maximum)
            assert ctrl.target <= maximum


def test_set_bounds_lowering_maximum_takes_effect_at_once() -> None:
    sim = steady(8_000)
    assert sim.ctrl.target >= 40
    sim.ctrl.set_bounds(maximum=10)
    assert sim.ctrl.target == 10  # before any tick
    for d in sim.run(5.0, 8_000):
        assert d.target == 10
    sim.ctrl.set_bounds(maximum=50)
    sim.run(2.0, 8_000)
    assert sim.ctrl.target == 50  # the queue grew meanwhile: back up to the new bound


def test_set_bounds_batch_size_restarts_the_duration_estimate() -> None:
    sim = steady(1_000)
    assert sim.ctrl.mean_batch_seconds == pytest.approx(BATCH_S)
    sim.ctrl.set_bounds(batch_size=5)
    assert sim.ctrl.batch_size == 5 and sim.ctrl.mean_batch_seconds is None
    with pytest.raises(ValueError):
        sim.ctrl.set_bounds(maximum=0)


# -- long-poll hint -------------------------------------------------------------------------


def test_poll_wait_grows_on_empty_polls_and_resets_on_backlog() -> None:
    ctrl = controller()
    now = 0.0

    def tick(backlog: int, empty_polls: int = 0) -> float:
        nonlocal now
        now += DT
        obs = Observation(now=now, backlog=backlog, in_flight=0, empty_polls=empty_polls)
        return ctrl.observe(obs).poll_wait_s

    assert tick(100) == 0.0
    waits = [tick(0, empty_polls=1) for _ in range(7)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert tick(0) == 20.0  # no poll came back this tick: nothing new learnt
    assert tick(3) == 0.0  # messages again: poll without waiting
    assert tick(0, empty_polls=2) == 2.0  # the streak restarts (two empty polls)


def test_idle_simulated_mapping_ends_on_the_long_poll() -> None:
    sim = steady(2_000, seconds=10.0)
    assert sim.decisions[-1].poll_wait_s == 0.0
    sim.run(10.0)
    assert sim.decisions[-1].poll_wait_s == POLL_WAIT_MAX_S


# -- unknown backlog -----------------------------------------------------------------------


def test_unknown_backlog_grows_while_all_slots_are_busy_and_shrinks_on_empty_polls() -> None:
    ctrl = controller(initial=8)
    d = ctrl.observe(
        Observation(
            now=1.0,
            backlog=-1,
            in_flight=8,
            ok=8,
            batch_seconds=0.4,
            batches_completed=8,
            messages=80,
        )
    )
    assert d.target == 10  # +25 %
    for i in range(2, 60):
        d = ctrl.observe(Observation(now=1.0 + i * DT, backlog=-1, in_flight=3, empty_polls=4))
    assert d.target == 3
    assert d.poll_wait_s == POLL_WAIT_MAX_S
