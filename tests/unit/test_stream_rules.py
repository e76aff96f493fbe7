"""The pure rules of ordered mappings: checkpoint arithmetic across lanes, parent-before-child,
bisect and retry planning, record age, windows and the stream response contract."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from poller.engine import attempts
from poller.engine.attempts import Work
from poller.engine.batching import MISSING, parse_stream_response
from poller.engine.checkpoints import ShardProgress, lane_of, startable
from poller.engine.windows import Window, too_big, window_of
from poller.sources.base import Shard


@dataclass(eq=False)
class R:
    sequence: str
    arrival: float = 0.0
    settled: bool = False


def records(n: int, arrival: float = 0.0) -> list[R]:
    return [R(str(i), arrival + i) for i in range(n)]


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_moves_only_over_a_settled_prefix() -> None:
    progress = ShardProgress()
    batch = records(6)
    progress.add(batch)
    assert progress.advance() is None
    # Lanes finish out of order: 2..3 first, then 0..1; 4 is still in flight.
    progress.settle(batch[2:4])
    assert progress.advance() is None
    progress.settle(batch[0:2])
    assert progress.advance() == "3"
    assert progress.advance() is None
    progress.settle([batch[5]])
    assert progress.advance() is None  # 4 holds it
    progress.settle([batch[4]])
    assert progress.advance() == "5"
    assert len(progress) == 0


def test_lanes_keep_one_key_in_one_lane() -> None:
    keys = [f"key-{i}" for i in range(200)]
    lanes = {key: lane_of(key, 4) for key in keys}
    assert set(lanes.values()) == {0, 1, 2, 3}
    assert all(lane_of(key, 4) == lane for key, lane in lanes.items())  # stable
    assert lane_of("anything", 1) == 0


def test_children_start_after_every_parent_finished() -> None:
    parent_a, parent_b = Shard("a", closed=True), Shard("b", closed=True)
    merged = Shard("m", parents=("a", "b"))
    split_1, split_2 = Shard("s1", parents=("m",)), Shard("s2", parents=("m",))
    shards = [parent_a, parent_b, merged, split_1, split_2]
    assert startable(shards, set(), set()) == [parent_a, parent_b]
    assert startable(shards, {"a"}, {"b"}) == []
    assert startable(shards, {"a", "b"}, set()) == [merged]
    assert startable(shards, {"a", "b", "m"}, set()) == [split_1, split_2]
    # A parent past the stream's retention is no longer listed: it cannot hold its child.
    assert startable([merged], set(), set()) == [merged]


# -- retries, bisect, record age ------------------------------------------------------------


def test_function_error_without_bisect_uses_attempts_until_exhausted() -> None:
    work = Work(records(4))
    for _ in range(2):
        decision = attempts.after_error(work, bisect=False, max_retries=2)
        assert decision.next == [work] and not decision.given_up
    decision = attempts.after_error(work, bisect=False, max_retries=2)
    assert decision.given_up == work.records and work.failures == 3


def test_infinite_retries_never_give_up() -> None:
    work = Work(records(1))
    for _ in range(100):
        assert attempts.after_error(work, bisect=False, max_retries=-1).next == [work]


def test_bisect_splits_oldest_half_first_without_using_an_attempt() -> None:
    batch = records(5)
    decision = attempts.after_error(Work(batch, failures=1, invokes=3), bisect=True, max_retries=0)
    assert decision.bisected and not decision.given_up
    left, right = decision.next
    assert left.records == batch[:2] and right.records == batch[2:]
    assert (left.failures, left.invokes) == (1, 3) == (right.failures, right.invokes)
    # Down to one record, a failure uses an attempt.
    single = Work(batch[:1])
    assert attempts.after_error(single, bisect=True, max_retries=0).given_up == batch[:1]


def test_a_poison_record_is_isolated_by_bisecting() -> None:
    batch = records(16)
    poison = batch[9]
    queue = [Work(batch)]
    done, given_up = [], []
    while queue:
        work = queue.pop(0)
        work.invokes += 1
        if poison in work.records:
            decision = attempts.after_error(work, bisect=True, max_retries=0)
        else:
            decision = attempts.Decision(done=work.records)
        done += decision.done
        given_up += decision.given_up
        queue[0:0] = decision.next
    assert given_up == [poison]
    assert done == [r for r in batch if r is not poison]  # in order


def test_partial_failure_settles_the_prefix_and_uses_an_attempt() -> None:
    batch = records(6)
    work = Work(batch)
    decision = attempts.after_partial(work, 2, max_retries=1)
    assert decision.done == batch[:2]
    [retry] = decision.next
    assert retry.records == batch[2:] and retry.failures == 1
    decision = attempts.after_partial(retry, 0, max_retries=1)
    assert decision.done == [] and decision.given_up == batch[2:]


def test_expired_records_are_the_oldest_prefix() -> None:
    batch = records(5, arrival=100.0)  # arrivals 100..104
    too_old, rest = attempts.split_expired(batch, 60.0, now=162.5)
    assert too_old == batch[:3] and rest == batch[3:]
    assert attempts.split_expired(batch, None, now=1e9) == ([], batch)


def test_retry_backoff_grows_to_a_ceiling() -> None:
    delays = [attempts.retry_delay(n, 0.5, 10) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


# -- the response contract --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "failed"),
    [
        (b"null", set()),
        (b"{}", set()),
        (b'{"batchItemFailures": []}', set()),
        (b'{"batchItemFailures": [{"itemIdentifier": "2"}]}', {"2"}),
        (b'{"batchItemFailures": [{"itemIdentifier": "9"}]}', None),  # not in the batch
        (b'{"batchItemFailures": [{"itemIdentifier": ""}]}', None),
        (b'{"batchItemFailures": [{"sequenceNumber": "2"}]}', None),  # a wrong key
        (b"not json", None),
    ],
)
def test_stream_response(payload: bytes, failed: set[str] | None) -> None:
    assert parse_stream_response(payload, {"1", "2"}, with_state=False) == (failed, None)


def test_a_window_response_needs_its_state() -> None:
    ok = parse_stream_response(b'{"state": {"n": 1}}', {"1"}, with_state=True)
    assert ok == (set(), {"n": 1})
    assert parse_stream_response(b"{}", {"1"}, with_state=True)[1] is MISSING
    assert parse_stream_response(b"null", {"1"}, with_state=True)[1] is MISSING
    assert parse_stream_response(b'{"state": 3}', {"1"}, with_state=True) == (None, MISSING)


# -- windows -------------------------------------------------------------------------------------


def test_window_boundaries_come_from_arrival_times() -> None:
    assert window_of(1_700_000_123.4, 60) == (1_700_000_100, 1_700_000_160)
    assert window_of(1_700_000_160.0, 60) == (1_700_000_160, 1_700_000_220)
    window = Window(1_700_000_100, 1_700_000_160, {"sum": 3})
    assert window.holds(1_700_000_159.999, 60) and not window.holds(1_700_000_160, 60)
    assert Window.restored(window.saved()) == window
    assert Window.restored(None) is None


def test_window_event_members() -> None:
    window = Window(1_607_497_440, 1_607_497_560, {"1": 282})
    members = window.event_members(
        shard_id="shardId-6", stream_arn="arn:x", final=True, terminated_early=False
    )
    event = json.loads(b'{"Records":[]' + members + b"}")
    assert event == {
        "Records": [],
        "window": {"start": "2020-12-09T07:04:00Z", "end": "2020-12-09T07:06:00Z"},
        "state": {"1": 282},
        "shardId": "shardId-6",
        "eventSourceARN": "arn:x",
        "isFinalInvokeForWindow": True,
        "isWindowTerminatedEarly": False,
    }


def test_state_over_a_megabyte_ends_the_window() -> None:
    assert not too_big({"k": "x" * 1000})
    assert too_big({"k": "x" * (1024 * 1024)})
