"""The StateStore contract for stream checkpoints, run against every store (SQLite, Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from poller.state.base import Checkpoint, StaleClaimError, StateStore

BIG = "49590338271490256608559692538361571095921575989136588898"  # a Kinesis sequence number


async def check_checkpoints(store: StateStore, mapping: dict[str, Any]) -> None:
    uuid = mapping["uuid"]
    await store.put_mapping(mapping)
    first = await store.claim_shard(uuid, "s1", "daemon-a")
    assert first.checkpoint == Checkpoint()
    await store.set_checkpoint(uuid, "s1", first.token, Checkpoint(BIG))
    await store.set_checkpoint(uuid, "s1", first.token, Checkpoint("2", {"total": 3}))
    other = await store.claim_shard(uuid, "s2", "daemon-a")
    await store.set_checkpoint(uuid, "s2", other.token, Checkpoint("7"))
    assert await store.list_checkpoints(uuid) == {
        "s1": Checkpoint("2", {"total": 3}),
        "s2": Checkpoint("7"),
    }

    # A later claim fences the earlier one: its holder can no longer move the checkpoint.
    second = await store.claim_shard(uuid, "s1", "daemon-b")
    assert second.token > first.token
    assert second.checkpoint == Checkpoint("2", {"total": 3})
    with pytest.raises(StaleClaimError):
        await store.set_checkpoint(uuid, "s1", first.token, Checkpoint("99"))
    await store.set_checkpoint(uuid, "s1", second.token, Checkpoint("3"))
    assert (await store.list_checkpoints(uuid))["s1"] == Checkpoint("3")
    # A write for a shard nobody claimed is refused too.
    with pytest.raises(StaleClaimError):
        await store.set_checkpoint(uuid, "never", 1, Checkpoint("1"))

    # Deleting the mapping takes its checkpoints with it.
    await store.delete_mapping(uuid)
    assert await store.list_checkpoints(uuid) == {}
    fresh = await store.claim_shard(uuid, "s1", "daemon-a")
    assert fresh.checkpoint == Checkpoint()
