"""The event source mapping (ESM) model: parameters, per-source defaults, ranges, validation.

This module is the one place that knows which ESM parameter exists, what it
defaults to for each kind of source, which values it accepts and which kinds it
applies to (ESM_SEMANTICS.md §1). Everything else (config file, CLI, registry,
engine) asks it. Pure logic, no I/O.

* ``parse_event_source`` turns an event source URI/ARN into an ``EventSource``.
* ``PARAMETERS`` is the table of every parameter; validation is driven by it.
* ``create_mapping`` / ``update_mapping`` validate and build ``Mapping`` values.
* ``duplicate_error`` reproduces the 409 for a second mapping of one source and
  function.

Error texts reuse AWS's exact messages (§1.7) so tools written against AWS keep
working. ``MappingError.message`` is that exact text; ``str(error)`` adds a
``detail`` that names the parameter and the offending value where AWS's own text
does not, because a person has to be able to act on the error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import uuid as uuid_module
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "ALL_KINDS",
    "CONFLICT",
    "DEFAULT_ACCOUNT",
    "DEFAULT_REGION",
    "ENABLED_STATES",
    "INVALID_PARAMETER",
    "IN_USE",
    "KAFKA_DEFAULT_BATCHING_WINDOW_S",
    "KINDS",
    "NOT_FOUND",
    "NO_RECORDS_PROCESSED",
    "PARAMETERS",
    "PARAMETERS_BY_AWS_NAME",
    "PARAMETERS_BY_NAME",
    "QUEUE_KINDS",
    "REDIS_QUEUE_OPTIONS",
    "STATES",
    "STREAM_KINDS",
    "EventSource",
    "Mapping",
    "MappingError",
    "Parameter",
    "SourceOption",
    "create_mapping",
    "duplicate_error",
    "parse_event_source",
    "update_mapping",
]

# --------------------------------------------------------------------------- kinds

KIND_LOCAL: Final = "local"
KIND_SQS: Final = "sqs"
KIND_REDIS_QUEUE: Final = "redis-queue"
KIND_KINESIS: Final = "kinesis"
KIND_DYNAMODB: Final = "dynamodb"
KIND_KAFKA: Final = "kafka"

KINDS: Final = (KIND_LOCAL, KIND_SQS, KIND_REDIS_QUEUE, KIND_KINESIS, KIND_DYNAMODB, KIND_KAFKA)
ALL_KINDS: Final = frozenset(KINDS)
# local:// and redis-queue:// follow SQS semantics (visibility, delete on success,
# partial batch response), so every SQS rule applies to them as well.
QUEUE_KINDS: Final = frozenset({KIND_LOCAL, KIND_SQS, KIND_REDIS_QUEUE})
STREAM_KINDS: Final = frozenset({KIND_KINESIS, KIND_DYNAMODB})
_KAFKA_KINDS: Final = frozenset({KIND_KAFKA})
_ORDERED_KINDS: Final = STREAM_KINDS | _KAFKA_KINDS

DEFAULT_REGION: Final = "us-east-1"
DEFAULT_ACCOUNT: Final = "000000000000"

# --------------------------------------------------------------------------- states

STATE_CREATING: Final = "Creating"
STATE_ENABLING: Final = "Enabling"
STATE_ENABLED: Final = "Enabled"
STATE_DISABLING: Final = "Disabling"
STATE_DISABLED: Final = "Disabled"
STATE_UPDATING: Final = "Updating"
STATE_DELETING: Final = "Deleting"
STATES: Final = (
    STATE_CREATING,
    STATE_ENABLING,
    STATE_ENABLED,
    STATE_DISABLING,
    STATE_DISABLED,
    STATE_UPDATING,
    STATE_DELETING,
)
# States in which the daemon should be (or soon be) polling.
ENABLED_STATES: Final = frozenset({STATE_ENABLED, STATE_ENABLING, STATE_CREATING, STATE_UPDATING})

# AWS reports user changes differently per source family [VALIDATED].
REASON_USER_QUEUE: Final = "USER_INITIATED"
REASON_USER_STREAM: Final = "User action"
NO_RECORDS_PROCESSED: Final = "No records processed"

# Kafka's default window is 500 ms, which the whole-second API field cannot hold:
# it is stored as None and this is the effective value.
KAFKA_DEFAULT_BATCHING_WINDOW_S: Final = 0.5

STARTING_POSITIONS: Final = ("LATEST", "AT_TIMESTAMP", "TRIM_HORIZON")  # AWS's message order
RESPONSE_TYPES: Final = ("ReportBatchItemFailures",)

# --------------------------------------------------------------------------- errors

INVALID_PARAMETER: Final = "InvalidParameterValueException"
CONFLICT: Final = "ResourceConflictException"
NOT_FOUND: Final = "ResourceNotFoundException"
IN_USE: Final = "ResourceInUseException"
_HTTP_STATUS: Final = {INVALID_PARAMETER: 400, CONFLICT: 409, NOT_FOUND: 404, IN_USE: 400}

MSG_UNRECOGNIZED_SOURCE: Final = "Unrecognized event source."
MSG_UNSUPPORTED_DESTINATION: Final = (
    "Unsupported DestinationConfig parameter for given event source mapping type."
)
MSG_QUEUE_WINDOW: Final = (
    "Maximum batch window in seconds must be greater than 0 "
    "if maximum batch size is greater than 10"
)
MSG_FIFO_WINDOW: Final = "Batching window is not supported for FIFO queues."
MSG_INVALID_FILTER: Final = "Invalid filter pattern definition."

ACCEPTED_SOURCE_FORMS: Final = (
    "local://NAME",
    "sqs://NAME",
    "arn:aws:sqs:REGION:ACCOUNT:NAME",
    "https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (or any http(s)://HOST[:PORT]/ACCOUNT/NAME)",
    "redis-queue://[USER:PASSWORD@]HOST[:PORT][/DB]/STREAM_KEY[?OPTION=VALUE&...]",
    "arn:aws:kinesis:REGION:ACCOUNT:stream/NAME[/consumer/CONSUMER:TIMESTAMP]",
    "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL",
    "kafka://HOST:PORT[,HOST:PORT...]/TOPIC",
)


class MappingError(ValueError):
    """A rejected mapping request, shaped like the AWS error it reproduces.

    ``code`` is the AWS error type, ``message`` the exact AWS text (compare this
    one in tests and clients), ``detail`` our addition naming the parameter and
    value, ``parameter`` the AWS parameter name when one is at fault.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = INVALID_PARAMETER,
        detail: str | None = None,
        parameter: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.detail = detail
        self.parameter = parameter
        super().__init__(f"{message} {detail}" if detail else message)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 400)

    def to_aws(self) -> dict[str, str]:
        """The error body AWS's REST API returns (``Type`` is always ``User`` here)."""
        return {"__type": self.code, "Type": "User", "message": str(self)}


def _redact(uri: str) -> str:
    # Error messages and logs must never carry a password, whatever the scheme. Up to
    # the last '@': an unencoded '@' or '/' in a password must not leak a piece of it.
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)(?:[^@]*@)+", r"\1", uri)


def _source_error(uri: str, what: str) -> MappingError:
    return MappingError(f"{what} in event source {_redact(uri)!r}.", parameter="EventSourceArn")


# --------------------------------------------------------------------------- event sources


@dataclass(frozen=True)
class SourceOption:
    """One ``?option=`` of a queue URI (``redis-queue://`` or ``local://``)."""

    name: str
    type_name: str  # "str", "int", "bool" or "choice"
    default: Any
    help: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()


