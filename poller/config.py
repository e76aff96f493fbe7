"""The TOML config file -> typed, validated config. Every error names the file and the key."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

DEFAULT_CONFIG_NAMES = ("config.toml", "config.example.toml")
# Set by poller in every execution environment, as Lambda reserves them: a function may not
# declare or inherit them.
RESERVED_ENVIRONMENT = frozenset(
    {
        "_HANDLER",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "LAMBDA_TASK_ROOT",
        "TMPDIR",
    }
)
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024


class ConfigError(Exception):
    """A config file problem a person can fix; the message says where and what.

    ``key`` is the dotted path of the key at fault (``functions[0].memory_mb``), when one is.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _default_memory_budget_mb() -> int:
    # Lambda ties CPU and everything else to memory; we bound environments the same way, by
    # default to three quarters of the machine so the daemon and the OS keep headroom.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4096
    return max(int(total * 0.75 / (1024 * 1024)), 128)


class DaemonConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    http_listen: str = "127.0.0.1:9102"
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    memory_mb: Annotated[int, msgspec.Meta(ge=128)] = msgspec.field(
        default_factory=_default_memory_budget_mb
    )
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024)] = MAX_PAYLOAD_BYTES
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1024)] = MAX_PAYLOAD_BYTES
    log_level: str = "info"
    reconcile_interval_s: Annotated[float, msgspec.Meta(gt=0, le=2)] = 0.5

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http_listen.rpartition(":")
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError(f"port {number} out of range")
        return host.strip("[]") or "127.0.0.1", number


class StateConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Empty means the embedded default next to the config file.
    url: str = ""
    key_prefix: str = "poller:"


class FleetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # How long a shard lease lasts without renewal (renewed every third of it): a daemon that
    # dies holds its shards this long at most before the others take them over.
    lease_duration_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 10.0


class AwsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    region: str = "us-east-1"
    endpoint_url: str | None = None
    profile: str | None = None
    account: str = "000000000000"
    # The execution role ordered sources' records name as invokeIdentityArn (§7.2).
    role_arn: str | None = None

    @property
    def invoke_identity_arn(self) -> str:
        """``role_arn``, else arn:aws:iam::ACCOUNT:role/poller (no role exists: it only fills
        the field Lambda's Kinesis records carry)."""
        return self.role_arn or f"arn:aws:iam::{self.account}:role/poller"


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    password_env: str | None = None
    # PEM file of the CA that signed the servers' certificates, for redis-queue://...?tls=true
    # against a private CA (default: the system's trusted CAs).
    ca_file: str | None = None


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaClientConfig(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True
):
    """How poller connects to a Kafka cluster: security, and the consumer's group timings.

    Every key may be left out: ``[kafka]`` gives the defaults, ``[kafka.mappings.NAME]`` (a
    mapping's name or UUID) overrides them for one mapping. Passwords are never in the file:
    ``sasl_password_env`` and ``ssl_key_password_env`` name environment variables.
    """

    security_protocol: str | None = None  # PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN (default with SASL), SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password_env: str | None = None
    ssl_ca_file: str | None = None  # PEM of the CA that signed the brokers' certificates
    ssl_cert_file: str | None = None  # client certificate (mutual TLS)
    ssl_key_file: str | None = None
    ssl_key_password_env: str | None = None
    ssl_check_hostname: bool | None = None
    session_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] | None = None
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=100)] | None = None
    max_poll_interval_ms: Annotated[int, msgspec.Meta(ge=1000)] | None = None
    fetch_max_wait_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    request_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] | None = None
    client_id: str | None = None


class KafkaConfig(KafkaClientConfig, forbid_unknown_fields=True, kw_only=True):
    mappings: dict[str, KafkaClientConfig] = msgspec.field(default_factory=dict)

    def for_mapping(self, *keys: str | None) -> KafkaClientConfig:
        """The settings of the mapping known by any of ``keys`` (name, UUID): its own
        ``[kafka.mappings.KEY]`` over ``[kafka]``."""
        merged = {
            f: getattr(self, f)
            for f in KafkaClientConfig.__struct_fields__
            if getattr(self, f) is not None
        }
        for key in keys:
            override = self.mappings.get(key) if key else None
            if override is not None:
                for f in KafkaClientConfig.__struct_fields__:
                    value = getattr(override, f)
                    if value is not None:
                        merged[f] = value
                break
        return KafkaClientConfig(**merged)


class FunctionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    handler: Annotated[str, msgspec.Meta(min_length=1)]
    code_path: str = ""
    memory_mb: Annotated[int, msgspec.Meta(ge=128, le=10240)] = 128
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 3.0
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    inherit_environment: list[str] = msgspec.field(default_factory=list)
    reserved_concurrency: Annotated[int, msgspec.Meta(ge=0)] | None = None
    provisioned_concurrency: Annotated[int, msgspec.Meta(ge=0)] = 0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    init_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.name}"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    aws: AwsConfig = msgspec.field(default_factory=AwsConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    functions: list[FunctionConfig] = msgspec.field(default_factory=list)
    # Validated by poller.mappings, which owns the parameter rules.
    mappings: list[dict[str, Any]] = msgspec.field(default_factory=list)
    path: str = ""

    @property
    def base_dir(self) -> Path:
        return Path(self.path).parent if self.path else Path.cwd()

    @property
    def state_url(self) -> str:
        return self.state.url or f"sqlite:///{self.base_dir / '.poller' / 'state.db'}"

    def function(self, name: str) -> FunctionConfig:
        for fn in self.functions:
            if fn.name == name:
                return fn
        known = ", ".join(f.name for f in self.functions) or "none"
        raise ConfigError(
            f"{self.path or 'config'}: no function named {name!r} (functions defined: {known}); "
            "add a [[functions]] entry or fix the name"
        )


_AT = re.compile(r"^(?P<what>.*) - at `\$\.?(?P<where>[^`]*)`$")


def _explain(exc: msgspec.ValidationError, path: str) -> ConfigError:
    text = str(exc)
    match = _AT.match(text)
    if not match:
        unknown = re.match(r"Object contains unknown field `(.+)`$", text)
        if unknown:
            return _unknown(path, unknown[1])
        return ConfigError(f"{path}: {text}")
    where = match["where"] or "top level"
    what = match["what"]
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        return _unknown(path, f"{where}.{unknown[1]}" if match["where"] else unknown[1])
    return ConfigError(f"{path}: invalid value for '{where}': {what}", key=match["where"] or None)


def _unknown(path: str, key: str) -> ConfigError:
    return ConfigError(f"{path}: unknown key '{key}'; remove it or check its spelling", key=key)


def parse_config(data: dict[str, Any], path: str) -> Config:
    data = dict(data)
    data.pop("path", None)
    try:
        config = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise _explain(exc, path) from None
    config.path = path
    for where, value in _paths(config):
        if "\x00" in value:
            raise ConfigError(
                f"{path}: invalid value for '{where}': {value!r} holds a NUL character, which no "
                "file path can",
                key=where,
            )
    base = config.base_dir
    if config.redis.ca_file:
        # Relative to the config file, like code_path: the daemon may run from anywhere.
        config.redis.ca_file = str((base / config.redis.ca_file).resolve())
    _check_kafka(config.kafka, path, base)
    names: set[str] = set()
    for index, fn in enumerate(config.functions):
        if fn.name in names:
            raise ConfigError(
                f"{path}: functions[{index}].name: duplicate function {fn.name!r}",
                key=f"functions[{index}].name",
            )
        names.add(fn.name)
        fn.code_path = str((base / fn.code_path).resolve()) if fn.code_path else str(base)
        for key in ("environment", "inherit_environment"):
            clash = sorted(RESERVED_ENVIRONMENT.intersection(getattr(fn, key)))
            if clash:
                raise ConfigError(
                    f"{path}: functions[{index}].{key}: {', '.join(clash)} "
                    f"{'is' if len(clash) == 1 else 'are'} reserved (poller sets "
                    f"{'it' if len(clash) == 1 else 'them'} in every environment, as Lambda "
                    "does); remove or rename",
                    key=f"functions[{index}].{key}",
                )
        if fn.reserved_concurrency is not None and fn.provisioned_concurrency > max(
            fn.reserved_concurrency, 0
        ):
            raise ConfigError(
                f"{path}: functions[{index}].provisioned_concurrency ({fn.provisioned_concurrency})"
                f" exceeds reserved_concurrency ({fn.reserved_concurrency})",
                key=f"functions[{index}].provisioned_concurrency",
            )
    try:
        config.daemon.http_host_port  # noqa: B018 - validate early, not at bind time
    except ValueError:
        raise ConfigError(
            f"{path}: invalid value for 'daemon.http_listen': {config.daemon.http_listen!r}; "
            "expected HOST:PORT such as 127.0.0.1:9102",
            key="daemon.http_listen",
        ) from None
    if config.daemon.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"{path}: invalid value for 'daemon.log_level': {config.daemon.log_level!r}; "
            "expected debug, info, warning or error",
            key="daemon.log_level",
        )
    _check_mappings(config.mappings, path)
    return config


def _paths(config: Config) -> list[tuple[str, str]]:
    paths = [("redis.ca_file", config.redis.ca_file or "")]
    paths += [(f"functions[{i}].code_path", fn.code_path) for i, fn in enumerate(config.functions)]
    return paths


