"""Lease balancing decisions (engine/leases.py): given members and leases, what a daemon
takes, asks for, hands over or has lost; and a small fleet simulated on those decisions."""

from __future__ import annotations

from collections import Counter

from poller.engine.leases import plan, target
from poller.state.leases import Lease, View

NOW = 1_000_000
SHARDS = [f"s{i}" for i in range(8)]


def _live(shard: str, owner: str, handoff: str | None = None) -> Lease:
    return Lease(shard, owner, counter=3, taken=2, expires_ms=NOW + 5000, handoff=handoff)


def _view(members: set[str], *leases: Lease) -> View:
    return View(NOW, frozenset(members), {lease.shard: lease for lease in leases})


def test_target_is_the_ceiling_of_shards_over_daemons() -> None:
    assert [target(8, n) for n in (1, 2, 3, 4, 8, 9)] == [8, 4, 3, 2, 1, 1]
    assert target(0, 3) == 0
    assert target(5, 0) == 5  # counting itself, a daemon is never alone in nothing


def test_an_empty_table_is_split_and_each_daemon_takes_its_share() -> None:
    members = {"a", "b", "c"}
    decided = plan("a", _view(members), SHARDS, held=())
    assert decided.target == 3 and len(decided.take) == 3 and decided.ask is None
    # Daemons starting together reach for different shards first.
    others = [set(plan(me, _view(members), SHARDS, held=()).take) for me in ("b", "c")]
    assert set(decided.take) != others[0] or set(decided.take) != others[1]


def test_a_daemon_not_yet_listed_counts_itself() -> None:
    decided = plan("new", _view({"a"}), SHARDS, held=())
    assert decided.target == 4 and len(decided.take) == 4


def test_free_and_expired_leases_come_before_asking_a_peer() -> None:
    expired = Lease("s0", "dead", counter=9, taken=9, expires_ms=NOW - 1)
    released = Lease("s1", None, counter=4, taken=3)
    leases = [expired, released] + [_live(s, "a") for s in SHARDS[2:]]
    decided = plan("b", _view({"a", "b"}, *leases), SHARDS, held=())
    assert set(decided.take) == {"s0", "s1"}
    assert decided.ask is None  # free ones first; at most one move in flight at a time


def test_at_target_nothing_is_taken_or_asked_for() -> None:
    leases = [_live(s, "a") for s in SHARDS[:4]] + [_live(s, "b") for s in SHARDS[4:7]]
    decided = plan("b", _view({"a", "b", "c"}, *leases), SHARDS, held=SHARDS[4:7])
    assert decided.target == 3
    assert (decided.take, decided.ask, decided.give, decided.lost) == ((), None, (), ())


def test_asks_one_lease_of_the_most_loaded_peer_above_target() -> None:
    leases = [_live(s, "a") for s in SHARDS[:5]] + [_live(s, "b") for s in SHARDS[5:]]
    decided = plan("c", _view({"a", "b", "c"}, *leases), SHARDS, held=())
    assert decided.take == ()
    assert decided.ask is not None
    shard, holder = decided.ask
    assert holder == "a" and shard in SHARDS[:5]
    assert decided.load == {"a": 5, "b": 3}


def test_no_peer_is_asked_when_none_is_above_target() -> None:
    # 3, 3, 2 over three daemons: the one with 2 is below target (3) but asking would only
    # move the imbalance around.
    leases = [_live(s, "a") for s in SHARDS[:3]] + [_live(s, "b") for s in SHARDS[3:6]]
    leases += [_live(s, "c") for s in SHARDS[6:]]
    decided = plan("c", _view({"a", "b", "c"}, *leases), SHARDS, held=SHARDS[6:])
    assert decided.ask is None and decided.take == ()


def test_one_request_at_a_time() -> None:
    leases = [_live("s0", "a", handoff="c")] + [_live(s, "a") for s in SHARDS[1:]]
    decided = plan("c", _view({"a", "c"}, *leases), SHARDS, held=())
    assert decided.ask is None
    # A lease already asked for is not asked for again by someone else.
    decided = plan("d", _view({"a", "c", "d"}, *leases), SHARDS, held=())
    assert decided.ask is not None and decided.ask[0] != "s0"


def test_a_lease_asked_for_by_a_live_peer_is_given_and_by_a_gone_one_kept() -> None:
    leases = [_live("s0", "a", handoff="b"), _live("s1", "a", handoff="gone")]
    decided = plan("a", _view({"a", "b"}, *leases), ["s0", "s1"], held=["s0", "s1"])
    assert decided.give == ("s0",)


