"""The registry service over a real SQLite store: validation, duplicates, declared mappings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from poller.engine.filter_compiler import compile_filter_criteria
from poller.mappings import MappingError
from poller.registry import Registry
from poller.sources import kinesis
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


async def test_a_kind_without_a_runner_is_refused_by_kind(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kind that parses but cannot run yet (no ``open``) is refused at create, naming the
    kind, instead of accepted and failing in the daemon. Every kind runs today: one is made
    to look unfinished."""
    monkeypatch.setattr(kinesis, "SOURCE", dataclasses.replace(kinesis.SOURCE, open=None))
    with pytest.raises(MappingError) as info:
        await registry.create(
            {"function_name": "f", "event_source_arn": "kinesis://s", "starting_position": "LATEST"}
        )
    assert "Kinesis event sources are not supported by this version of poller" in str(info.value)
    assert await registry.list() == []


@pytest.mark.parametrize(
    "uri",
    [
        "arn:aws:kinesis:us-east-1:123456789012:stream/s",
        "kinesis://s",
        "arn:aws:dynamodb:us-east-1:123456789012:table/Tbl/stream/2024",
        "dynamodb://Tbl",
    ],
)
async def test_kinesis_and_dynamodb_mappings_are_created(registry: Registry, uri: str) -> None:
    created = await registry.create(
        {"function_name": "f", "event_source_arn": uri, "starting_position": "TRIM_HORIZON"}
    )
    assert (await registry.get(created.uuid)).event_source_arn == uri


async def test_a_kinesis_stream_by_name_and_by_arn_are_one_source(registry: Registry) -> None:
    await registry.create(
        {"function_name": "f", "event_source_arn": "kinesis://s", "starting_position": "LATEST"}
    )
    with pytest.raises(MappingError) as info:
        await registry.create(
            {
                "function_name": "f",
                "event_source_arn": "arn:aws:kinesis:us-east-1:000000000000:stream/s",
                "starting_position": "LATEST",
            }
        )
    assert info.value.code == "ResourceConflictException"


async def test_an_enhanced_fan_out_consumer_is_refused_as_not_supported_yet(
    registry: Registry,
) -> None:
    consumer = "arn:aws:kinesis:us-east-1:123456789012:stream/s/consumer/fan:1700000000"
    with pytest.raises(MappingError) as info:
        await registry.create(
            {"function_name": "f", "event_source_arn": consumer, "starting_position": "LATEST"}
        )
    assert info.value.message == (
        f"Kinesis enhanced fan-out consumers (ARN {consumer}) are not supported yet: map the "
        "stream itself (arn:aws:kinesis:us-east-1:123456789012:stream/s); records are then "
        "read with GetRecords, sharing the shards' read throughput with other consumers."
    )
    assert info.value.parameter == "EventSourceArn"
    assert await registry.list() == []


@pytest.mark.parametrize("with_timestamp", [False, True])
async def test_at_timestamp_on_a_dynamodb_table_is_refused_with_awss_message(
    registry: Registry, with_timestamp: bool
) -> None:
    params = {
        "function_name": "f",
        "event_source_arn": "dynamodb://Orders",
        "starting_position": "AT_TIMESTAMP",
    }
    if with_timestamp:
        params["starting_position_timestamp"] = 1_700_000_000
    with pytest.raises(MappingError) as info:
        await registry.create(params)
    assert info.value.message == "Unsupported starting position for arn type: dynamodb://Orders"
    assert info.value.parameter == "StartingPosition"


@pytest.mark.parametrize(
    ("uri", "key"), [("kinesis://s", "data"), ("dynamodb://Orders", "dynamodb")]
)
async def test_a_plain_pattern_on_a_streams_data_key_is_refused(
    registry: Registry, uri: str, key: str
) -> None:
    """§11.4: the data key takes only a JSON object pattern."""
    params = {"function_name": "f", "event_source_arn": uri, "starting_position": "LATEST"}
    plain = {"Filters": [{"Pattern": json.dumps({key: ["plain"]})}]}
    with pytest.raises(MappingError) as info:
        await registry.create({**params, "filter_criteria": plain})
    assert info.value.message == "Invalid filter pattern definition."
    nested = {"Filters": [{"Pattern": json.dumps({key: {"a": ["x"]}})}]}
    assert (await registry.create({**params, "filter_criteria": nested})).filter_criteria
