"""Shard ownership in a fleet: leases in the shared state store (Redis), balanced over the
daemons that run the mapping.

A background pass, every third of a lease (and at once when a peer releases or asks for a
lease: the store nudges), renews the leases held here, keeps this daemon counted among the
mapping's daemons, and reads every lease; engine/leases.py says what follows: leases this
daemon lost (it lets their shards go), leases a peer asked for (it hands them over once their
batches in flight are settled), leases free or expired (the runner is woken to take them), or
one lease to ask the most loaded peer for. A checkpoint is written under the token its lease
was taken under, and the store refuses it once the lease expired or moved, so a daemon that
was paused or cut off can never move a checkpoint after another took the shard. A daemon that
cannot reach the store for a whole lease lets every shard go: its leases have lapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from poller.engine.leases import Plan, plan
from poller.engine.ownership import finished_shards
from poller.logs import JsonLog
from poller.sources.base import Shard
from poller.state.base import Checkpoint, Claim, StaleClaimError, StateError, StateStore
from poller.state.leases import Lease, LeaseStore, Nudges

# After a nudge, wait this long before looking, so a burst of nudges costs one pass.
NUDGE_SETTLE_S = 0.02
# A peer's lease is looked at again this long after it should have lapsed.
EXPIRY_MARGIN_S = 0.05


class LeaseOwnership:
    """The Ownership of one ordered mapping in a fleet (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        leases: LeaseStore,
        mapping_uuid: str,
        owner: str,
        *,
        duration_s: float,
        log: JsonLog,
        fields: dict[str, Any],
        held_gauge: Any = None,
    ) -> None:
        self.store = store
        self.leases = leases
        self.mapping_uuid = mapping_uuid
        self.owner = owner
        self.duration_s = duration_s
        self.duration_ms = int(duration_s * 1000)
        self.log = log
        self.fields = fields
        self.held_gauge = held_gauge
        # shard -> the token its lease was taken under (what processors claim and write with)
        self.held: dict[str, int] = {}
        # Held shards to stop processing: lost, or asked for by a peer.
        self.giving: set[str] = set()
        self._leaving = False
        self._workable: set[str] = set()
        self._renewed_at = time.monotonic()
        self._on_change: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None
        self._nudges: Nudges | None = None
        self._next_expiry_s: float | None = None

    # -- the Ownership interface ---------------------------------------------------------------
    async def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def finished(self) -> set[str]:
        return await finished_shards(self.store, self.mapping_uuid)

    async def take(self, startable: Sequence[Shard]) -> list[Shard]:
        by_id = {shard.id: shard for shard in startable}
        self._workable = set(by_id) | set(self.held)
        decided = await self._pass()
        for shard in [s for s in by_id if s in self.held and s in self.giving]:
            # Let go with no processor to stop (it had crashed): hand it on now.
            await self.release(by_id[shard], self.held[shard])
        if decided is not None and not self._leaving:
            for shard in (*decided.adopt, *decided.take):
                if shard in by_id and not await self._take(shard, decided):
                    break
        self._count()
        # Held shards without a processor (one that crashed) start again under their lease.
        return [by_id[s] for s in by_id if s in self.held and s not in self.giving]

    def revoked(self) -> set[str]:
        return set(self.giving)

    async def claim(self, shard: Shard) -> Claim:
        token = self.held.get(shard.id)
        if token is None:
            raise StaleClaimError(
                f"shard {shard.id!r} of mapping {self.mapping_uuid}: this daemon holds no lease"
            )
        checkpoint = await self.leases.read_checkpoint(self.mapping_uuid, shard.id)
        return Claim(token, checkpoint)

    async def write(self, shard: Shard, token: int, checkpoint: Checkpoint) -> None:
        try:
            await self.leases.write_checkpoint(
                self.mapping_uuid, shard.id, self.owner, token, checkpoint
            )
        except StaleClaimError:
            if self.held.get(shard.id) == token:
                self._drop(shard.id)
            raise

    async def release(self, shard: Shard, token: int) -> None:
        if self.held.get(shard.id) != token:
            return
        try:
            heir = await self.leases.release(
                self.mapping_uuid, shard.id, self.owner, token, self.duration_ms
            )
        except StateError as exc:
            self.log.warning(
                f"could not release the lease ({exc}); it lapses in {self.duration_s:g} s",
                **self.fields,
                shard=shard.id,
            )
            heir = None
        self._drop(shard.id)
        if heir:
            self.log.info("shard handed over", **self.fields, shard=shard.id, to=heir)
        elif heir == "":
            self.log.info("lease released", **self.fields, shard=shard.id)

    async def report(self, shards: list[dict[str, Any]]) -> None:
        if self._task is not None:
            await self.leases.report(self.mapping_uuid, self.owner, shards)

    async def leaving(self) -> None:
        """The runner stops: take nothing more, and leave the mapping's daemons now so peers
        count without this one and take its shards as soon as they are released."""
        self._leaving = True
        with contextlib.suppress(StateError):
            await self.leases.leave(self.mapping_uuid, self.owner, drop_report=False)

    async def close(self) -> None:
        self._leaving = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._nudges is not None:
            await self._nudges.close()
            self._nudges = None
        for shard, token in list(self.held.items()):
            await self.release(Shard(shard), token)
        with contextlib.suppress(StateError):
            table = await self.leases.leases(self.mapping_uuid)
            await self._pass_on(list(table), table)
            await self.leases.leave(self.mapping_uuid, self.owner, drop_report=True)
        self._count()

    # -- internals ---------------------------------------------------------------------------
    async def _pass_on(self, shards: Sequence[str], leases: Mapping[str, Lease]) -> None:
        """Release leases the store says are ours that no processor here holds."""
        for shard in shards:
            lease = leases.get(shard)
            if lease is None or shard in self.held or lease.owner != self.owner:
                continue
            with contextlib.suppress(StateError):
                heir = await self.leases.release(
                    self.mapping_uuid, shard, self.owner, lease.taken, self.duration_ms
                )
                if heir is not None:
                    self.log.info("lease passed on while stopping", **self.fields, shard=shard)

    def _drop(self, shard: str) -> None:
        self.held.pop(shard, None)
        self.giving.discard(shard)
        self._count()

    def _count(self) -> None:
        if self.held_gauge is not None:
            self.held_gauge.set(len(self.held))

    async def _take(self, shard: str, decided: Plan) -> bool:
        """Take one lease; False when the store failed (the next pass tries again)."""
        try:
            token = await self.leases.take(self.mapping_uuid, shard, self.owner, self.duration_ms)
        except StateError as exc:
            self.log.error(f"could not take a lease: {exc}", **self.fields, shard=shard)
            return False
        if token:
            self.held[shard] = token
            self.giving.discard(shard)
            self.log.info(
                "lease taken",
                **self.fields,
                shard=shard,
                token=token,
                target=decided.target,
                handed_over=shard in decided.adopt,
            )
        return True

    async def _pass(self) -> Plan | None:
        """Renew, read, decide; act on what needs no runner (letting go, asking a peer)."""
        sent = time.monotonic()
        # Judged against what was sent: a lease taken while the pass was on its way is not
        # in the view yet, and must not look lost.
        held = dict(self.held)
        try:
            result = await self.leases.lease_pass(
                self.mapping_uuid, self.owner, self.duration_ms, held, member=not self._leaving
            )
        except StateError as exc:
            self._unreachable(exc)
            return None
        self._renewed_at = sent
        decided = plan(self.owner, result.view, self._workable, set(held))
        changed = False
        lost = {s for s, counter in result.renewed.items() if not counter} | set(decided.lost)
        for shard in sorted(lost - self.giving):
            if self.held.get(shard) == held[shard]:
                self.giving.add(shard)
                changed = True
                lease = result.view.leases.get(shard)
                self.log.warning(
                    "lease lost (expired, or taken by another daemon): letting the shard go",
                    **self.fields,
                    shard=shard,
                    holder=lease.owner if lease is not None else None,
                )
        for shard in decided.give:
            if shard not in self.giving and self.held.get(shard) == held[shard]:
                self.giving.add(shard)
                changed = True
                self.log.info(
                    "a peer asked for the shard: handing it over",
                    **self.fields,
                    shard=shard,
                    to=result.view.leases[shard].handoff,
                    target=decided.target,
                )
        if decided.ask is not None and not self._leaving:
            shard, holder = decided.ask
            with contextlib.suppress(StateError):
                if await self.leases.ask(self.mapping_uuid, shard, holder, self.owner):
                    self.log.info(
                        "asked a peer for a shard",
                        **self.fields,
                        shard=shard,
                        holder=holder,
                        held=len(self.held),
                        target=decided.target,
                    )
        if (decided.take or decided.adopt) and not self._leaving:
            changed = True
        if self._leaving:
            # Handed to this daemon just before it began to stop: pass them on at once.
            await self._pass_on(decided.adopt, result.view.leases)
        if changed:
            self._on_change()
        self._next_expiry_s = self._peer_expiry(result.view.now_ms, result.view.leases)
        return decided

    def _peer_expiry(self, now_ms: int, leases: Mapping[str, Lease]) -> float | None:
        """Seconds until the first peer lease on a shard we could take lapses."""
        ahead = [
            lease.expires_ms - now_ms
            for shard, lease in leases.items()
            if shard in self._workable and lease.owner not in (None, self.owner)
            if lease.expires_ms > now_ms
        ]
        return min(ahead) / 1000 if ahead else None

    def _unreachable(self, exc: StateError) -> None:
        since = time.monotonic() - self._renewed_at
        self.log.error(
            f"cannot renew shard leases: {exc}",
            **self.fields,
            held=len(self.held),
            since_s=round(since, 1),
        )
        if since >= self.duration_s and self.held.keys() - self.giving:
            self.log.error(
                "shard leases lapsed while the state store was unreachable: letting every shard go",
                **self.fields,
            )
            self.giving |= set(self.held)
            self._on_change()

    async def _loop(self) -> None:
        every = self.duration_s / 3
        while True:
            self._next_expiry_s = None
            try:
                reached = await self._pass() is not None
            except Exception as exc:  # renewals must go on, whatever broke this pass
                self.log.error(f"lease pass failed: {exc!r}", **self.fields)
                reached = False
            delay = every if reached else min(every, 1.0)
            if self._next_expiry_s is not None:
                delay = min(delay, self._next_expiry_s + EXPIRY_MARGIN_S)
            await self._wait(delay)

    async def _wait(self, seconds: float) -> None:
        """Sleep, or less when a peer nudges."""
        deadline = time.monotonic() + seconds
        if self._nudges is None:
            try:
                self._nudges = await self.leases.subscribe(self.mapping_uuid)
            except StateError:
                self._nudges = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if self._nudges is None:
            await asyncio.sleep(remaining)
            return
        try:
            if await self._nudges.wait(remaining):
                await asyncio.sleep(NUDGE_SETTLE_S)
        except StateError:
            self._nudges = None
            await asyncio.sleep(max(deadline - time.monotonic(), 0))


async def keep_membership(
    leases: LeaseStore, owner: str, duration_s: float, info: dict[str, Any], log: JsonLog
) -> None:
    """Heartbeat this daemon as a member of the fleet (for `poller fleet`) until cancelled;
    then leave it."""
    try:
        while True:
            try:
                await leases.heartbeat(owner, int(duration_s * 1000), info)
            except StateError as exc:
                log.warning(f"fleet heartbeat failed: {exc}")
            await asyncio.sleep(duration_s / 3)
    finally:
        with contextlib.suppress(StateError):
            await leases.leave_fleet(owner)