def test_leases_that_expired_or_moved_are_lost() -> None:
    leases = [
        _live("s0", "a"),
        _live("s1", "b"),
        Lease("s2", "a", counter=5, taken=5, expires_ms=NOW),
        Lease("s3", None, counter=6, taken=5),
    ]
    decided = plan("a", _view({"a", "b"}, *leases), SHARDS[:4], held=SHARDS[:4])
    assert decided.lost == ("s1", "s2", "s3")
    # A lost shard is not taken back while it is still held here (its processor stops first).
    assert not set(decided.take) & {"s2", "s3"}


def test_a_lease_handed_over_is_adopted() -> None:
    leases = [_live("s0", "b"), _live("s1", "a")]
    decided = plan("b", _view({"a", "b"}, *leases), ["s0", "s1"], held=())
    assert decided.adopt == ("s0",)
    assert decided.take == ()


def test_only_shards_that_may_start_are_taken() -> None:
    # A child whose parent is unfinished is not in `shards`: it is neither taken nor counted.
    decided = plan("a", _view({"a", "b"}), ["parent"], held=())
    assert decided.take == ("parent",) and decided.target == 1


# -- a fleet simulated on the decisions ----------------------------------------------------


class _Fleet:
    """Leases in a dict; each step every daemon plans on the table and acts at once, and a
    daemon asked for a lease hands it over on its next step (as the store's release does)."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards
        self.leases: dict[str, Lease] = {}
        self.members: set[str] = set()
        self.moves = 0

    def held(self, me: str) -> list[str]:
        return [s for s, lease in self.leases.items() if lease.owner == me]

    def step(self) -> bool:
        acted = False
        for me in sorted(self.members):
            view = View(NOW, frozenset(self.members), dict(self.leases))
            decided = plan(me, view, self.shards, self.held(me))
            for shard in decided.take:
                self.leases[shard] = _live(shard, me)
                acted = True
            for shard in decided.give:
                heir = self.leases[shard].handoff
                assert heir is not None
                self.leases[shard] = _live(shard, heir)
                self.moves += 1
                acted = True
            if decided.ask is not None:
                shard, holder = decided.ask
                self.leases[shard] = _live(shard, holder, handoff=me)
                acted = True
        return acted

    def settle(self, steps: int = 50) -> int:
        for used in range(steps):
            if not self.step():
                return used
        raise AssertionError(f"still moving after {steps} steps: {self.load()}")

    def kill(self, me: str) -> None:
        self.members.discard(me)
        for shard, lease in list(self.leases.items()):
            if lease.owner == me:
                self.leases[shard] = Lease(shard, me, 9, 9, expires_ms=NOW - 1)

    def load(self) -> Counter[str]:
        return Counter(
            lease.owner
            for lease in self.leases.values()
            if lease.owner is not None and lease.held_at(NOW)
        )


def test_a_fleet_ramps_up_one_daemon_at_a_time_without_thrash() -> None:
    fleet = _Fleet(SHARDS)
    fleet.members = {"a"}
    fleet.settle()
    assert fleet.load() == {"a": 8}
    fleet.members.add("b")
    fleet.settle()
    assert sorted(fleet.load().values()) == [4, 4]
    assert fleet.moves == 4  # exactly the shards that had to move
    fleet.members.add("c")
    fleet.settle()
    assert sorted(fleet.load().values()) == [2, 3, 3]
    assert fleet.moves == 4 + 2
    assert not fleet.step()  # balanced: nobody acts


def test_after_a_daemon_dies_the_survivors_hold_at_most_their_share() -> None:
    fleet = _Fleet(SHARDS)
    fleet.members = {"a", "b", "c"}
    fleet.settle()
    assert sorted(fleet.load().values()) == [2, 3, 3]
    fleet.kill("b")
    fleet.settle()
    load = fleet.load()
    assert set(load) == {"a", "c"} and sum(load.values()) == 8
    assert max(load.values()) <= target(8, 2)


def test_every_shard_is_held_once_whatever_the_order_daemons_join() -> None:
    for joining in (["a", "b", "c", "d"], ["d", "c", "b", "a"]):
        fleet = _Fleet([f"k{i}" for i in range(11)])
        for me in joining:
            fleet.members.add(me)
            fleet.settle()
        load = fleet.load()
        assert sum(load.values()) == 11 and max(load.values()) <= target(11, 4)
        assert len(fleet.leases) == 11