REDIS_QUEUE_OPTIONS: Final[MappingProxyType[str, SourceOption]] = MappingProxyType(
    {
        o.name: o
        for o in (
            # None: the mapping's UUID, as Lambda names a Kafka mapping's consumer group.
            SourceOption("group", "str", None, "consumer group name (XREADGROUP)"),
            # 30 s and 0..43200 are SQS's visibility timeout default and range.
            SourceOption(
                "visibility_timeout",
                "int",
                30,
                "seconds an unacked entry stays invisible before it is redelivered",
                minimum=0,
                maximum=43200,
            ),
            # 1..1000 is the SQS redrive policy's maxReceiveCount range.
            SourceOption(
                "max_receive_count",
                "int",
                None,
                "deliveries before an entry moves to dead_letter",
                minimum=1,
                maximum=1000,
            ),
            SourceOption(
                "dead_letter",
                "str",
                None,
                "stream key that receives entries past max_receive_count "
                "(default STREAM_KEY:dlq)",
            ),
            SourceOption("tls", "bool", False, "connect with TLS"),
            # "$" (only entries added after the group is created) is Lambda's LATEST;
            # "0" makes a new group see what the stream already holds.
            SourceOption(
                "start", "choice", "$", "where a new consumer group starts", choices=("0", "$")
            ),
            SourceOption(
                "delete_on_ack", "bool", False, "XDEL entries after XACK so the stream stays short"
            ),
        )
    }
)

LOCAL_QUEUE_OPTIONS: Final[MappingProxyType[str, SourceOption]] = MappingProxyType(
    {
        o.name: o
        for o in (
            SourceOption(
                "visibility_timeout", "int", 30,
                "seconds a received message stays hidden before it is redelivered",
                minimum=0, maximum=43200,
            ),
            # A dev queue dead-letters by default so a poison message cannot loop forever;
            # 5 is the redrive setting Lambda's guide recommends at least.
            SourceOption(
                "max_receive_count", "int", 5,
                "receives before a message moves to dead_letter (0: never)",
                minimum=0, maximum=1000,
            ),
            SourceOption(
                "dead_letter", "str", None, "local queue for dead letters (default NAME-dlq)"
            ),
        )
    }
)

