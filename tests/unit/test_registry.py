"""The registry service over a real SQLite store: validation, duplicates, declared mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from poller.engine.filter_compiler import compile_filter_criteria
from poller.mappings import MappingError
from poller.registry import Registry
from poller.state.sqlite import SqliteStore


@pytest.fixture
async def registry(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SqliteStore(f"sqlite:///{tmp_path}/state.db")
    await store.open()
    yield Registry(store, validate_filters=compile_filter_criteria)
    await store.close()


async def test_create_get_update_delete(registry: Registry) -> None:
    created = await registry.create({"function_name": "f", "event_source_arn": "local://q"})
    assert (await registry.get(created.uuid)).batch_size == 10
    updated = await registry.update(created.uuid, {"batch_size": 5})
    assert updated.batch_size == 5 and updated.uuid == created.uuid
    disabled = await registry.set_enabled(created.uuid, False)
    assert disabled.state == "Disabled"
    await registry.delete(created.uuid)
    with pytest.raises(MappingError) as info:
        await registry.get(created.uuid)
    assert info.value.code == "ResourceNotFoundException"


async def test_duplicate_source_and_function_is_a_conflict(registry: Registry) -> None:
    first = await registry.create({"function_name": "f", "event_source_arn": "local://q"})
    with pytest.raises(MappingError) as info:
        await registry.create({"function_name": "f", "event_source_arn": "local://q"})
    assert info.value.code == "ResourceConflictException"
    assert first.uuid in str(info.value)
    await registry.create({"function_name": "g", "event_source_arn": "local://q"})


async def test_invalid_filter_pattern_is_rejected(registry: Registry) -> None:
    with pytest.raises(MappingError) as info:
        await registry.create(
            {
                "function_name": "f",
                "event_source_arn": "local://q",
                "filter_criteria": {
                    "Filters": [{"Pattern": '{"body": {"a": [{"wildcard": "x*"}]}}'}]
                },
            }
        )
    assert info.value.message == "Invalid filter pattern definition."


async def test_status_is_merged_without_touching_the_spec(registry: Registry) -> None:
    created = await registry.create({"function_name": "f", "event_source_arn": "local://q"})
    revision = await registry.store.revision()
    await registry.store.set_status(created.uuid, {"LastProcessingResult": "OK"})
    assert await registry.store.revision() == revision
    assert (await registry.get(created.uuid)).last_processing_result == "OK"


async def test_upsert_declared_matches_by_name(registry: Registry) -> None:
    entry = {"name": "orders", "function_name": "f", "event_source_arn": "local://orders"}
    [first] = await registry.upsert_declared([entry], "c.toml")
    [again] = await registry.upsert_declared([entry], "c.toml")
    assert again.uuid == first.uuid and again.last_modified == first.last_modified
    [changed] = await registry.upsert_declared([{**entry, "batch_size": 3}], "c.toml")
    assert changed.uuid == first.uuid and changed.batch_size == 3
    [moved] = await registry.upsert_declared(
        [{**entry, "event_source_arn": "local://elsewhere"}], "c.toml"
    )
    assert moved.uuid != first.uuid
    assert [m.uuid for m in await registry.list()] == [moved.uuid]
    with pytest.raises(MappingError, match=r"c.toml: mappings\[0\].*name"):
        await registry.upsert_declared(
            [{"function_name": "f", "event_source_arn": "local://x"}], "c.toml"
        )
    with pytest.raises(MappingError, match=r"mappings\[0\] \(bad\)"):
        await registry.upsert_declared([{**entry, "name": "bad", "batch_size": 0}], "c.toml")


@pytest.mark.parametrize(
    ("uri", "label"),
    [
        ("arn:aws:kinesis:us-east-1:123456789012:stream/s", "Kinesis"),
        ("arn:aws:dynamodb:us-east-1:123456789012:table/Tbl/stream/2024", "DynamoDB"),
    ],
)
async def test_a_source_without_a_runner_is_refused_by_kind(
    registry: Registry, uri: str, label: str
) -> None:
    """Refused at create, naming the kind, instead of accepted and failing in the daemon."""
    with pytest.raises(MappingError) as info:
        await registry.create(
            {"function_name": "f", "event_source_arn": uri, "starting_position": "LATEST"}
        )
    assert f"{label} event sources are not supported by this version of poller" in str(info.value)
    assert await registry.list() == []
