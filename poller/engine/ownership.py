"""Which shards of an ordered mapping this daemon processes, and where their checkpoints go.

The stream runner asks its ``Ownership`` which of the shards that may start (parents finished)
to start, which running ones it must give up, and claims, checkpoints and releases each shard
through it. ``StoreOwnership`` is the single-node one: every shard is ours, checkpoints are in
the state store under a claim token. A fleet keeps leases in the shared store
(engine/lease_ownership.py: a lease that expired or moved fences its old holder); a source with
owners of its own (Kafka's consumer groups, with committed offsets as checkpoints) brings its
own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from poller.engine.checkpoints import SHARD_END
from poller.sources.base import Shard
from poller.state.base import Checkpoint, Claim, StaleClaimError, StateStore


def daemon_id() -> str:
    """Who claims shards and holds leases: unique per daemon process (host, pid, a random
    part)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


# This process's id: every mapping's runner and the fleet membership use it.
DAEMON_ID: Final = daemon_id()


async def finished_shards(store: StateStore, mapping_uuid: str) -> set[str]:
    """Shards read to their end and checkpointed there."""
    checkpoints = await store.list_checkpoints(mapping_uuid)
    return {shard for shard, c in checkpoints.items() if c.position == SHARD_END}


class Ownership(Protocol):
    async def start(self, on_change: Callable[[], None]) -> None:
        """Begin; call ``on_change`` when the shards owned change (a rebalance, a lease lost)
        so the runner acts at once rather than at its next pass."""

    async def finished(self) -> set[str]:
        """Shards read to their end and checkpointed there (their children may start)."""

    async def take(self, startable: Sequence[Shard]) -> list[Shard]:
        """Of the shards that may start, those this daemon should process now."""

    def revoked(self) -> set[str]:
        """Shards being processed here that must be given up now."""

    async def claim(self, shard: Shard) -> Claim:
        """Take the shard for processing: its checkpoint and the token to write under."""

    async def write(self, shard: Shard, token: int, checkpoint: Checkpoint) -> None:
        """Store the checkpoint; raises StaleClaimError once the claim is stale."""

    async def release(self, shard: Shard, token: int) -> None:
        """The shard was let go on purpose (its last checkpoint is written): hand it over."""

    async def report(self, shards: list[dict[str, Any]]) -> None:
        """The shards processed here, with their state and iterator age (for people)."""

    async def leaving(self) -> None:
        """The runner is stopping: take nothing more (its shards are released as they stop)."""

    async def close(self) -> None: ...


class StoreOwnership:
    """One daemon owns every shard of the mapping; checkpoints live in the state store. A shard
    whose claim went stale (claimed again elsewhere) is not taken back."""

    def __init__(self, store: StateStore, mapping_uuid: str, owner: str) -> None:
        self.store = store
        self.mapping_uuid = mapping_uuid
        self.owner = owner
        self.lost: set[str] = set()

    async def start(self, on_change: Callable[[], None]) -> None:
        """Nothing changes hands on one node."""

    async def finished(self) -> set[str]:
        return await finished_shards(self.store, self.mapping_uuid)

    async def take(self, startable: Sequence[Shard]) -> list[Shard]:
        return [shard for shard in startable if shard.id not in self.lost]

    def revoked(self) -> set[str]:
        return set()

    async def claim(self, shard: Shard) -> Claim:
        return await self.store.claim_shard(self.mapping_uuid, shard.id, self.owner)

    async def write(self, shard: Shard, token: int, checkpoint: Checkpoint) -> None:
        try:
            await self.store.set_checkpoint(self.mapping_uuid, shard.id, token, checkpoint)
        except StaleClaimError:
            self.lost.add(shard.id)
            raise

    async def release(self, shard: Shard, token: int) -> None:
        """Nobody else would take it."""

    async def report(self, shards: list[dict[str, Any]]) -> None:
        await self.store.set_status(self.mapping_uuid, {"Shards": shards})

    async def leaving(self) -> None:
        """Nobody to hand over to."""

    async def close(self) -> None:
        """Nothing held."""