_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class EventSource:
    """A parsed event source. ``kind`` says which attributes are set; the rest are None.

    * every kind: ``kind``, ``uri`` (as given; may hold a password, so never log
      it), ``display_uri`` (safe to show; used as ``eventSourceARN``), ``name``.
    * ``local``: ``queue_name``, ``fifo``.
    * ``sqs``: ``queue_name``, ``fifo``, ``region``, ``account``, ``partition``,
      ``arn`` (always), ``queue_url`` (only when given as a URL).
    * ``redis-queue``: ``host``, ``port``, ``db``, ``username``, ``password``,
      ``stream_key``, ``options`` (every ``REDIS_QUEUE_OPTIONS`` key, defaults filled).
    * ``kinesis``: ``region``, ``account``, ``partition``, ``arn`` (as given),
      ``stream_name``, ``stream_arn``, ``consumer_name`` (enhanced fan-out only).
    * ``dynamodb``: ``region``, ``account``, ``partition``, ``arn``, ``table_name``,
      ``stream_label``.
    * ``kafka``: ``bootstrap_servers`` (``host:port`` strings), ``topic`` (None
      when the URI names none).
    """

    kind: str
    uri: str = field(repr=False)
    display_uri: str
    queue_name: str | None = None
    fifo: bool = False
    region: str | None = None
    account: str | None = None
    partition: str | None = None
    arn: str | None = None
    queue_url: str | None = None
    host: str | None = None
    port: int | None = None
    db: int | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    stream_key: str | None = None
    # A plain dict is what the sources want to read; hash=False keeps the frozen
    # dataclass hashable.
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    stream_name: str | None = None
    stream_arn: str | None = None
    consumer_name: str | None = None
    table_name: str | None = None
    stream_label: str | None = None
    bootstrap_servers: tuple[str, ...] = ()
    topic: str | None = None

    @property
    def name(self) -> str:
        """The resource's own short name (queue, stream key, stream, table, topic)."""
        return (
            self.queue_name
            or self.stream_key
            or self.stream_name
            or self.table_name
            or self.topic
            or self.display_uri
        )

    @property
    def is_queue(self) -> bool:
        return self.kind in QUEUE_KINDS

    @property
    def is_stream(self) -> bool:
        """Kinesis and DynamoDB streams (Kafka is ordered too, but not a "stream" here)."""
        return self.kind in STREAM_KINDS

    @property
    def tls(self) -> bool:
        return bool(self.options.get("tls", False))

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two URIs the same resource, for duplicate detection.

        A queue URL and the queue's ARN are the same queue; two consumer groups
        on one Redis stream are two independent queues. Kafka overlaps are
        checked by ``duplicate_error`` (server and topic sets intersect).
        """
        if self.kind == KIND_SQS:
            return (self.kind, self.region, self.account, self.queue_name)
        if self.kind == KIND_REDIS_QUEUE:
            return (
                self.kind,
                self.host,
                self.port,
                self.db,
                self.stream_key,
                self.options["group"],
            )
        if self.kind == KIND_KAFKA:
            return (self.kind, self.bootstrap_servers, self.topic)
        if self.kind == KIND_LOCAL:
            return (self.kind, self.queue_name)
        return (self.kind, self.arn)


_PARTITION = r"(?P<partition>aws(?:-[a-z]+)*)"
_REGION = r"(?P<region>[a-z0-9-]+)"
_ACCOUNT = r"(?P<account>\d{12})"
_SQS_NAME = re.compile(r"^[A-Za-z0-9_-]+(?:\.fifo)?$")
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
_SQS_ARN = re.compile(rf"^arn:{_PARTITION}:sqs:{_REGION}:{_ACCOUNT}:(?P<name>[^:/]+)$")
_KINESIS_ARN = re.compile(
    rf"^arn:{_PARTITION}:kinesis:{_REGION}:{_ACCOUNT}:stream/(?P<stream>[A-Za-z0-9_.-]{{1,128}})"
    r"(?:/consumer/(?P<consumer>[A-Za-z0-9_.-]{1,128})(?::\d+)?)?$"
)
_DYNAMODB_ARN = re.compile(
    rf"^arn:{_PARTITION}:dynamodb:{_REGION}:{_ACCOUNT}:"
    r"table/(?P<table>[A-Za-z0-9_.-]{3,255})/stream/(?P<label>[^/\s]+)$"
)
_ARN_SERVICE = re.compile(r"^arn:[^:]*:(?P<service>[^:]*):")
_URL_ACCOUNT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_URL_REGIONS = (
    re.compile(r"^sqs\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\."),  # sqs.REGION.amazonaws.com
    re.compile(r"^(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.queue\."),  # legacy REGION.queue...
)
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_KAFKA_HOST = re.compile(
    r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d+))?$"
)
_KAFKA_DEFAULT_PORT: Final = 9092
_KAFKA_MAX_SERVERS: Final = 10  # SelfManagedEventSource.Endpoints allows 1..10


def parse_event_source(
    uri: str, *, default_region: str = DEFAULT_REGION, default_account: str = DEFAULT_ACCOUNT
) -> EventSource:
    """Parse an event source URI or ARN; raise ``MappingError`` if it is not one we serve.

    ``default_region``/``default_account`` fill in what ``sqs://NAME`` and
    non-AWS queue URLs do not say, so that an SQS ARN can always be computed.
    """
    if not isinstance(uri, str) or not uri:
        raise _unrecognized(repr(uri))
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "local":
        return _parse_local(uri)
    if scheme == "sqs":
        return _sqs_source(
            uri, uri[len("sqs://") :], default_region, default_account, "aws", queue_url=None
        )
    if scheme in ("http", "https"):
        return _parse_queue_url(uri, default_region)
    if scheme == "redis-queue":
        return _parse_redis_queue(uri)
    if scheme == "kafka":
        return _parse_kafka(uri)
    service = _ARN_SERVICE.match(uri)
    if service and service["service"] == "sqs":
        return _parse_sqs_arn(uri)
    if service and service["service"] == "kinesis":
        return _parse_kinesis_arn(uri)
    if service and service["service"] == "dynamodb":
        return _parse_dynamodb_arn(uri)
    raise _unrecognized(_redact(uri))


def _unrecognized(shown: str) -> MappingError:
    return MappingError(
        MSG_UNRECOGNIZED_SOURCE,
        detail=f"Got {shown}; accepted forms: {'; '.join(ACCEPTED_SOURCE_FORMS)}.",
        parameter="EventSourceArn",
    )


def _parse_local(uri: str) -> EventSource:
    name, _, query = uri[len("local://") :].partition("?")
    if not _LOCAL_NAME.match(name) or name == ".fifo":
        raise _source_error(
            uri,
            f"Invalid local queue name {name!r} (use 1-80 letters, digits, '-', '_' or '.'; "
            "a '.fifo' suffix makes it FIFO)",
        )
    options = _parse_options(uri, query, LOCAL_QUEUE_OPTIONS, "local")
    if options["dead_letter"] is not None:
        target = str(options["dead_letter"]).removeprefix("local://")
        if not _LOCAL_NAME.match(target) or target == name:
            raise _source_error(
                uri, f"Option dead_letter={options['dead_letter']!r} must name another local queue"
            )
        options["dead_letter"] = target
    return EventSource(
        kind=KIND_LOCAL,
        uri=uri,
        display_uri=f"local://{name}",
        queue_name=name,
        fifo=name.endswith(".fifo"),
        options=options,
    )


def _sqs_source(
    uri: str, name: str, region: str, account: str, partition: str, *, queue_url: str | None
) -> EventSource:
    # SQS names: 1-80 chars of alphanumerics, '-' and '_', ".fifo" counted in.
    if not _SQS_NAME.match(name) or len(name) > 80:
        raise _source_error(
            uri,
            f"Invalid SQS queue name {name!r} (use 1-80 letters, digits, '-' or '_', "
            "optionally ending in '.fifo')",
        )
    arn = f"arn:{partition}:sqs:{region}:{account}:{name}"
    return EventSource(
        kind=KIND_SQS,
        uri=uri,
        display_uri=arn,
        queue_name=name,
        fifo=name.endswith(".fifo"),
        region=region,
        account=account,
        partition=partition,
        arn=arn,
        queue_url=queue_url,
    )


def _parse_sqs_arn(uri: str) -> EventSource:
    m = _SQS_ARN.match(uri)
    if not m:
        raise _source_error(
            uri,
            "Invalid SQS queue ARN (expected arn:aws:sqs:REGION:ACCOUNT:NAME, ACCOUNT 12 digits)",
        )
    return _sqs_source(uri, m["name"], m["region"], m["account"], m["partition"], queue_url=None)


def _parse_queue_url(uri: str, default_region: str) -> EventSource:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port, which we want to report
    except ValueError:
        raise _source_error(uri, "Invalid host or port in SQS queue URL") from None
    segments = parts.path.strip("/").split("/")
    if not parts.hostname or len(segments) != 2 or parts.query or parts.fragment:
        raise _source_error(
            uri, "Invalid SQS queue URL (expected http(s)://HOST[:PORT]/ACCOUNT/NAME)"
        )
    account, name = segments
    if not _URL_ACCOUNT.match(account):
        raise _source_error(uri, f"Invalid account {account!r} in SQS queue URL")
    host = parts.hostname
    region = default_region
    # AWS hosts (and LocalStack's sqs.REGION.localhost.localstack.cloud) carry the
    # region; a moto/ElasticMQ endpoint such as localhost:5000 does not.
    for pattern in _URL_REGIONS:
        found = pattern.match(host)
        if found:
            region = found["region"]
            break
    partition = "aws-cn" if host.endswith(".amazonaws.com.cn") else "aws"
    return _sqs_source(uri, name, region, account, partition, queue_url=uri)


def _parse_redis_queue(uri: str) -> EventSource:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        # Not the exception text: a mis-split password would end up in it.
        raise _source_error(
            uri,
            "Invalid host or port in redis-queue URI (percent-encode '/', '@' and ':' "
            "in the user name and password)",
        ) from None
    if parts.fragment:
        raise _source_error(uri, "Invalid redis-queue URI (a '#fragment' is not allowed)")
    host = parts.hostname
    if not host:
        raise _source_error(uri, "Missing host in redis-queue URI")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    db = 0
    # "/DB/KEY" when the first segment is a number and a key follows; otherwise the
    # whole path is the key (keys may themselves contain '/').
    first, sep, rest = path.partition("/")
    if sep and first.isdigit() and rest:
        db, path = int(first), rest
    stream_key = unquote(path)
    if not stream_key:
        raise _source_error(
            uri, "Missing stream key in redis-queue URI (redis-queue://HOST[:PORT][/DB]/STREAM_KEY)"
        )
    options = _parse_redis_options(uri, parts.query, stream_key)
    hostport = parts.netloc.rpartition("@")[2]
    display = f"redis-queue://{hostport}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return EventSource(
        kind=KIND_REDIS_QUEUE,
        uri=uri,
        display_uri=display,
        host=host,
        port=6379 if port is None else port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        stream_key=stream_key,
        options=options,
    )


def _parse_options(
    uri: str, query: str, table: MappingProxyType[str, SourceOption], label: str
) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise _source_error(uri, f"Invalid query string {query!r}") from None
    options: dict[str, Any] = {name: o.default for name, o in table.items()}
    seen: set[str] = set()
    for key, raw in pairs:
        option = table.get(key)
        if option is None:
            raise _source_error(
                uri, f"Unknown {label} option {key!r} (valid: {', '.join(table)})"
            )
        if key in seen:
            raise _source_error(uri, f"Option {key!r} given twice")
        seen.add(key)
        options[key] = _redis_option_value(uri, option, raw)
    return options


def _parse_redis_options(uri: str, query: str, stream_key: str) -> dict[str, Any]:
    options = _parse_options(uri, query, REDIS_QUEUE_OPTIONS, "redis-queue")
    if options["dead_letter"] is not None and options["max_receive_count"] is None:
        raise _source_error(
            uri, "Option dead_letter needs max_receive_count (as an SQS redrive policy)"
        )
    if options["dead_letter"] == stream_key:
        raise _source_error(uri, "Option dead_letter must differ from the source stream key")
    return options


def _redis_option_value(uri: str, option: SourceOption, raw: str) -> Any:
    if option.type_name == "int":
        if not re.fullmatch(r"\d+", raw):
            raise _source_error(uri, f"Option {option.name}={raw!r} must be a whole number")
        value = int(raw)
        if (option.minimum is not None and value < option.minimum) or (
            option.maximum is not None and value > option.maximum
        ):
            raise _source_error(
                uri,
                f"Option {option.name}={value} is out of range "
                f"({option.minimum}..{option.maximum})",
            )
        return value
    if option.type_name == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise _source_error(uri, f"Option {option.name}={raw!r} must be true or false")
    if option.type_name == "choice":
        if raw not in option.choices:
            raise _source_error(
                uri, f"Option {option.name}={raw!r} must be one of {', '.join(option.choices)}"
            )
        return raw
    if not raw:
        raise _source_error(uri, f"Option {option.name} must not be empty")
    return raw


def _parse_kafka(uri: str) -> EventSource:
    rest = uri[len("kafka://") :]
    if "?" in rest or "#" in rest:
        raise _source_error(uri, "Invalid kafka URI (no query or fragment allowed)")
    servers_part, _, topic = rest.partition("/")
    servers: list[str] = []
    for item in servers_part.split(","):
        m = _KAFKA_HOST.match(item)
        port = int(m["port"]) if m and m["port"] else _KAFKA_DEFAULT_PORT
        if not m or not 1 <= port <= 65535:
            raise _source_error(
                uri, f"Invalid Kafka bootstrap server {item!r} (expected HOST:PORT)"
            )
        host = f"[{m['ipv6']}]" if m["ipv6"] else m["host"]
        server = f"{host}:{port}"
        if server not in servers:
            servers.append(server)
    if len(servers) > _KAFKA_MAX_SERVERS:
        raise _source_error(uri, f"Too many Kafka bootstrap servers (at most {_KAFKA_MAX_SERVERS})")
    if topic and not _KAFKA_TOPIC.match(topic):
        raise _source_error(
            uri, f"Invalid Kafka topic {topic!r} (1-249 letters, digits, '.', '_' or '-')"
        )
    joined = ",".join(servers)
    return EventSource(
        kind=KIND_KAFKA,
        uri=uri,
        display_uri=f"kafka://{joined}/{topic}" if topic else f"kafka://{joined}",
        bootstrap_servers=tuple(servers),
        topic=topic or None,
    )


def _parse_kinesis_arn(uri: str) -> EventSource:
    m = _KINESIS_ARN.match(uri)
    if not m:
        raise _source_error(
            uri,
            "Invalid Kinesis ARN (expected arn:aws:kinesis:REGION:ACCOUNT:stream/NAME"
            "[/consumer/CONSUMER:TIMESTAMP])",
        )
    stream_arn = f"arn:{m['partition']}:kinesis:{m['region']}:{m['account']}:stream/{m['stream']}"
    return EventSource(
        kind=KIND_KINESIS,
        uri=uri,
        display_uri=uri,
        region=m["region"],
        account=m["account"],
        partition=m["partition"],
        arn=uri,
        stream_name=m["stream"],
        stream_arn=stream_arn,
        consumer_name=m["consumer"],
    )


def _parse_dynamodb_arn(uri: str) -> EventSource:
    m = _DYNAMODB_ARN.match(uri)
    if not m:
        raise _source_error(
            uri,
            "Invalid DynamoDB stream ARN (expected "
            "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL; "
            "a table ARN is not a stream)",
        )
    return EventSource(
        kind=KIND_DYNAMODB,
        uri=uri,
        display_uri=uri,
        region=m["region"],
        account=m["account"],
        partition=m["partition"],
        arn=uri,
        table_name=m["table"],
        stream_label=m["label"],
    )


# --------------------------------------------------------------------------- parameters


@dataclass
class _Context:
    """What a parameter check may need besides the value itself."""

    source: EventSource
    now: float
    uuid: str
    validate_filters: Callable[[dict[str, Any]], None] | None


Check = Callable[["Parameter", Any, _Context], Any]


@dataclass(frozen=True)
class Parameter:
    """One ESM parameter: names, type, range, per-kind default and applicability.

    ``defaults`` maps a kind to its default (kinds not listed default to None,
    i.e. unset). ``check`` validates shape beyond type/range/enum and returns the
    value to store (None = remove). ``unsupported_message`` is AWS's exact text for
    using the parameter on a kind it does not apply to, where AWS has one.
    """

    aws_name: str
    snake_name: str
    type_name: str  # "str", "int", "bool", "list", "dict" or "timestamp"
    kinds: frozenset[str]
    help: str
    defaults: MappingProxyType[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] = ()
    required_kinds: frozenset[str] = frozenset()
    create_only: bool = False
    in_aws: bool = True  # shown by Mapping.to_aws
    aws_container: str | None = None  # nested under this key in the AWS response
    unsupported_message: str | None = None
    check: Check | None = field(default=None, compare=False)

    @property
    def member(self) -> str:
        """The lowerCamel name AWS's validation messages use (``batchSize``)."""
        return self.aws_name[0].lower() + self.aws_name[1:]

    @property
    def cli_name(self) -> str:
        return "--" + self.snake_name.replace("_", "-")

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds

    def default_for(self, kind: str) -> Any:
        # Copy: a default list/dict must never be shared between mappings.
        return copy.deepcopy(self.defaults.get(kind))

    def range_text(self) -> str:
        if self.enum:
            return " | ".join(self.enum)
        if self.minimum is not None or self.maximum is not None:
            return f"{self.minimum}..{self.maximum}"
        return ""


