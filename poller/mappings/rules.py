"""The rules across parameters (checked after defaults are applied) and across mappings (the
409 AWS returns for a second mapping of one source and function), ESM_SEMANTICS.md §1.7."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from poller.mappings.checks import FUNCTION_REF, iso
from poller.mappings.errors import CONFLICT, MSG_FIFO_WINDOW, MSG_QUEUE_WINDOW, MappingError
from poller.mappings.parameters import Context
from poller.sources.base import Family
from poller.sources.kafka import KafkaSpec
from poller.sources.kinds import runnable_kinds

if TYPE_CHECKING:
    from poller.mappings.model import Mapping

# --------------------------------------------------------------------------- cross-field rules
# Each rule sees the resolved values (defaults applied) and raises on a conflict.

Rule = Callable[[dict[str, Any], Context], None]


def _rule_starting_position(v: dict[str, Any], ctx: Context) -> None:
    # Whether the service has the position at all is the StartingPosition parameter's check.
    position = v["starting_position"]
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
            f"StartingPositionTimestamp cannot be in the future; got {iso(timestamp)}, "
            f"now is {iso(ctx.now)}.",
            parameter="StartingPositionTimestamp",
        )


def _rule_queue_batching(v: dict[str, Any], ctx: Context) -> None:
    batch_size, window = v["batch_size"], v["maximum_batching_window_in_seconds"]
    if ctx.source.fifo:
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


def _rule_kafka(v: dict[str, Any], ctx: Context) -> None:
    source = ctx.source
    assert isinstance(source, KafkaSpec)
    if v["topics"] is None:
        if not source.topics:
            raise MappingError(
                "Topics is required for Kafka event sources: name exactly one topic in the URI "
                "(kafka://HOST:PORT/TOPIC) or in topics.",
                parameter="Topics",
            )
        v["topics"] = list(source.topics)
    elif source.topics and v["topics"] != list(source.topics):
        raise MappingError(
            f"Topics {v['topics']!r} does not match the topic(s) {list(source.topics)!r} in the "
            "event source URI; give the topic in one place.",
            parameter="Topics",
        )
    destination = (v["destination_config"] or {}).get("OnFailure", {}).get("Destination", "")
    if destination.startswith("kafka://"):
        target = destination[len("kafka://") :]
        servers, _, topic = target.rpartition("/")
        same_cluster = not servers or bool(set(servers.split(",")) & set(source.bootstrap_servers))
        if same_cluster and topic in v["topics"]:
            # AWS's recursion prevention: failures must not be fed back to the source.
            raise MappingError(
                f"The on-failure destination topic {topic!r} must differ from the source topic.",
                parameter="DestinationConfig",
            )
    if v["consumer_group_id"] is None:
        # AWS picks a unique group per mapping; the mapping's UUID is unique.
        v["consumer_group_id"] = ctx.uuid


# (families the rule applies to, rule), checked in this order.
RULES: Final[tuple[tuple[frozenset[Family], Rule], ...]] = (
    (frozenset({Family.STREAM, Family.KAFKA}), _rule_starting_position),
    (frozenset({Family.QUEUE}), _rule_queue_batching),
    (frozenset({Family.KAFKA}), _rule_kafka),
)


# --------------------------------------------------------------------------- duplicates


def _function_key(function_name: str) -> tuple[str, str | None]:
    # "fn" and "arn:...:function:fn" are the same function; the qualifier matters.
    m = FUNCTION_REF.match(function_name)
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
    if old_src.kind is not new_src.kind:
        return None
    if isinstance(old_src, KafkaSpec) and isinstance(new_src, KafkaSpec):
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
    if new_src.kind.family is Family.QUEUE:
        return MappingError(
            f'An event source mapping with {new_src.kind.label} arn (" {old_src.display_uri} ") '
            f'and function (" {new.function_name} ") already exists. Please update or delete '
            f"the existing mapping with UUID {existing.uuid}",
            code=CONFLICT,
        )
    return MappingError(
        f'The event source arn (" {old_src.display_uri} ") and function (" {new.function_name} ") '
        f"provided mapping already exists. Please update or delete the existing mapping with "
        f"UUID {existing.uuid}",
        code=CONFLICT,
    )


def check_runnable(mapping: Mapping) -> None:
    """Refuse a mapping this version cannot run, naming its kind, rather than accept it and
    let the daemon fail on it."""
    kind = mapping.kind
    if not kind.runnable:
        supported = ", ".join(k.name for k in runnable_kinds())
        raise MappingError(
            f"{kind.label or kind.name} event sources are not supported by this version of "
            f"poller (it runs {supported}).",
            parameter="EventSourceArn",
        )
    why = mapping.source.unsupported
    if why is not None:
        raise MappingError(why, parameter="EventSourceArn")
