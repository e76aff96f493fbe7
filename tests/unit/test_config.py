"""Config loading: defaults, and errors that name the file and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from poller.config import ConfigError, find_config, load_config, parse_config


def fn(**extra: object) -> dict[str, object]:
    return {"name": "f", "handler": "mod.handler", **extra}


def error(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/poller/config.toml")
    return str(info.value)


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[functions]]\nname = "f"\nhandler = "mod.handler"\n')
    config = load_config(path)
    [function] = config.functions
    assert (function.memory_mb, function.timeout_s, function.idle_timeout_s) == (128, 3.0, 300.0)
    assert function.provisioned_concurrency == 0 and function.reserved_concurrency is None
    assert function.environment == {} and function.inherit_environment == []
    assert function.code_path == str(tmp_path)  # the config file's directory
    assert config.daemon.http_listen == "127.0.0.1:9102"
    assert config.daemon.shutdown_grace_s == 30
    assert config.daemon.memory_mb >= 128
    assert config.state_url == f"sqlite:///{tmp_path}/.poller/state.db"
    assert config.fleet.lease_duration_s == 10


def test_relative_code_path_is_resolved_against_the_config_file(tmp_path: Path) -> None:
    config = parse_config({"functions": [fn(code_path="src")]}, str(tmp_path / "c.toml"))
    assert config.functions[0].code_path == str(tmp_path / "src")


def test_relative_redis_ca_file_is_resolved_against_the_config_file(tmp_path: Path) -> None:
    config = parse_config({"redis": {"ca_file": "certs/ca.pem"}}, str(tmp_path / "c.toml"))
    assert config.redis.ca_file == str(tmp_path / "certs" / "ca.pem")
    absolute = parse_config({"redis": {"ca_file": "/etc/ca.pem"}}, str(tmp_path / "c.toml"))
    assert absolute.redis.ca_file == "/etc/ca.pem"
    assert parse_config({}, str(tmp_path / "c.toml")).redis.ca_file is None


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"functions": [fn(memory_mb=64)]}, ["functions[0].memory_mb", ">= 128"]),
        ({"functions": [fn(memory_mb=10241)]}, ["functions[0].memory_mb", "<= 10240"]),
        ({"functions": [fn(timeout_s=0)]}, ["functions[0].timeout_s"]),
        ({"functions": [fn(colour="red")]}, ["unknown key 'functions[0].colour'"]),
        ({"daemon": {"port": 1}}, ["unknown key 'daemon.port'"]),
        ({"sate": {}}, ["unknown key 'sate'"]),
        ({"functions": [fn(), fn()]}, ["functions[1].name", "duplicate function 'f'"]),
        ({"functions": [fn(name="bad name")]}, ["functions[0].name"]),
        (
            {"functions": [fn(provisioned_concurrency=3, reserved_concurrency=2)]},
            ["functions[0].provisioned_concurrency (3) exceeds reserved_concurrency (2)"],
        ),
        (
            {"functions": [fn(environment={"_HANDLER": "x"})]},
            ["functions[0].environment", "_HANDLER is reserved"],
        ),
        (
            {"functions": [fn(inherit_environment=["TMPDIR"])]},
            ["functions[0].inherit_environment", "TMPDIR is reserved"],
        ),
        ({"functions": [fn(environment={"N": 1})]}, ["functions[0].environment"]),
        ({"daemon": {"http_listen": "nowhere"}}, ["daemon.http_listen", "HOST:PORT"]),
        ({"daemon": {"http_listen": "0.0.0.0:99999"}}, ["daemon.http_listen", "HOST:PORT"]),
        ({"redis": {"ca_file": "ca\x00.pem"}}, ["redis.ca_file", "NUL"]),
        ({"functions": [fn(code_path="a\x00b")]}, ["functions[0].code_path", "NUL"]),
        ({"daemon": {"log_level": "loud"}}, ["daemon.log_level", "debug, info"]),
        ({"daemon": {"reconcile_interval_s": 5}}, ["daemon.reconcile_interval_s"]),
        ({"fleet": {"lease_duration_s": 0.5}}, ["fleet.lease_duration_s", ">= 1"]),
        ({"fleet": {"lease_duration_s": 601}}, ["fleet.lease_duration_s", "<= 600"]),
        ({"fleet": {"leases": 1}}, ["unknown key 'fleet.leases'"]),
    ],
)
def test_errors_name_file_and_key(data: dict[str, object], needles: list[str]) -> None:
    message = error(data)
    assert message.startswith("/etc/poller/config.toml: ")
    for needle in needles:
        assert needle in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad)


FILE_WITH_LINES = """\
[daemon]
http_listen = "{listen}"

[[functions]]
name = "a"
handler = "m.h"

[[functions]]
name = "b"
handler = "m.h"
memory_mb = {memory}
environment = {{ {env} = "1" }}

[[mappings]]
name = "m"
function_name = "a"
event_source_arn = "local://q"
batch_size = {batch}
"""
GOOD = {"listen": "127.0.0.1:9102", "memory": 128, "env": "A", "batch": 10}


@pytest.mark.parametrize(
    ("change", "line", "key"),
    [
        ({"listen": "nowhere"}, 2, "daemon.http_listen"),
        ({"memory": 64}, 11, "functions[1].memory_mb"),
        ({"env": "_HANDLER"}, 12, "functions[1].environment"),
        ({"batch": 0}, 18, "mappings[0].batch_size"),
    ],
)
def test_errors_in_a_file_name_the_line_of_the_key(
    tmp_path: Path, change: dict[str, object], line: int, key: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FILE_WITH_LINES.format(**{**GOOD, **change}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{line}: "), info.value
    assert key in str(info.value)


def test_a_good_file_with_lines_loads() -> None:
    parse_config(tomllib.loads(FILE_WITH_LINES.format(**GOOD)), "c.toml")


def test_unknown_function_lookup_lists_the_defined_ones() -> None:
    config = parse_config({"functions": [fn()]}, "c.toml")
    with pytest.raises(ConfigError, match=r"no function named 'g' \(functions defined: f\)"):
        config.function("g")


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config file"):
        find_config(None)
    (tmp_path / "config.example.toml").write_text("")
    assert find_config(None) == Path("config.example.toml")
    (tmp_path / "config.toml").write_text("")
    assert find_config(None) == Path("config.toml")
    assert find_config("other.toml") == Path("other.toml")


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"batch_size": 0}, "mappings[0].batch_size"),
        ({"batch_size": 20}, "mappings[0].maximum_batching_window_in_seconds"),
        ({"colour": "red"}, "mappings[0].colour"),
        ({"event_source_arn": "ftp://x"}, "mappings[0].event_source_arn"),
        (
            {"filter_criteria": {"Filters": [{"Pattern": '{"body": 1}'}]}},
            "mappings[0].filter_criteria",
        ),
        (
            {"event_source_arn": "arn:aws:kinesis:us-east-1:000000000000:stream/s"},
            "mappings[0].starting_position",
        ),
        ({"event_source_arn": "arn:aws:sns:us-east-1:1:t"}, "mappings[0].event_source_arn"),
        ({"name": None}, "mappings[0].name"),
    ],
)
def test_mapping_errors_name_the_file_and_the_key(mapping: dict[str, object], key: str) -> None:
    entry: dict[str, object] = {
        "name": "orders",
        "function_name": "f",
        "event_source_arn": "local://orders",
        **mapping,
    }
    entry = {k: v for k, v in entry.items() if v is not None}
    text = error({"functions": [fn()], "mappings": [entry]})
    assert text.startswith(f"/etc/poller/config.toml: {key}: "), text