def _per_kind(*pairs: tuple[Iterable[str], Any]) -> MappingProxyType[str, Any]:
    table: dict[str, Any] = {}
    for kinds, value in pairs:
        for kind in kinds:
            table[kind] = value
    return MappingProxyType(table)


def _validation(member: str, value: Any, constraint: str, parameter: str) -> MappingError:
    # AWS's own format for type-level constraint violations; it names both the
    # member and the value, so no detail is needed.
    shown = "null" if value is None else f"'{_render(value)}'"
    return MappingError(
        f"1 validation error detected: Value {shown} at '{member}' failed to satisfy constraint: "
        f"{constraint}",
        parameter=parameter,
    )


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return str(value)


def _bounds(member: str, aws_name: str, value: int, lo: int | None, hi: int | None) -> None:
    if lo is not None and value < lo:
        raise _validation(
            member, value, f"Member must have value greater than or equal to {lo}", aws_name
        )
    if hi is not None and value > hi:
        raise _validation(
            member, value, f"Member must have value less than or equal to {hi}", aws_name
        )


def _type_error(p: Parameter, expected: str, value: Any) -> MappingError:
    return MappingError(
        f"{p.aws_name} must be {expected}; got {value!r} ({type(value).__name__}).",
        parameter=p.aws_name,
    )


_FUNCTION_REF = re.compile(
    r"^(?:arn:(?P<partition>aws[a-zA-Z-]*):lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):function:"
    r"|(?P<partial_account>\d{12}):function:)?"
    r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]{1,128}))?$"
)
_MAPPING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CONSUMER_GROUP = re.compile(r"^[a-zA-Z0-9\-/*:_+=.@]{1,200}$")


def _check_function_name(p: Parameter, value: str, ctx: _Context) -> str:
    if len(value) > 256:
        raise _validation(
            p.member, value, "Member must have length less than or equal to 256", p.aws_name
        )
    if not _FUNCTION_REF.match(value):
        raise MappingError(
            f"Invalid FunctionName {value!r}: use a function name (1-64 letters, digits, '-' or "
            "'_'), optionally with ':QUALIFIER', or a function ARN.",
            parameter=p.aws_name,
        )
    return value


def _check_name(p: Parameter, value: str, ctx: _Context) -> str:
    if not _MAPPING_NAME.match(value):
        raise MappingError(
            f"Invalid mapping name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            parameter=p.aws_name,
        )
    return value


def _check_record_age(p: Parameter, value: int, ctx: _Context) -> int:
    # 0..59 is inside the API's numeric range but AWS rejects it: 60 s is the
    # smallest age it accepts; -1 means infinite.
    if 0 <= value < 60:
        raise MappingError(
            "MaximumRecordAgeInSeconds must be -1 (infinite) or between 60 and 604800; "
            f"got {value}.",
            parameter=p.aws_name,
        )
    return value


def _check_response_types(p: Parameter, value: list[Any], ctx: _Context) -> list[str]:
    if len(value) > 1:
        raise _validation(
            p.member, value, "Member must have length less than or equal to 1", p.aws_name
        )
    for item in value:
        if item not in RESPONSE_TYPES:
            raise _validation(
                p.member,
                value,
                f"Member must satisfy enum value set: [{', '.join(RESPONSE_TYPES)}]",
                p.aws_name,
            )
    return list(value)