def _check_kafka(kafka: KafkaConfig, path: str, base: Path) -> None:
    """Names and combinations of the [kafka] settings; certificate files made absolute
    (relative to the config file, like code_path)."""
    sections: list[tuple[str, KafkaClientConfig]] = [("kafka", kafka)]
    sections += [(f"kafka.mappings.{key}", c) for key, c in kafka.mappings.items()]
    for where, section in sections:
        protocol = section.security_protocol
        if protocol is not None and protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(
                f"{path}: invalid value for '{where}.security_protocol': {protocol!r}; "
                f"expected one of {', '.join(KAFKA_PROTOCOLS)}"
            )
        mechanism = section.sasl_mechanism
        if mechanism is not None and mechanism not in KAFKA_MECHANISMS:
            raise ConfigError(
                f"{path}: invalid value for '{where}.sasl_mechanism': {mechanism!r}; "
                f"expected one of {', '.join(KAFKA_MECHANISMS)}"
            )
        for key in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
            value = getattr(section, key)
            if value:
                setattr(section, key, str((base / value).resolve()))
    for key in kafka.mappings:
        effective = kafka.for_mapping(key)
        protocol = effective.security_protocol or "PLAINTEXT"
        where = f"kafka.mappings.{key}"
        _check_kafka_combination(effective, protocol, path, where)
    _check_kafka_combination(kafka, kafka.security_protocol or "PLAINTEXT", path, "kafka")


def _check_kafka_combination(
    section: KafkaClientConfig, protocol: str, path: str, where: str
) -> None:
    if protocol.startswith("SASL_"):
        if not section.sasl_username or not section.sasl_password_env:
            raise ConfigError(
                f"{path}: '{where}': security_protocol {protocol} needs sasl_username and "
                "sasl_password_env (the name of the environment variable holding the password)"
            )
    elif section.sasl_mechanism or section.sasl_username or section.sasl_password_env:
        raise ConfigError(
            f"{path}: '{where}': sasl_* settings need security_protocol SASL_PLAINTEXT or "
            f"SASL_SSL (it is {protocol})"
        )
    if not protocol.endswith("SSL") and (
        section.ssl_ca_file or section.ssl_cert_file or section.ssl_key_file
    ):
        raise ConfigError(
            f"{path}: '{where}': ssl_* files need security_protocol SSL or SASL_SSL "
            f"(it is {protocol})"
        )
    if bool(section.ssl_cert_file) != bool(section.ssl_key_file):
        raise ConfigError(
            f"{path}: '{where}': a client certificate needs both ssl_cert_file and ssl_key_file"
        )


def _check_mappings(entries: list[dict[str, Any]], path: str) -> None:
    """Every [[mappings]] entry as `poller mappings create` would check it, so a bad one stops
    the daemon here, naming its key, before anything starts."""
    from poller.engine.filter_compiler import compile_filter_criteria
    from poller.mappings import (
        PARAMETERS_BY_AWS_NAME,
        MappingError,
        check_runnable,
        create_mapping,
    )

    for index, entry in enumerate(entries):
        where = f"mappings[{index}]"
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"{path}: {where}.name: every [[mappings]] entry needs a stable name, so restarts "
                "update it instead of creating a duplicate",
                key=f"{where}.name",
            )
        try:
            check_runnable(create_mapping(entry, validate_filters=compile_filter_criteria))
        except MappingError as exc:
            parameter = PARAMETERS_BY_AWS_NAME.get(exc.parameter or "")
            key = parameter.snake_name if parameter is not None else exc.parameter
            where = f"{where}.{key}" if key else where
            raise ConfigError(f"{path}: {where}: {exc}", key=where) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    resolved = str(file.resolve())
    try:
        return parse_config(data, resolved)
    except ConfigError as exc:
        line = line_of(text, exc.key) if exc.key else None
        if line is None:
            raise
        # FILE:LINE: as compilers write it, so editors and terminals jump to the key.
        message = str(exc).replace(f"{resolved}: ", f"{resolved}:{line}: ", 1)
        raise ConfigError(message, key=exc.key) from None


_HEADER = re.compile(r"^\s*\[(\[)?\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def line_of(text: str, key: str) -> int | None:
    """The line (from 1) where TOML ``text`` sets dotted ``key`` (``functions[1].memory_mb``),
    else where its table starts (``[[functions]]`` for ``functions[1]``), else None.

    A plain reading of headers and ``key =`` lines: dotted keys and keys inside inline tables
    fall back to the enclosing line or table, which is still the place to look."""
    counts: dict[str, int] = {}
    table = ""
    found: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = header[2]
            if header[1]:  # [[array.of.tables]]
                counts[name] = counts.get(name, -1) + 1
                table = f"{name}[{counts[name]}]"
            else:
                table = name
            found.setdefault(table, number)
            continue
        match = _KEY.match(line)
        if match:
            name = match[1].strip("\"'")
            found.setdefault(f"{table}.{name}" if table else name, number)
    while key:
        if key in found:
            return found[key]
        # functions[0].environment.X -> functions[0].environment -> functions[0]
        key = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return None


def find_config(explicit: str | None) -> Path:
    """The --config file, else ./config.toml, else ./config.example.toml."""
    if explicit:
        return Path(explicit)
    for name in DEFAULT_CONFIG_NAMES:
        candidate = Path(name)
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no config file: pass --config FILE, or run where config.toml or config.example.toml is"
    )
