"""Every ESM parameter: its names, type, range, per-family default and applicability, and the
checks beyond type and range (ESM_SEMANTICS.md §1.2-§1.4). Pure logic, no I/O."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from poller.mappings.checks import (
    check_consumer_group,
    check_destination_config,
    check_filter_criteria,
    check_function_name,
    check_name,
    check_record_age,
    check_response_types,
    check_scaling_config,
    check_starting_position,
    check_topics,
    to_epoch,
)
from poller.mappings.errors import (
    MSG_UNSUPPORTED_DESTINATION,
    MappingError,
    check_bounds,
    type_error,
    validation_error,
)
from poller.sources.base import STARTING_POSITIONS, Family, SourceKind, SourceSpec
from poller.sources.kinds import all_kinds

QUEUE: Final = frozenset({Family.QUEUE})
STREAM: Final = frozenset({Family.STREAM})
KAFKA: Final = frozenset({Family.KAFKA})
ORDERED: Final = STREAM | KAFKA
ALL: Final = QUEUE | ORDERED

# Kafka's default window is 500 ms, which the whole-second API field cannot hold: it is stored
# as None and this is the effective value.
KAFKA_DEFAULT_BATCHING_WINDOW_S: Final = 0.5

# Checks a FilterCriteria deeply (the engine's compiler: it is injected, the model does not
# import the engine): called with the criteria and ``json_data_key=`` the data key of the
# source's records that only takes object patterns; a ValueError it raises becomes AWS's
# "Invalid filter pattern definition.".
FilterValidator = Callable[..., object]


@dataclass
class Context:
    """What a parameter check may need besides the value itself."""

    source: SourceSpec
    now: float
    uuid: str
    validate_filters: FilterValidator | None


Check = Callable[["Parameter", Any, "Context"], Any]


@dataclass(frozen=True)
class Parameter:
    """One ESM parameter: names, type, range, per-family default and applicability.

    ``defaults`` maps a family to its default (families not listed default to None, i.e.
    unset). ``check`` validates shape beyond type/range/enum and returns the value to store
    (None = remove). ``unsupported_message`` is AWS's exact text for using the parameter on a
    source it does not apply to, where AWS has one.
    """

    aws_name: str
    snake_name: str
    type_name: str  # "str", "int", "bool", "list", "dict" or "timestamp"
    families: frozenset[Family]
    help: str
    defaults: MappingProxyType[Family, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] = ()
    required: frozenset[Family] = frozenset()
    create_only: bool = False
    in_aws: bool = True  # shown by Mapping.to_aws
    aws_container: str | None = None  # nested under this key in the AWS response
    unsupported_message: str | None = None
    check: Check | None = field(default=None, compare=False)
    # A narrower test than the family, where one kind lacks what its family has.
    applies: Callable[[SourceKind], bool] | None = field(default=None, compare=False)

    @property
    def member(self) -> str:
        """The lowerCamel name AWS's validation messages use (``batchSize``)."""
        return self.aws_name[0].lower() + self.aws_name[1:]

    @property
    def cli_name(self) -> str:
        return "--" + self.snake_name.replace("_", "-")

    def applies_to(self, kind: SourceKind) -> bool:
        return kind.family in self.families and (self.applies is None or self.applies(kind))

    def default_for(self, family: Family) -> Any:
        # Copy: a default list/dict must never be shared between mappings.
        return copy.deepcopy(self.defaults.get(family))

    def range_text(self) -> str:
        if self.enum:
            return " | ".join(self.enum)
        if self.minimum is not None or self.maximum is not None:
            return f"{self.minimum}..{self.maximum}"
        return ""


def _per_family(*pairs: tuple[frozenset[Family], Any]) -> MappingProxyType[Family, Any]:
    table: dict[Family, Any] = {}
    for families, value in pairs:
        for family in families:
            table[family] = value
    return MappingProxyType(table)