def _check_filter_criteria(
    p: Parameter, value: dict[str, Any], ctx: _Context
) -> dict[str, Any] | None:
    unknown = set(value) - {"Filters"}
    if unknown:
        raise _filter_error(f"unknown FilterCriteria key {sorted(unknown)[0]!r}")
    filters = value.get("Filters")
    # {} and an empty Filters list are AWS's way of removing the filters.
    if filters is None or filters == []:
        return None
    if not isinstance(filters, list):
        raise _filter_error(f"Filters must be a list; got {filters!r}")
    for index, entry in enumerate(filters, start=1):
        if not isinstance(entry, dict) or set(entry) != {"Pattern"}:
            raise _filter_error(f'filter {index} must be {{"Pattern": "<json>"}}; got {entry!r}')
        pattern = entry["Pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise _filter_error(f"filter {index}: Pattern must be a non-empty JSON string")
        if len(pattern) > 4096:
            raise _filter_error(f"filter {index}: Pattern is {len(pattern)} characters (max 4096)")
        try:
            decoded = json.loads(pattern)
        except ValueError:
            raise _filter_error(f"filter {index}: Pattern is not valid JSON: {pattern!r}") from None
        if not isinstance(decoded, dict):
            raise _filter_error(f"filter {index}: Pattern must be a JSON object; got {pattern!r}")
    criteria = {"Filters": [{"Pattern": f["Pattern"]} for f in filters]}
    if ctx.validate_filters is not None:
        try:
            ctx.validate_filters(copy.deepcopy(criteria))
        except MappingError:
            raise
        except ValueError as exc:
            # The deep checker (engine.filtering) raises ValueError subclasses that
            # carry a ``detail``; fall back to its text.
            detail = getattr(exc, "detail", None) or str(exc)
            raise _filter_error(detail) from None
    return criteria


def _filter_error(detail: str) -> MappingError:
    return MappingError(
        MSG_INVALID_FILTER, detail=f"(FilterCriteria: {detail})", parameter="FilterCriteria"
    )


def _check_scaling_config(
    p: Parameter, value: dict[str, Any], ctx: _Context
) -> dict[str, int] | None:
    if not value:
        return None  # "To remove the configuration, pass an empty value."
    unknown = set(value) - {"MaximumConcurrency"}
    if unknown:
        raise MappingError(
            f"Unknown ScalingConfig key {sorted(unknown)[0]!r} (valid: MaximumConcurrency).",
            parameter=p.aws_name,
        )
    concurrency = value["MaximumConcurrency"]
    if type(concurrency) is not int:
        raise MappingError(
            f"ScalingConfig.MaximumConcurrency must be an integer; got {concurrency!r}.",
            parameter=p.aws_name,
        )
    _bounds("scalingConfig.maximumConcurrency", p.aws_name, concurrency, 2, 1000)
    return {"MaximumConcurrency": concurrency}


_DESTINATION_ARN = re.compile(
    r"^arn:aws(?:-[a-z]+)*:(?P<service>sqs|sns|s3):[a-z0-9-]*:(?:\d{12})?:(?P<resource>\S+)$"
)


def _check_destination_config(
    p: Parameter, value: dict[str, Any], ctx: _Context
) -> dict[str, Any] | None:
    if "OnSuccess" in value:
        raise MappingError(
            MSG_UNSUPPORTED_DESTINATION,
            detail="(DestinationConfig.OnSuccess: event source mappings support only OnFailure.)",
            parameter=p.aws_name,
        )
    unknown = set(value) - {"OnFailure"}
    if unknown:
        raise MappingError(
            f"Unknown DestinationConfig key {sorted(unknown)[0]!r} (valid: OnFailure).",
            parameter=p.aws_name,
        )
    on_failure = value.get("OnFailure") or {}
    if not isinstance(on_failure, dict) or set(on_failure) - {"Destination"}:
        raise MappingError(
            f'DestinationConfig.OnFailure must be {{"Destination": "<arn>"}}; got {on_failure!r}.',
            parameter=p.aws_name,
        )
    destination = on_failure.get("Destination", "")
    if not isinstance(destination, str):
        raise MappingError(
            f"DestinationConfig.OnFailure.Destination must be a string; got {destination!r}.",
            parameter=p.aws_name,
        )
    if not destination:
        return None  # {"OnFailure": {"Destination": ""}} removes the destination
    if len(destination) > 350:
        raise _validation(
            "destinationConfig.onFailure.destination",
            destination,
            "Member must have length less than or equal to 350",
            p.aws_name,
        )
    _check_destination_target(p, destination, ctx.source)
    return {"OnFailure": {"Destination": destination}}


def _check_destination_target(p: Parameter, destination: str, source: EventSource) -> None:
    arn = _DESTINATION_ARN.match(destination)
    if arn:
        # DynamoDB streams can only send to standard (non-FIFO) queues and topics.
        if source.kind == KIND_DYNAMODB and arn["resource"].endswith(".fifo"):
            raise MappingError(
                f"DynamoDB on-failure destinations must be standard SQS queues or SNS topics; "
                f"got {destination!r}.",
                parameter=p.aws_name,
            )
        return
    if destination.startswith("kafka://"):
        topic = destination[len("kafka://") :]
        if source.kind != KIND_KAFKA:
            raise MappingError(
                "A kafka:// on-failure destination needs a Kafka event source; "
                f"got {destination!r}.",
                parameter=p.aws_name,
            )
        if not _KAFKA_TOPIC.match(topic):
            raise MappingError(
                f"Invalid Kafka topic in on-failure destination {destination!r}.",
                parameter=p.aws_name,
            )
        if topic == source.topic:
            # AWS's recursion prevention: failures must not be fed back to the source.
            raise MappingError(
                f"The on-failure destination topic {topic!r} must differ from the source topic.",
                parameter=p.aws_name,
            )
        return
    if destination.startswith("local://"):
        _parse_local(destination)  # a dev-only extension: raises on a bad name
        return
    raise MappingError(
        f"Invalid DestinationConfig.OnFailure.Destination {destination!r}: use an SQS queue, SNS "
        "topic or S3 bucket ARN, kafka://TOPIC (Kafka sources) or local://NAME.",
        parameter=p.aws_name,
    )


def _check_topics(p: Parameter, value: list[Any], ctx: _Context) -> list[str]:
    if len(value) != 1:
        raise MappingError(
            f"Topics must hold exactly 1 topic; got {len(value)}: {value!r}.", parameter=p.aws_name
        )
    topic = value[0]
    if not isinstance(topic, str) or not _KAFKA_TOPIC.match(topic):
        raise MappingError(
            f"Invalid Kafka topic {topic!r} (1-249 letters, digits, '.', '_' or '-').",
            parameter=p.aws_name,
        )
    return [topic]


def _check_consumer_group(p: Parameter, value: str, ctx: _Context) -> str:
    if not _CONSUMER_GROUP.match(value):
        raise MappingError(
            f"Invalid ConsumerGroupId {value!r} "
            "(1-200 characters of letters, digits and -/*:_+=.@).",
            parameter=p.aws_name,
        )
    return value


def _to_epoch(p: Parameter, value: Any) -> float:
    if isinstance(value, bool):
        raise _type_error(p, "a timestamp (epoch seconds or ISO-8601)", value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _type_error(p, "a timestamp (epoch seconds or ISO-8601)", value) from None
    if isinstance(value, datetime):
        # A timestamp without a zone is taken as UTC, as AWS does.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    raise _type_error(p, "a timestamp (epoch seconds or ISO-8601)", value)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


PARAMETERS: Final[tuple[Parameter, ...]] = (
    Parameter(
        "FunctionName",
        "function_name",
        "str",
        ALL_KINDS,
        "function to invoke: a name, NAME:QUALIFIER or a function ARN",
        required_kinds=ALL_KINDS,
        check=_check_function_name,
    ),
    Parameter(
        "EventSourceArn",
        "event_source_arn",
        "str",
        ALL_KINDS,
        "event source: " + "; ".join(ACCEPTED_SOURCE_FORMS),
        required_kinds=ALL_KINDS,
        create_only=True,
    ),
    Parameter(
        "Enabled",
        "enabled",
        "bool",
        ALL_KINDS,
        "false pauses polling and invocation",
        defaults=_per_kind((ALL_KINDS, True)),
        in_aws=False,
    ),
    Parameter(
        "Name",
        "name",
        "str",
        ALL_KINDS,
        "stable name for a mapping declared in a config file (not an AWS parameter)",
        check=_check_name,
    ),
    Parameter(
        "BatchSize",
        "batch_size",
        "int",
        ALL_KINDS,
        "most records per invoke (FIFO queues: at most 10; queues: >10 needs a batching window)",
        defaults=_per_kind((QUEUE_KINDS, 10), (_ORDERED_KINDS, 100)),
        minimum=1,
        maximum=10000,
    ),
    Parameter(
        "MaximumBatchingWindowInSeconds",
        "maximum_batching_window_in_seconds",
        "int",
        ALL_KINDS,
        "seconds to gather records before invoking (Kafka default: 500 ms)",
        # Kafka's 500 ms default is None here; see Mapping.batching_window_s.
        defaults=_per_kind((QUEUE_KINDS | STREAM_KINDS, 0)),
        minimum=0,
        maximum=300,
    ),
    Parameter(
        "StartingPosition",
        "starting_position",
        "str",
        _ORDERED_KINDS,
        "where a new mapping starts reading (DynamoDB: no AT_TIMESTAMP)",
        enum=STARTING_POSITIONS,
        required_kinds=_ORDERED_KINDS,
        create_only=True,
    ),
    Parameter(
        "StartingPositionTimestamp",
        "starting_position_timestamp",
        "timestamp",
        frozenset({KIND_KINESIS, KIND_KAFKA}),
        "with AT_TIMESTAMP: the time to start from (epoch seconds or ISO-8601; not in the future)",
        create_only=True,
    ),
    Parameter(
        "ParallelizationFactor",
        "parallelization_factor",
        "int",
        STREAM_KINDS,
        "concurrent batches per shard",
        defaults=_per_kind((STREAM_KINDS, 1)),
        minimum=1,
        maximum=10,
    ),
    Parameter(
        "FilterCriteria",
        "filter_criteria",
        "dict",
        ALL_KINDS,
        '{"Filters": [{"Pattern": "<json>"}]}; {} removes the filters',
        check=_check_filter_criteria,
    ),
    Parameter(
        "DestinationConfig",
        "destination_config",
        "dict",
        _ORDERED_KINDS,
        '{"OnFailure": {"Destination": "<arn>"}}; an empty Destination removes it',
        unsupported_message=MSG_UNSUPPORTED_DESTINATION,
        check=_check_destination_config,
    ),
    Parameter(
        "Topics",
        "topics",
        "list",
        _KAFKA_KINDS,
        "exactly one Kafka topic (defaults to the topic in the kafka:// URI)",
        create_only=True,
        check=_check_topics,
    ),
    Parameter(
        "ConsumerGroupId",
        "consumer_group_id",
        "str",
        _KAFKA_KINDS,
        "Kafka consumer group (defaults to the mapping UUID)",
        create_only=True,
        aws_container="SelfManagedKafkaEventSourceConfig",
        check=_check_consumer_group,
    ),
    Parameter(
        "MaximumRecordAgeInSeconds",
        "maximum_record_age_in_seconds",
        "int",
        _ORDERED_KINDS,
        "discard records older than this (-1 = infinite; otherwise at least 60)",
        defaults=_per_kind((_ORDERED_KINDS, -1)),
        minimum=-1,
        maximum=604800,
        check=_check_record_age,
    ),
    Parameter(
        "BisectBatchOnFunctionError",
        "bisect_batch_on_function_error",
        "bool",
        _ORDERED_KINDS,
        "split a failing batch in two and retry each half",
        defaults=_per_kind((_ORDERED_KINDS, False)),
    ),
    Parameter(
        "MaximumRetryAttempts",
        "maximum_retry_attempts",
        "int",
        _ORDERED_KINDS,
        "retries of a failing batch (-1 = until the records expire)",
        defaults=_per_kind((_ORDERED_KINDS, -1)),
        minimum=-1,
        maximum=10000,
    ),
    Parameter(
        "TumblingWindowInSeconds",
        "tumbling_window_in_seconds",
        "int",
        STREAM_KINDS,
        "tumbling window length (0 = no window)",
        defaults=_per_kind((STREAM_KINDS, 0)),
        minimum=0,
        maximum=900,
    ),
    Parameter(
        "FunctionResponseTypes",
        "function_response_types",
        "list",
        ALL_KINDS,
        "[] or [ReportBatchItemFailures] (partial batch response)",
        defaults=_per_kind((ALL_KINDS, [])),
        check=_check_response_types,
    ),
    Parameter(
        "ScalingConfig",
        "scaling_config",
        "dict",
        QUEUE_KINDS,
        '{"MaximumConcurrency": 2..1000}; {} removes it',
        check=_check_scaling_config,
    ),
)

PARAMETERS_BY_NAME: Final = MappingProxyType({p.snake_name: p for p in PARAMETERS})
PARAMETERS_BY_AWS_NAME: Final = MappingProxyType({p.aws_name: p for p in PARAMETERS})
_TYPE_CHECKS: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: type(v) is int, "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list": (lambda v: isinstance(v, list | tuple), "a list"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
}


def _normalize(p: Parameter, value: Any, ctx: _Context) -> Any:
    """Type, range, enum, then the parameter's own check; returns the value to store."""
    if p.type_name == "timestamp":
        value = _to_epoch(p, value)
    else:
        accepts, expected = _TYPE_CHECKS[p.type_name]
        if not accepts(value):
            raise _type_error(p, expected, value)
    if p.type_name == "str" and not value:
        raise _validation(
            p.member, value, "Member must have length greater than or equal to 1", p.aws_name
        )
    if p.type_name == "int":
        _bounds(p.member, p.aws_name, value, p.minimum, p.maximum)
    if p.enum and value not in p.enum:
        raise _validation(
            p.member,
            value,
            f"Member must satisfy enum value set: [{', '.join(p.enum)}]",
            p.aws_name,
        )
    if p.type_name == "list":
        value = list(value)
    return p.check(p, value, ctx) if p.check else value


def _unsupported(p: Parameter, value: Any, kind: str) -> MappingError:
    applies = ", ".join(k for k in KINDS if k in p.kinds)
    detail = f"({p.aws_name}={value!r} applies to {applies} event sources, not {kind}.)"
    if p.unsupported_message:
        return MappingError(p.unsupported_message, detail=detail, parameter=p.aws_name)
    return MappingError(
        f"{p.aws_name} is not supported for {kind} event sources; it applies to {applies}. "
        f"Got {value!r}.",
        parameter=p.aws_name,
    )


# --------------------------------------------------------------------------- cross-field rules
# Each rule sees the resolved values (defaults applied) and raises on a conflict.

Rule = Callable[[dict[str, Any], _Context], None]


def _rule_starting_position(v: dict[str, Any], ctx: _Context) -> None:
    position = v["starting_position"]
    if position == "AT_TIMESTAMP" and ctx.source.kind == KIND_DYNAMODB:
        raise MappingError(
            f"Unsupported starting position for arn type: {ctx.source.uri}",
            detail="(StartingPosition=AT_TIMESTAMP; "
            "DynamoDB streams support TRIM_HORIZON and LATEST.)",
            parameter="StartingPosition",
        )
    timestamp = v["starting_position_timestamp"]
    if position == "AT_TIMESTAMP" and timestamp is None:
        raise MappingError(
            "StartingPositionTimestamp is required when StartingPosition is AT_TIMESTAMP.",
            parameter="StartingPositionTimestamp",
        )
    if timestamp is not None and position != "AT_TIMESTAMP":
        raise MappingError(
            f"StartingPositionTimestamp is only valid with StartingPosition=AT_TIMESTAMP; "
            f"StartingPosition is {position}.",
            parameter="StartingPositionTimestamp",
        )
    if timestamp is not None and timestamp > ctx.now:
        raise MappingError(
            f"StartingPositionTimestamp cannot be in the future; got {_iso(timestamp)}, "
            f"now is {_iso(ctx.now)}.",
            parameter="StartingPositionTimestamp",
        )


def _rule_queue_batching(v: dict[str, Any], ctx: _Context) -> None:
    source = ctx.source
    if not source.is_queue:
        return
    batch_size, window = v["batch_size"], v["maximum_batching_window_in_seconds"]
    if source.fifo:
        if batch_size > 10:
            raise MappingError(
                f"BatchSize must be at most 10 for FIFO queues; got {batch_size}.",
                parameter="BatchSize",
            )
        if window:
            raise MappingError(
                MSG_FIFO_WINDOW,
                detail=f"(MaximumBatchingWindowInSeconds={window}; FIFO queues need 0.)",
                parameter="MaximumBatchingWindowInSeconds",
            )
    if batch_size > 10 and window == 0:
        raise MappingError(
            MSG_QUEUE_WINDOW,
            detail=f"(BatchSize={batch_size}, MaximumBatchingWindowInSeconds={window}.)",
            parameter="MaximumBatchingWindowInSeconds",
        )


def _rule_kafka(v: dict[str, Any], ctx: _Context) -> None:
    source = ctx.source
    if source.kind != KIND_KAFKA:
        return
    if v["topics"] is None:
        if source.topic is None:
            raise MappingError(
                "Topics is required for Kafka event sources: name exactly one topic in the URI "
                "(kafka://HOST:PORT/TOPIC) or in topics.",
                parameter="Topics",
            )
        v["topics"] = [source.topic]
    elif source.topic is not None and v["topics"] != [source.topic]:
        raise MappingError(
            f"Topics {v['topics']!r} does not match the topic {source.topic!r} in the event "
            "source URI; give the topic in one place.",
            parameter="Topics",
        )
    destination = (v["destination_config"] or {}).get("OnFailure", {}).get("Destination", "")
    if destination == f"kafka://{v['topics'][0]}":
        raise MappingError(
            f"The on-failure destination topic {v['topics'][0]!r} "
            "must differ from the source topic.",
            parameter="DestinationConfig",
        )
    if v["consumer_group_id"] is None:
        # AWS picks a unique group per mapping; the mapping's UUID is unique.
        v["consumer_group_id"] = ctx.uuid


# (kinds the rule applies to, rule), checked in this order.
_RULES: Final[tuple[tuple[frozenset[str], Rule], ...]] = (
    (_ORDERED_KINDS, _rule_starting_position),
    (QUEUE_KINDS, _rule_queue_batching),
    (_KAFKA_KINDS, _rule_kafka),
)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, repr=False)
class Mapping:
    """One event source mapping. Immutable: ``update_mapping`` returns a new one.

    Parameters that do not apply to the source's kind are None. Build with
    ``create_mapping`` (validates) or ``from_dict`` (trusts stored data).
    """

    uuid: str
    function_name: str
    event_source_arn: str
    batch_size: int = 10
    maximum_batching_window_in_seconds: int | None = None
    function_response_types: list[str] = field(default_factory=list)
    filter_criteria: dict[str, Any] | None = None
    scaling_config: dict[str, int] | None = None
    destination_config: dict[str, Any] | None = None
    starting_position: str | None = None
    starting_position_timestamp: float | None = None
    parallelization_factor: int | None = None
    bisect_batch_on_function_error: bool | None = None
    maximum_retry_attempts: int | None = None
    maximum_record_age_in_seconds: int | None = None
    tumbling_window_in_seconds: int | None = None
    topics: list[str] | None = None
    consumer_group_id: str | None = None
    state: str = STATE_ENABLED
    state_transition_reason: str = REASON_USER_QUEUE
    last_modified: float = 0.0
    last_processing_result: str = NO_RECORDS_PROCESSED
    name: str | None = None

    def __repr__(self) -> str:
        # A repr ends up in logs, and the raw source URI may hold a Redis password.
        shown = ", ".join(
            f"{f.name}={_redact(self.event_source_arn)!r}"
            if f.name == "event_source_arn"
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"Mapping({shown})"

    @cached_property
    def source(self) -> EventSource:
        # Frozen, so the parse can be cached (cached_property writes __dict__ directly).
        return parse_event_source(self.event_source_arn)

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def enabled(self) -> bool:
        return self.state in ENABLED_STATES

    @property
    def maximum_concurrency(self) -> int | None:
        return self.scaling_config["MaximumConcurrency"] if self.scaling_config else None

    @property
    def report_batch_item_failures(self) -> bool:
        return "ReportBatchItemFailures" in self.function_response_types

    @property
    def batching_window_s(self) -> float:
        """The effective batching window in seconds (Kafka's unset default is 0.5)."""
        if self.maximum_batching_window_in_seconds is None:
            return KAFKA_DEFAULT_BATCHING_WINDOW_S if self.kind == KIND_KAFKA else 0.0
        return float(self.maximum_batching_window_in_seconds)

    @property
    def on_failure_destination(self) -> str | None:
        if not self.destination_config:
            return None
        return self.destination_config.get("OnFailure", {}).get("Destination") or None

    def function_arn(self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT) -> str:
        """The function's ARN. A bare name lives in the daemon's region/account (as in
        ``FunctionConfig.arn``), not the source's: AWS allows cross-account queues."""
        m = _FUNCTION_REF.match(self.function_name)
        if m is None or m["partition"]:  # a full ARN (or unvalidated stored data)
            return self.function_name
        account = m["partial_account"] or account
        qualifier = f":{m['qualifier']}" if m["qualifier"] else ""
        return f"arn:aws:lambda:{region}:{account}:function:{m['name']}{qualifier}"

    def arn(self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT) -> str:
        """``EventSourceMappingArn``: the mapping lives where the daemon's functions live."""
        return f"arn:aws:lambda:{region}:{account}:event-source-mapping:{self.uuid}"

    def to_aws(
        self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT
    ) -> dict[str, Any]:
        """The AWS response shape (``EventSourceMappingConfiguration``).

        Only fields that apply to the source kind appear, as with AWS (no stream
        fields for SQS). ``EventSourceArn`` is the source's ``display_uri``: the
        queue ARN for SQS whatever form was given, never a password.
        """
        kind = self.kind
        out: dict[str, Any] = {"UUID": self.uuid}
        for p in PARAMETERS:
            if not p.in_aws or kind not in p.kinds:
                continue
            value = getattr(self, p.snake_name)
            if p.snake_name == "event_source_arn":
                value = self.source.display_uri
            elif p.snake_name == "destination_config" and value is None:
                value = {"OnFailure": {}}  # what AWS shows for a stream without a destination
            elif p.snake_name == "starting_position_timestamp" and value is not None:
                value = _iso(value)
            if value is None:
                continue
            value = copy.deepcopy(value)
            if p.aws_container:
                out.setdefault(p.aws_container, {})[p.aws_name] = value
            else:
                out[p.aws_name] = value
        if kind == KIND_KAFKA:
            out["SelfManagedEventSource"] = {
                "Endpoints": {"KAFKA_BOOTSTRAP_SERVERS": list(self.source.bootstrap_servers)}
            }
        out["FunctionArn"] = self.function_arn(region=region, account=account)
        out["LastModified"] = _iso(self.last_modified)
        out["LastProcessingResult"] = self.last_processing_result
        out["State"] = self.state
        out["StateTransitionReason"] = self.state_transition_reason
        out["EventSourceMappingArn"] = self.arn(region=region, account=account)
        return out

    def to_params(self) -> dict[str, Any]:
        """The snake_case parameters that would recreate this mapping (enabled included)."""
        params = {
            p.snake_name: copy.deepcopy(getattr(self, p.snake_name))
            for p in PARAMETERS
            if p.snake_name != "enabled"
        }
        params["enabled"] = self.enabled
        return params

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serializable, for the registry; ``from_dict`` reverses it.

        Holds the raw source URI, credentials included (the runner needs them):
        show ``to_aws()`` to people, never this.
        """
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mapping:
        """Rebuild a stored mapping. Not re-validated: rules may tighten after it was stored,
        and a registry must still load. Unknown keys mean corruption or a newer writer."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MappingError(
                f"Stored mapping has unknown field(s) {sorted(unknown)!r}; "
                f"known: {', '.join(sorted(names))}."
            )
        missing = [n for n in ("uuid", "function_name", "event_source_arn") if n not in data]
        if missing:
            raise MappingError(f"Stored mapping lacks required field(s) {missing!r}.")
        state = data.get("state", STATE_ENABLED)
        if state not in STATES:
            raise MappingError(
                f"Stored mapping has invalid state {state!r} (valid: {', '.join(STATES)})."
            )
        values = copy.deepcopy(data)
        if values.get("last_modified") is not None:
            values["last_modified"] = float(values["last_modified"])
        return cls(**values)

    def with_state(
        self, state: str, reason: str | None = None, *, now: float | None = None
    ) -> Mapping:
        """A copy in ``state`` (e.g. the daemon's Creating -> Enabled), optionally with a reason."""
        if state not in STATES:
            raise MappingError(f"Invalid state {state!r} (valid: {', '.join(STATES)}).")
        return dataclasses.replace(
            self,
            state=state,
            state_transition_reason=reason if reason is not None else self.state_transition_reason,
            last_modified=time.time() if now is None else now,
        )

    def with_processing_result(self, result: str) -> Mapping:
        return dataclasses.replace(self, last_processing_result=result)


# --------------------------------------------------------------------------- create / update


def _user_reason(kind: str) -> str:
    return REASON_USER_QUEUE if kind in QUEUE_KINDS else REASON_USER_STREAM


def _check_keys(params: dict[str, Any]) -> None:
    if not isinstance(params, dict):
        raise MappingError(
            f"Mapping parameters must be a mapping of names to values; got {params!r}."
        )
    for key in params:
        if key not in PARAMETERS_BY_NAME:
            raise MappingError(
                f"Unknown mapping parameter {key!r}; valid parameters: "
                f"{', '.join(PARAMETERS_BY_NAME)}."
            )


def _resolve(
    params: dict[str, Any],
    *,
    uuid: str,
    now: float,
    validate_filters: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, Any], EventSource]:
    """Validate snake_case params and return every parameter's value with defaults applied."""
    _check_keys(params)
    source_uri = params.get("event_source_arn")
    if source_uri is None:
        raise _validation("eventSourceArn", None, "Member must not be null.", "EventSourceArn")
    if not isinstance(source_uri, str):
        raise _type_error(PARAMETERS_BY_NAME["event_source_arn"], "a string", source_uri)
    source = parse_event_source(source_uri)
    ctx = _Context(source=source, now=now, uuid=uuid, validate_filters=validate_filters)
    values: dict[str, Any] = {"event_source_arn": source_uri}
    for p in PARAMETERS:
        if p.snake_name == "event_source_arn":
            continue
        raw = params.get(p.snake_name)
        value = None
        if raw is not None:
            if not p.applies_to(source.kind):
                raise _unsupported(p, raw, source.kind)
            value = _normalize(p, raw, ctx)
        if value is None:
            value = p.default_for(source.kind)
        if value is None and source.kind in p.required_kinds:
            raise _validation(p.member, None, "Member must not be null.", p.aws_name)
        values[p.snake_name] = value
    for kinds, rule in _RULES:
        if source.kind in kinds:
            rule(values, ctx)
    return values, source


