"""What a state store that keeps shard leases offers (the Redis store; SQLite has none: one
node owns every shard), and the plain values it hands back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from poller.state.base import Checkpoint


@dataclass(frozen=True, slots=True)
class Lease:
    """One shard's lease as the store has it. ``counter`` is bumped by every take and renew;
    ``taken`` is its value at the take, the fencing token the holder renews and checkpoints
    under; ``expires_ms`` is on the store's clock."""

    shard: str
    owner: str | None  # None: free (released, or never taken)
    counter: int = 0
    taken: int = 0
    expires_ms: int = 0
    handoff: str | None = None  # the peer that asked for it

    def held_at(self, now_ms: int) -> bool:
        return self.owner is not None and self.expires_ms > now_ms


@dataclass(frozen=True, slots=True)
class View:
    """One read of a mapping's leases and of the daemons running it, at the store's ``now_ms``."""

    now_ms: int
    members: frozenset[str]
    leases: Mapping[str, Lease]


@dataclass(frozen=True, slots=True)
class Pass:
    """What a lease pass found: the view, and for each lease renewed its new counter (0: the
    lease was not ours any more, or had expired)."""

    view: View
    renewed: dict[str, int]


@dataclass(frozen=True, slots=True)
class Member:
    """A live daemon of the fleet: its id, when its heartbeat lapses (store clock, ms), and
    what it said about itself (host, pid, start time, HTTP address)."""

    owner: str
    expires_ms: int
    info: dict[str, Any]


class Nudges(Protocol):
    async def wait(self, timeout_s: float) -> bool:
        """True if a peer changed a lease within timeout_s. Raises StateError when the
        subscription broke (subscribe again)."""

    async def close(self) -> None: ...


class LeaseStore(Protocol):
    async def lease_pass(
        self, uuid: str, owner: str, duration_ms: int, held: dict[str, int], *, member: bool
    ) -> Pass:
        """Renew ``held`` (shard -> token), heartbeat as one of the mapping's daemons
        (unless ``member`` is False: leaving), and read every lease and live member."""

    async def take(self, uuid: str, shard: str, owner: str, duration_ms: int) -> int:
        """Take a free, expired or own lease: its token (the counter, bumped); 0 if a live
        peer holds it."""

    async def ask(self, uuid: str, shard: str, holder: str, asker: str) -> bool:
        """Ask the holder to hand the shard over; False if the lease changed meanwhile."""

    async def release(
        self, uuid: str, shard: str, owner: str, token: int, duration_ms: int
    ) -> str | None:
        """Let the lease go: the peer it went to (one that asked for it), '' if it is free,
        None if it was not ours any more."""

    async def write_checkpoint(
        self, uuid: str, shard: str, owner: str, token: int, checkpoint: Checkpoint
    ) -> None:
        """Write the checkpoint if the lease is ours, taken under ``token`` and not expired;
        else raise StaleClaimError saying why."""

    async def read_checkpoint(self, uuid: str, shard: str) -> Checkpoint: ...

    async def leave(self, uuid: str, owner: str, *, drop_report: bool) -> None:
        """No longer counted among the mapping's daemons: peers take over its share."""

    async def report(self, uuid: str, owner: str, shards: list[dict[str, Any]]) -> None:
        """The shards this daemon processes, with their state and iterator age."""

    async def shard_reports(self, uuid: str) -> list[dict[str, Any]]:
        """Each shard's report from the daemon holding its lease."""

    async def leases(self, uuid: str) -> dict[str, Lease]: ...

    async def reports(self, uuid: str) -> dict[str, list[dict[str, Any]]]:
        """daemon -> the shards it reported, for daemons still running the mapping."""

    async def heartbeat(self, owner: str, duration_ms: int, info: dict[str, Any]) -> None:
        """This daemon is alive (for `poller fleet`)."""

    async def leave_fleet(self, owner: str) -> None: ...

    async def members(self) -> tuple[int, list[Member]]:
        """The store's time (ms) and the live daemons of the fleet."""

    async def subscribe(self, uuid: str) -> Nudges:
        """Be told at once when a peer releases or asks for a lease of the mapping."""
