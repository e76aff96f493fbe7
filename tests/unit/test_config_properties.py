"""Property tests: any value of any config key or mapping option either loads or is refused with
an error naming the file and the key, and a refused [[mappings]] list changes nothing."""

from __future__ import annotations

import asyncio
import math
import re
import tempfile
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.config import (
    AwsConfig,
    ConfigError,
    DaemonConfig,
    FunctionConfig,
    RedisConfig,
    StateConfig,
    parse_config,
)
from poller.engine.filter_compiler import compile_filter_criteria
from poller.mappings import PARAMETERS_BY_NAME, MappingError
from poller.registry import Registry
from poller.state.sqlite import SqliteStore

PATH = "/etc/poller/config.toml"
SECTIONS: dict[str, type[msgspec.Struct]] = {
    "daemon": DaemonConfig,
    "state": StateConfig,
    "aws": AwsConfig,
    "redis": RedisConfig,
}
FUNCTION_KEYS = [f.name for f in msgspec.structs.fields(FunctionConfig)]
SOURCES = [
    "local://orders",
    "redis-queue://127.0.0.1:1/jobs",
    "redis-stream://127.0.0.1:1/events",
    "https://sqs.us-east-1.amazonaws.com/123456789012/q",
]

# Values a person (or a template gone wrong) can put in TOML, and some it cannot but JSON can.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-2, max_value=20_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["LATEST", "TRIM_HORIZON", "AT_TIMESTAMP", "ReportBatchItemFailures", "f"]),
)
junk = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=8), scalars, max_size=3),
)
identifiers = st.from_regex(r"\A[a-z][a-z_]{0,15}\Z")
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused(data: dict[str, Any]) -> str | None:
    """The error text if the config is refused, None if it loads. Anything else is a bug."""
    try:
        parse_config(data, PATH)
    except ConfigError as exc:
        text = str(exc)
        assert text.startswith(f"{PATH}: "), text
        return text
    return None


def same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a))


@fast
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data())
def test_any_value_of_a_section_key_loads_as_given_or_names_the_key(
    section: str, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from([f.name for f in msgspec.structs.fields(SECTIONS[section])]))
    value = data.draw(junk)
    error = refused({section: {key: value}})
    if error is not None:
        assert f"'{section}.{key}'" in error, error
        return
    loaded = getattr(parse_config({section: {key: value}}, PATH), section)
    if key != "ca_file":  # made absolute against the config file's directory
        assert same(getattr(loaded, key), value)
    if key == "http_listen":
        assert 0 <= loaded.http_host_port[1] <= 65535


@fast
@given(data=st.data())
def test_any_value_of_a_function_key_loads_or_names_the_key(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(FUNCTION_KEYS))
    value = data.draw(junk)
    function = {"name": "f", "handler": "mod.handler", key: value}
    error = refused({"functions": [function]})
    if error is not None:
        assert f"functions[0].{key}" in error, error


@fast
@given(section=st.sampled_from([*sorted(SECTIONS), "functions[0]", None]), key=identifiers)
def test_an_unknown_key_is_named_where_it_is(section: str | None, key: str) -> None:
    if section is None:
        known = {f.name for f in msgspec.structs.fields(parse_config({}, PATH))}
        data: dict[str, Any] = {key: 1}
        where = key
    elif section == "functions[0]":
        known = set(FUNCTION_KEYS)
        data = {"functions": [{"name": "f", "handler": "mod.handler", key: 1}]}
        where = f"functions[0].{key}"
    else:
        known = {f.name for f in msgspec.structs.fields(SECTIONS[section])}
        data = {section: {key: 1}}
        where = f"{section}.{key}"
    if key in known:
        return
    assert refused(data) == f"{PATH}: unknown key '{where}'; remove it or check its spelling"


def mapping_entry(source: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"name": "m", "function_name": "f", "event_source_arn": source, **options}


@fast
@given(
    source=st.sampled_from(SOURCES),
    options=st.dictionaries(st.sampled_from(sorted(PARAMETERS_BY_NAME)), junk, max_size=3),
)
def test_any_mapping_options_load_or_name_a_key_of_that_entry(
    source: str, options: dict[str, Any]
) -> None:
    options.pop("event_source_arn", None)
    options.pop("name", None)
    data = {
        "functions": [{"name": "f", "handler": "mod.handler"}],
        "mappings": [
            mapping_entry("local://other", {"name": "ok"}),
            mapping_entry(source, options),
        ],
    }
    error = refused(data)
    if error is None:
        return
    match = re.match(rf"{re.escape(PATH)}: mappings\[1\](?:\.(\w+))?: \S", error)
    assert match, error
    # A conflict may be reported on the option it conflicts with, not the one that was set.
    assert match[1] is None or match[1] in PARAMETERS_BY_NAME, error


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(
        st.builds(
            lambda name, source, options: {
                "name": name,
                "function_name": "f",
                "event_source_arn": source,
                **options,
            },
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(SOURCES),
            st.dictionaries(
                st.sampled_from(["batch_size", "enabled", "maximum_retry_attempts"]),
                st.one_of(st.integers(min_value=-1, max_value=12_000), st.booleans()),
                max_size=2,
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_declared_mappings_apply_all_or_nothing(entries: list[dict[str, Any]]) -> None:
    """Whatever the entries, the store afterwards holds either all of them or what it held."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as directory:
            store = SqliteStore(f"sqlite:///{directory}/state.db")
            await store.open()
            try:
                registry = Registry(store, validate_filters=compile_filter_criteria)
                await registry.upsert_declared(
                    [mapping_entry("local://before", {"name": "a"})], "c.toml"
                )
                before = sorted(await store.list_mappings(), key=lambda d: d["uuid"])
                try:
                    applied = await registry.upsert_declared(entries, "c.toml")
                except MappingError as exc:
                    assert str(exc).startswith("c.toml: mappings["), exc
                    after = sorted(await store.list_mappings(), key=lambda d: d["uuid"])
                    assert after == before
                    return
                stored = {d["uuid"]: d for d in await store.list_mappings()}
                for mapping in applied:
                    assert stored[mapping.uuid] == mapping.to_dict()
            finally:
                await store.close()

    asyncio.run(scenario())