def _build(
    values: dict[str, Any],
    *,
    uuid: str,
    now: float,
    state: str,
    reason: str,
    last_processing_result: str,
) -> Mapping:
    fields = {k: v for k, v in values.items() if k != "enabled"}
    return Mapping(
        uuid=uuid,
        state=state,
        state_transition_reason=reason,
        last_modified=now,
        last_processing_result=last_processing_result,
        **fields,
    )


_UUID = re.compile(r"^[0-9a-fA-F-]{36}$")


def create_mapping(
    params: dict[str, Any],
    *,
    uuid: str | None = None,
    now: float | None = None,
    validate_filters: Callable[[dict[str, Any]], None] | None = None,
) -> Mapping:
    """Validate snake_case ``params`` (the config-file form) and build a new mapping.

    A key set to None counts as not given. ``validate_filters`` is called with
    the FilterCriteria dict for deep pattern checks; a ``ValueError`` it raises
    becomes ``Invalid filter pattern definition.``.
    """
    if uuid is None:
        uuid = str(uuid_module.uuid4())
    elif not _UUID.match(uuid):
        raise MappingError(f"UUID must be 36 characters of hex digits and '-'; got {uuid!r}.")
    now = time.time() if now is None else now
    values, source = _resolve(params, uuid=uuid, now=now, validate_filters=validate_filters)
    return _build(
        values,
        uuid=uuid,
        now=now,
        state=STATE_ENABLED if values["enabled"] else STATE_DISABLED,
        reason=_user_reason(source.kind),
        last_processing_result=NO_RECORDS_PROCESSED,
    )


