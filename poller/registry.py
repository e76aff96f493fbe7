"""The mapping registry: validated create/update/delete on the state store.

The CLI and the daemon both go through here, so a mapping is checked the same way whether it
was typed on the command line or declared in the config file.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from typing import Any

from poller.mappings import (
    Mapping,
    MappingError,
    check_runnable,
    create_mapping,
    duplicate_error,
    update_mapping,
)
from poller.mappings.parameters import FilterValidator
from poller.state.base import StateStore


class Registry:
    def __init__(self, store: StateStore, validate_filters: FilterValidator | None = None) -> None:
        """``validate_filters`` checks a FilterCriteria deeply (the engine's compiler); a
        ValueError it raises becomes AWS's "Invalid filter pattern definition."."""
        self.store = store
        self.validate_filters = validate_filters

    async def list(
        self, *, function_name: str | None = None, event_source_arn: str | None = None
    ) -> list[Mapping]:
        mappings = [Mapping.from_dict(d) for d in await self.store.list_mappings()]
        if function_name:
            mappings = [m for m in mappings if m.function_name == function_name]
        if event_source_arn:
            mappings = [
                m
                for m in mappings
                if event_source_arn in (m.event_source_arn, m.source.display_uri)
            ]
        mappings.sort(key=lambda m: (m.last_modified, m.uuid))
        return [await self._with_status(m) for m in mappings]

    async def get(self, uuid: str) -> Mapping:
        data = await self.store.get_mapping(uuid)
        if data is None:
            raise MappingError(
                "The resource you requested does not exist.",
                code="ResourceNotFoundException",
                detail=f"No event source mapping with UUID {uuid}; see `poller mappings list`.",
            )
        return await self._with_status(Mapping.from_dict(data))

    async def get_detail(self, uuid: str) -> tuple[Mapping, list[dict[str, Any]], str | None]:
        """The mapping; for an ordered one each shard's durable checkpoint with the iterator
        age and state its runner last reported (AWS's names, for people); and the error that
        explains its LastProcessingResult when that is a PROBLEM."""
        mapping = await self.get(uuid)
        checkpoints = await self.store.list_checkpoints(uuid)
        status = await self.store.get_status(uuid)
        leases = self.store.leases
        if leases is not None:
            # A fleet: each shard as the daemon holding its lease reports it.
            reports = await leases.shard_reports(uuid)
        else:
            reports = status.get("Shards") or []
        reported = {s.get("shardId"): s for s in reports}
        shards = []
        for shard in sorted(set(checkpoints) | {k for k in reported if isinstance(k, str)}):
            report = reported.get(shard, {})
            checkpoint = checkpoints.get(shard)
            shards.append(
                {
                    "ShardId": shard,
                    "State": report.get("state", "not running"),
                    "Checkpoint": checkpoint.position if checkpoint is not None else None,
                    "IteratorAgeSeconds": report.get("iteratorAgeSeconds"),
                }
            )
        last_error = status.get("LastError")
        if not mapping.last_processing_result.startswith("PROBLEM"):
            last_error = None  # what explained a problem that is over
        return mapping, shards, last_error if isinstance(last_error, str) else None

    async def _with_status(self, mapping: Mapping) -> Mapping:
        status = await self.store.get_status(mapping.uuid)
        result = status.get("LastProcessingResult")
        if result and result != mapping.last_processing_result:
            return mapping.with_last_processing_result(result)
        return mapping

    async def _check_duplicate(self, mapping: Mapping) -> None:
        for data in await self.store.list_mappings():
            existing = Mapping.from_dict(data)
            if existing.uuid == mapping.uuid:
                continue
            error = duplicate_error(existing, mapping)
            if error is not None:
                raise error

    async def create(self, params: dict[str, Any]) -> Mapping:
        mapping = create_mapping(
            params,
            uuid=str(uuidlib.uuid4()),
            now=time.time(),
            validate_filters=self.validate_filters,
        )
        check_runnable(mapping)
        await self._check_duplicate(mapping)
        await self.store.put_mapping(mapping.to_dict())
        return mapping

    async def update(self, uuid: str, changes: dict[str, Any]) -> Mapping:
        current = await self.get(uuid)
        mapping = update_mapping(
            current, changes, now=time.time(), validate_filters=self.validate_filters
        )
        await self._check_duplicate(mapping)
        await self.store.put_mapping(mapping.to_dict())
        return mapping

    async def set_enabled(self, uuid: str, enabled: bool) -> Mapping:
        return await self.update(uuid, {"enabled": enabled})

    async def delete(self, uuid: str) -> Mapping:
        mapping = await self.get(uuid)
        await self.store.delete_mapping(uuid)
        return mapping

    async def upsert_declared(self, entries: list[dict[str, Any]], source: str) -> list[Mapping]:
        """Apply the config file's [[mappings]]: matched to stored ones by their `name`.

        All or nothing: every entry is checked, against the others and against what is stored,
        before anything is written, so a bad entry leaves the store as it was.
        """
        stored = await self.list()
        existing = {m.name: m for m in stored if m.name}
        now = time.time()
        planned: list[tuple[str, Mapping, Mapping | None]] = []  # (where, wanted, replaced)
        result: list[Mapping] = []
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            name = entry.get("name")
            where = f"{source}: mappings[{index}]"
            if not isinstance(name, str) or not name:
                raise MappingError(
                    f"{where}: every [[mappings]] entry needs a stable `name`, so restarts "
                    "update it instead of creating a duplicate"
                )
            if name in seen:
                raise MappingError(f"{where}: a second [[mappings]] entry named {name!r}")
            seen.add(name)
            try:
                current = existing.get(name)
                if current is None or entry.get("event_source_arn") not in (
                    None,
                    current.event_source_arn,
                ):
                    # New, or a changed source (create-only): a new mapping in its place.
                    wanted = create_mapping(
                        entry,
                        uuid=str(uuidlib.uuid4()),
                        now=now,
                        validate_filters=self.validate_filters,
                    )
                    check_runnable(wanted)
                    planned.append((f"{where} ({name})", wanted, current))
                    result.append(wanted)
                    continue
                changes = {k: v for k, v in entry.items() if k != "event_source_arn"}
                unchanged = update_mapping(
                    current,
                    changes,
                    now=current.last_modified,
                    validate_filters=self.validate_filters,
                )
                if unchanged.to_dict() == current.to_dict():
                    result.append(current)
                    continue
                wanted = update_mapping(
                    current, changes, now=now, validate_filters=self.validate_filters
                )
                planned.append((f"{where} ({name})", wanted, current))
                result.append(wanted)
            except MappingError as exc:
                raise MappingError(f"{where} ({name}): {exc}", code=exc.code) from None
        replaced = {old.uuid for _, _, old in planned if old is not None}
        final = [m for m in stored if m.uuid not in replaced] + [w for _, w, _ in planned]
        for where, wanted, _ in planned:
            for other in final:
                error = None if other is wanted else duplicate_error(other, wanted)
                if error is not None:
                    raise MappingError(f"{where}: {error}", code=error.code) from None
        for _, wanted, old in planned:
            if old is not None and old.uuid != wanted.uuid:
                await self.store.delete_mapping(old.uuid)
            await self.store.put_mapping(wanted.to_dict())
        return result
