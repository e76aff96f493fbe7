"""The state store interface: what must outlive a process.

The SQLite store (embedded default, one node) and the Redis store (a fleet) both satisfy it;
the daemon and the CLI only ever talk to this interface. Mappings are stored as the plain dicts
of ``Mapping.to_dict()``; the store does not interpret them beyond the ``uuid`` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from poller.state.leases import LeaseStore


class StateError(Exception):
    """The store cannot be reached or used; the message says which and how to fix it."""


class StaleClaimError(StateError):
    """A checkpoint write under a claim that is no longer the shard's latest: another owner
    (a newer claim) has the shard now, so this one must stop writing and let it go."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a shard's processing stands: the last settled sequence number (None: nothing
    yet), and the state of its open tumbling window (None: no window open)."""

    position: str | None = None
    window: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A shard taken for processing: checkpoints are written under ``token``, and refused
    once a later claim took the shard (the fencing token of a lease)."""

    token: int
    checkpoint: Checkpoint


class StateStore(Protocol):
    url: str
    # Shard leases for a fleet (the Redis store); None: one node owns every shard.
    leases: LeaseStore | None

    async def open(self) -> None:
        """Connect and create what is missing (tables, keys). Raises StateError."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers (for /readyz)."""

    # -- mapping registry ------------------------------------------------------------------
    async def revision(self) -> int:
        """A counter bumped by every registry change; cheap, polled by running daemons."""

    async def list_mappings(self) -> list[dict[str, Any]]: ...

    async def get_mapping(self, uuid: str) -> dict[str, Any] | None: ...

    async def put_mapping(self, mapping: dict[str, Any]) -> None:
        """Insert or replace by mapping["uuid"]; bumps the revision."""

    async def delete_mapping(self, uuid: str) -> bool:
        """True if it existed; bumps the revision."""

    # -- runtime status (not configuration: writing it does not bump the revision) ---------
    async def set_status(self, uuid: str, status: dict[str, Any]) -> None:
        """E.g. {"LastProcessingResult": "OK"}; merged into what `mappings get` shows."""

    async def get_status(self, uuid: str) -> dict[str, Any]: ...

    # -- stream checkpoints (with their tumbling-window state) ------------------------------
    async def claim_shard(self, mapping_uuid: str, shard: str, owner: str) -> Claim:
        """Take the shard: a new token (every earlier one goes stale) and its checkpoint."""

    async def set_checkpoint(
        self, mapping_uuid: str, shard: str, token: int, checkpoint: Checkpoint
    ) -> None:
        """Write the checkpoint (position and window state together, atomically). Raises
        StaleClaimError when ``token`` is not the shard's latest claim."""

    async def list_checkpoints(self, mapping_uuid: str) -> dict[str, Checkpoint]: ...


def open_store(url: str, *, key_prefix: str = "poller:") -> StateStore:
    """The store for a ``[state] url``: sqlite:///PATH or redis://..."""
    if url.startswith("sqlite://"):
        from poller.state.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from poller.state.redis import RedisStore

        return RedisStore(url, key_prefix=key_prefix)
    raise StateError(
        f"unsupported [state] url {url!r}: use sqlite:///PATH (embedded, one node) or "
        "redis://HOST:PORT/DB (shared by several daemons)"
    )