def update_mapping(
    m: Mapping,
    changes: dict[str, Any],
    *,
    now: float | None = None,
    validate_filters: Callable[[dict[str, Any]], None] | None = None,
) -> Mapping:
    """Apply ``changes`` (snake_case) to ``m`` and validate the merged result.

    A key set to None resets that parameter to its default for the kind; ``{}``
    removes a ScalingConfig/FilterCriteria/DestinationConfig. Create-only
    parameters may be repeated with their current value (so a whole config block
    can be re-applied) but not changed. ``enabled`` moves the state to
    Enabled/Disabled; otherwise the state is kept.
    """
    _check_keys(changes)
    if m.state == STATE_DELETING:
        raise MappingError(
            f"Cannot update the event source mapping {m.uuid} because it is being deleted.",
            code=IN_USE,
        )
    current = m.to_params()
    for key, value in changes.items():
        p = PARAMETERS_BY_NAME[key]
        if (
            p.create_only
            and value != current[key]
            and not (
                key == "starting_position_timestamp" and _same_timestamp(p, value, current[key])
            )
        ):
            raise MappingError(
                f"{p.aws_name} can only be set when the mapping is created (current: "
                f"{_redact(str(current[key])) if current[key] is not None else 'unset'}, "
                f"requested: {_redact(str(value))}); delete and recreate the mapping to change it.",
                parameter=p.aws_name,
            )
    merged = {**current, **changes}
    now = time.time() if now is None else now
    values, source = _resolve(merged, uuid=m.uuid, now=now, validate_filters=validate_filters)
    state, reason = m.state, m.state_transition_reason
    if changes.get("enabled") is not None:
        state = STATE_ENABLED if values["enabled"] else STATE_DISABLED
        reason = _user_reason(source.kind)
    return _build(
        values,
        uuid=m.uuid,
        now=now,
        state=state,
        reason=reason,
        last_processing_result=m.last_processing_result,
    )


