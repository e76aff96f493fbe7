"""Lease balancing for a fleet (pure, no I/O): given one read of a mapping's lease table, which
leases this daemon takes, which it asks a peer for, which it hands over and which it lost.

Each daemon aims for ceil(shards / live daemons). It takes free and expired leases first (in
an order of its own, so daemons starting together rarely reach for the same shard), and only
when none is left asks the most loaded peer for one lease, and only when that peer is above
the target and no request of its own is still pending: a new daemon ramps up one shard at a
time and two daemons never trade a shard back and forth. Nobody gives a lease up on its own;
a peer that is asked hands the shard over once its batches in flight are settled.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from poller.state.leases import View


@dataclass(frozen=True, slots=True)
class Plan:
    target: int
    take: tuple[str, ...] = ()  # free or expired: take them now
    adopt: tuple[str, ...] = ()  # ours in the store and not held here: handed over to us
    ask: tuple[str, str] | None = None  # (shard, owner): ask that peer to hand it over
    give: tuple[str, ...] = ()  # held here, asked for by a live peer: hand over
    lost: tuple[str, ...] = ()  # held here, the store says otherwise (expired or moved)
    load: dict[str, int] = field(default_factory=dict)  # live leases per daemon


def target(shards: int, members: int) -> int:
    """How many leases each daemon aims for."""
    return math.ceil(shards / max(members, 1))


def _order(me: str, shard: str) -> int:
    # crc32, not hash(): stable across processes, different for each daemon.
    return zlib.crc32(f"{me}/{shard}".encode())


def plan(me: str, view: View, shards: Collection[str], held: Collection[str]) -> Plan:
    """What to do now. ``shards`` are those that may be processed (not finished, parents
    finished), ``held`` the leases this daemon holds and processes."""
    now = view.now_ms
    members = view.members | {me}
    current = {s: lease for s, lease in view.leases.items() if lease.held_at(now)}
    live = {s: lease for s, lease in current.items() if s in shards}
    goal = target(len(shards), len(members))
    load = Counter(
        lease.owner for lease in live.values() if lease.owner is not None and lease.owner in members
    )

    lost = tuple(sorted(s for s in held if s not in current or current[s].owner != me))
    give = tuple(
        sorted(
            s
            for s in held
            if s not in lost
            and current[s].handoff not in (None, me)
            and current[s].handoff in members
        )
    )
    adopt = tuple(sorted(s for s, lease in live.items() if lease.owner == me and s not in held))
    keeping = len(held) - len(lost) - len(give) + len(adopt)
    want = goal - keeping
    if want <= 0:
        return Plan(goal, adopt=adopt, give=give, lost=lost, load=dict(load))

    free = sorted(
        (s for s in shards if s not in live and s not in held), key=lambda s: (_order(me, s), s)
    )
    take = tuple(free[:want])
    want -= len(take)
    ask = None
    pending = any(lease.handoff == me and lease.owner != me for lease in live.values())
    if want > 0 and not take and not pending:
        peers = [(count, owner) for owner, count in load.items() if owner != me and count > goal]
        if peers:
            _, victim = max(peers)  # the most loaded; ties go to the larger id, on every daemon
            theirs = sorted(
                (s for s, lease in live.items() if lease.owner == victim and lease.handoff is None),
                key=lambda s: (_order(me, s), s),
            )
            if theirs:
                ask = (theirs[0], victim)
    return Plan(goal, take=take, adopt=adopt, ask=ask, give=give, lost=lost, load=dict(load))
