"""The checks of ESM parameters beyond type and range: shapes of the nested structures,
names, timestamps, on-failure destinations (ESM_SEMANTICS.md §1.2, §1.5, §1.7)."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from poller.mappings.errors import (
    MSG_INVALID_FILTER,
    MSG_UNSUPPORTED_DESTINATION,
    MappingError,
    check_bounds,
    type_error,
    validation_error,
)
from poller.redaction import redact
from poller.sources.base import Family, SourceSpec, SourceUriError
from poller.sources.kafka import TOPIC as KAFKA_TOPIC
from poller.sources.kinds import parse_source

if TYPE_CHECKING:
    from poller.mappings.parameters import Context, Parameter

RESPONSE_TYPES = ("ReportBatchItemFailures",)


FUNCTION_REF = re.compile(
    r"^(?:arn:(?P<partition>aws[a-zA-Z-]*):lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):function:"
    r"|(?P<partial_account>\d{12}):function:)?"
    r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]{1,128}))?$"
)
_MAPPING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CONSUMER_GROUP = re.compile(r"^[a-zA-Z0-9\-/*:_+=.@]{1,200}$")


def check_function_name(p: Parameter, value: str, ctx: Context) -> str:
    if len(value) > 256:
        raise validation_error(
            p.member, value, "Member must have length less than or equal to 256", p.aws_name
        )
    if not FUNCTION_REF.match(value):
        raise MappingError(
            f"Invalid FunctionName {value!r}: use a function name (1-64 letters, digits, '-' or "
            "'_'), optionally with ':QUALIFIER', or a function ARN.",
            parameter=p.aws_name,
        )
    return value


def check_name(p: Parameter, value: str, ctx: Context) -> str:
    if not _MAPPING_NAME.match(value):
        raise MappingError(
            f"Invalid mapping name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            parameter=p.aws_name,
        )
    return value


def check_record_age(p: Parameter, value: int, ctx: Context) -> int:
    # 0..59 is inside the API's numeric range but AWS rejects it: 60 s is the
    # smallest age it accepts; -1 means infinite.
    if 0 <= value < 60:
        raise MappingError(
            "MaximumRecordAgeInSeconds must be -1 (infinite) or between 60 and 604800; "
            f"got {value}.",
            parameter=p.aws_name,
        )
    return value


def check_response_types(p: Parameter, value: list[Any], ctx: Context) -> list[str]:
    if len(value) > 1:
        raise validation_error(
            p.member, value, "Member must have length less than or equal to 1", p.aws_name
        )
    for item in value:
        if item not in RESPONSE_TYPES:
            raise validation_error(
                p.member,
                value,
                f"Member must satisfy enum value set: [{', '.join(RESPONSE_TYPES)}]",
                p.aws_name,
            )
    return list(value)


def check_filter_criteria(
    p: Parameter, value: dict[str, Any], ctx: Context
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
            ctx.validate_filters(
                copy.deepcopy(criteria), json_data_key=ctx.source.kind.filter_json_key
            )
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


def check_scaling_config(
    p: Parameter, value: dict[str, Any], ctx: Context
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
    check_bounds("scalingConfig.maximumConcurrency", p.aws_name, concurrency, 2, 1000)
    return {"MaximumConcurrency": concurrency}


_UNSENDABLE_ARN = re.compile(r"^arn:aws(?:-[a-z]+)*:(?P<service>sns|s3):")
DESTINATION_FORMS = (
    "an SQS queue ARN or URL, sqs://NAME, redis-queue://..., local://NAME, file://PATH, "
    "or kafka://TOPIC / kafka://HOST:PORT/TOPIC (Kafka sources)"
)


def check_destination_config(
    p: Parameter, value: dict[str, Any], ctx: Context
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
        raise validation_error(
            "destinationConfig.onFailure.destination",
            destination,
            "Member must have length less than or equal to 350",
            p.aws_name,
        )
    _check_destination_target(p, destination, ctx.source)
    return {"OnFailure": {"Destination": destination}}


def _check_destination_target(p: Parameter, destination: str, source: SourceSpec) -> None:
    def refuse(why: str) -> MappingError:
        return MappingError(
            f"Invalid DestinationConfig.OnFailure.Destination {redact(destination)!r}: {why}",
            parameter=p.aws_name,
        )

    if destination.startswith("file://"):
        if len(destination) == len("file://"):
            raise refuse("file:// needs a path (file:///var/lib/poller/failures.jsonl).")
        return
    if destination.startswith("kafka://"):
        if source.kind.family is not Family.KAFKA:
            raise refuse("a kafka:// destination needs a Kafka event source.")
        rest = destination[len("kafka://") :]
        if "/" in rest:  # kafka://HOST:PORT[,...]/TOPIC: a cluster of its own
            try:
                target = parse_source(destination)
            except SourceUriError as exc:
                raise refuse(str(exc)) from None
            if target.kind.family is not Family.KAFKA or len(getattr(target, "topics", ())) != 1:
                raise refuse("name exactly one topic: kafka://HOST:PORT/TOPIC.")
            return
        if not KAFKA_TOPIC.match(rest):
            raise refuse("invalid Kafka topic (1-249 letters, digits, '.', '_' or '-').")
        return
    unsendable = _UNSENDABLE_ARN.match(destination)
    if unsendable:
        raise refuse(
            f"{unsendable['service'].upper()} destinations are not supported by this version of "
            f"poller; use {DESTINATION_FORMS}."
        )
    try:
        target = parse_source(destination)
    except SourceUriError:
        raise refuse(f"use {DESTINATION_FORMS}.") from None
    if target.kind.family is not Family.QUEUE or target.kind.open_sender is None:
        raise refuse(f"a {target.kind.name} source is not a destination; use {DESTINATION_FORMS}.")
    if source.kind.standard_destinations_only and target.fifo:
        raise refuse(f"{source.kind.label} on-failure destinations must be standard queues.")


def check_topics(p: Parameter, value: list[Any], ctx: Context) -> list[str]:
    if len(value) != 1:
        raise MappingError(
            f"Topics must hold exactly 1 topic; got {len(value)}: {value!r}.", parameter=p.aws_name
        )
    topic = value[0]
    if not isinstance(topic, str) or not KAFKA_TOPIC.match(topic):
        raise MappingError(
            f"Invalid Kafka topic {topic!r} (1-249 letters, digits, '.', '_' or '-').",
            parameter=p.aws_name,
        )
    return [topic]


def check_starting_position(p: Parameter, value: str, ctx: Context) -> str:
    """A position the source's service has (DynamoDB Streams: no AT_TIMESTAMP), checked before
    StartingPositionTimestamp so AWS's message comes first."""
    kind = ctx.source.kind
    if value not in kind.starting_positions:
        raise MappingError(
            f"Unsupported starting position for arn type: {redact(ctx.source.uri)}",
            detail=f"(StartingPosition={value}; {kind.label} streams support "
            f"{' and '.join(kind.starting_positions)}.)",
            parameter=p.aws_name,
        )
    return value


def check_consumer_group(p: Parameter, value: str, ctx: Context) -> str:
    if not _CONSUMER_GROUP.match(value):
        raise MappingError(
            f"Invalid ConsumerGroupId {value!r} "
            "(1-200 characters of letters, digits and -/*:_+=.@).",
            parameter=p.aws_name,
        )
    return value


def to_epoch(p: Parameter, value: Any) -> float:
    if isinstance(value, bool):
        raise type_error(p.aws_name, "a timestamp (epoch seconds or ISO-8601)", value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise type_error(p.aws_name, "a timestamp (epoch seconds or ISO-8601)", value) from None
    if isinstance(value, datetime):
        # A timestamp without a zone is taken as UTC, as AWS does.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    raise type_error(p.aws_name, "a timestamp (epoch seconds or ISO-8601)", value)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()