def _same_timestamp(p: Parameter, value: Any, current: float | None) -> bool:
    if value is None or current is None:
        return value is current
    try:
        return _to_epoch(p, value) == current
    except MappingError:
        return False


# --------------------------------------------------------------------------- duplicates


def _function_key(function_name: str) -> tuple[str, str | None]:
    # "fn" and "arn:...:function:fn" are the same function; the qualifier matters.
    m = _FUNCTION_REF.match(function_name)
    return (m["name"], m["qualifier"]) if m else (function_name, None)


def duplicate_error(existing: Mapping, new: Mapping) -> MappingError | None:
    """The 409 AWS returns when ``new`` maps the same source to the same function as
    ``existing`` (or reuses its config-file ``name``); None when they may coexist."""
    if existing.uuid == new.uuid:
        return None
    if existing.name is not None and existing.name == new.name:
        return MappingError(
            f"A mapping named {new.name!r} already exists. Please update or delete the existing "
            f"mapping with UUID {existing.uuid}",
            code=CONFLICT,
        )
    if _function_key(existing.function_name) != _function_key(new.function_name):
        return None
    old_src, new_src = existing.source, new.source
    if old_src.kind != new_src.kind:
        return None
    if new_src.kind == KIND_KAFKA:
        old_topics, new_topics = set(existing.topics or ()), set(new.topics or ())
        if not (
            set(old_src.bootstrap_servers) & set(new_src.bootstrap_servers)
            and old_topics & new_topics
        ):
            return None
        return MappingError(
            f'An event source mapping with event source ("{",".join(new_src.bootstrap_servers)}"), '
            f'function ("{new.function_arn()}"), topics ("{",".join(new.topics or ())}") already '
            f"exists. Please update or delete the existing mapping with UUID {existing.uuid}",
            code=CONFLICT,
        )
    if old_src.identity != new_src.identity:
        return None
    if new_src.is_queue:
        label = "SQS" if new_src.kind == KIND_SQS else new_src.kind
        return MappingError(
            f'An event source mapping with {label} arn (" {old_src.display_uri} ") and function '
            f'(" {new.function_name} ") already exists. Please update or delete the existing '
            f"mapping with UUID {existing.uuid}",
            code=CONFLICT,
        )
    return MappingError(
        f'The event source arn (" {old_src.display_uri} ") and function (" {new.function_name} ") '
        f"provided mapping already exists. Please update or delete the existing mapping with "
        f"UUID {existing.uuid}",
        code=CONFLICT,
    )