PARAMETERS: Final[tuple[Parameter, ...]] = (
    Parameter(
        "FunctionName",
        "function_name",
        "str",
        ALL,
        "function to invoke: a name, NAME:QUALIFIER or a function ARN",
        required=ALL,
        check=check_function_name,
    ),
    Parameter(
        "EventSourceArn",
        "event_source_arn",
        "str",
        ALL,
        "event source URI or ARN (see `poller mappings create --help`)",
        required=ALL,
        create_only=True,
    ),
    Parameter(
        "Enabled",
        "enabled",
        "bool",
        ALL,
        "false pauses polling and invocation",
        defaults=_per_family((ALL, True)),
        in_aws=False,
    ),
    Parameter(
        "Name",
        "name",
        "str",
        ALL,
        "stable name for a mapping declared in a config file (not an AWS parameter)",
        check=check_name,
    ),
    Parameter(
        "BatchSize",
        "batch_size",
        "int",
        ALL,
        "most records per invoke (FIFO queues: at most 10; queues: >10 needs a batching window)",
        defaults=_per_family((QUEUE, 10), (ORDERED, 100)),
        minimum=1,
        maximum=10000,
    ),
    Parameter(
        "MaximumBatchingWindowInSeconds",
        "maximum_batching_window_in_seconds",
        "int",
        ALL,
        "seconds to gather records before invoking (Kafka default: 500 ms)",
        # Kafka's 500 ms default is None here; see Mapping.batching_window_s.
        defaults=_per_family((QUEUE | STREAM, 0)),
        minimum=0,
        maximum=300,
    ),
    Parameter(
        "StartingPosition",
        "starting_position",
        "str",
        ORDERED,
        "where a new mapping starts reading (DynamoDB: no AT_TIMESTAMP)",
        enum=STARTING_POSITIONS,
        required=ORDERED,
        create_only=True,
        check=check_starting_position,
    ),
    Parameter(
        "StartingPositionTimestamp",
        "starting_position_timestamp",
        "timestamp",
        ORDERED,
        "with AT_TIMESTAMP: the time to start from (epoch seconds or ISO-8601; not in the future)",
        create_only=True,
        applies=lambda kind: "AT_TIMESTAMP" in kind.starting_positions,
    ),
    Parameter(
        "ParallelizationFactor",
        "parallelization_factor",
        "int",
        ORDERED,
        "concurrent batches per shard, records routed by partition key so each key's order "
        "holds (Kafka: per partition, by record key; an extension: Lambda has none for Kafka)",
        defaults=_per_family((ORDERED, 1)),
        minimum=1,
        maximum=10,
    ),
    Parameter(
        "FilterCriteria",
        "filter_criteria",
        "dict",
        ALL,
        '{"Filters": [{"Pattern": "<json>"}]}; {} removes the filters',
        check=check_filter_criteria,
    ),
    Parameter(
        "DestinationConfig",
        "destination_config",
        "dict",
        ORDERED,
        '{"OnFailure": {"Destination": "<arn>"}}; an empty Destination removes it',
        unsupported_message=MSG_UNSUPPORTED_DESTINATION,
        check=check_destination_config,
    ),
    Parameter(
        "Topics",
        "topics",
        "list",
        KAFKA,
        "exactly one Kafka topic (defaults to the topic in the kafka:// URI)",
        create_only=True,
        check=check_topics,
    ),
    Parameter(
        "ConsumerGroupId",
        "consumer_group_id",
        "str",
        KAFKA,
        "Kafka consumer group (defaults to the mapping UUID)",
        create_only=True,
        aws_container="SelfManagedKafkaEventSourceConfig",
        check=check_consumer_group,
    ),
    Parameter(
        "MaximumRecordAgeInSeconds",
        "maximum_record_age_in_seconds",
        "int",
        ORDERED,
        "discard records older than this (-1 = infinite; otherwise at least 60)",
        defaults=_per_family((ORDERED, -1)),
        minimum=-1,
        maximum=604800,
        check=check_record_age,
    ),
    Parameter(
        "BisectBatchOnFunctionError",
        "bisect_batch_on_function_error",
        "bool",
        ORDERED,
        "split a failing batch in two and retry each half",
        defaults=_per_family((ORDERED, False)),
    ),
    Parameter(
        "MaximumRetryAttempts",
        "maximum_retry_attempts",
        "int",
        ORDERED,
        "retries of a failing batch (-1 = until the records expire)",
        defaults=_per_family((ORDERED, -1)),
        minimum=-1,
        maximum=10000,
    ),
    Parameter(
        "TumblingWindowInSeconds",
        "tumbling_window_in_seconds",
        "int",
        STREAM,
        "tumbling window length (0 = no window)",
        defaults=_per_family((STREAM, 0)),
        minimum=0,
        maximum=900,
    ),
    Parameter(
        "FunctionResponseTypes",
        "function_response_types",
        "list",
        ALL,
        "[] or [ReportBatchItemFailures] (partial batch response)",
        defaults=_per_family((ALL, [])),
        check=check_response_types,
    ),
    Parameter(
        "ScalingConfig",
        "scaling_config",
        "dict",
        QUEUE,
        '{"MaximumConcurrency": 2..1000}; {} removes it',
        check=check_scaling_config,
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


def normalize(p: Parameter, value: Any, ctx: Context) -> Any:
    """Type, range, enum, then the parameter's own check; returns the value to store."""
    if p.type_name == "timestamp":
        value = to_epoch(p, value)
    else:
        accepts, expected = _TYPE_CHECKS[p.type_name]
        if not accepts(value):
            raise type_error(p.aws_name, expected, value)
    if p.type_name == "str" and not value:
        raise validation_error(
            p.member, value, "Member must have length greater than or equal to 1", p.aws_name
        )
    if p.type_name == "int":
        check_bounds(p.member, p.aws_name, value, p.minimum, p.maximum)
    if p.enum and value not in p.enum:
        raise validation_error(
            p.member,
            value,
            f"Member must satisfy enum value set: [{', '.join(p.enum)}]",
            p.aws_name,
        )
    if p.type_name == "list":
        value = list(value)
    return p.check(p, value, ctx) if p.check else value


def unsupported(p: Parameter, value: Any, source: SourceSpec) -> MappingError:
    kind = source.kind.name
    applies = ", ".join(k.name for k in all_kinds() if p.applies_to(k))
    detail = f"({p.aws_name}={value!r} applies to {applies} event sources, not {kind}.)"
    if p.unsupported_message:
        return MappingError(p.unsupported_message, detail=detail, parameter=p.aws_name)
    return MappingError(
        f"{p.aws_name} is not supported for {kind} event sources; it applies to {applies}. "
        f"Got {value!r}.",
        parameter=p.aws_name,
    )
