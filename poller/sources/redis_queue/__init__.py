"""``redis-queue://``: a Redis stream read through a consumer group, with SQS semantics.

The adapter is in ``queue.py`` (its docstring says how SQS maps onto a consumer group); this
module is what the rest of poller needs to know about the kind: its URI and options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from poller.sources.base import (
    AwsDefaults,
    Family,
    SourceContext,
    SourceKind,
    SourceOption,
    SourceSpec,
    options_table,
    parse_options,
    uri_error,
)
from poller.sources.redis_connection import RedisAddress, credentials, parse_redis_uri

if TYPE_CHECKING:
    from poller.sources.redis_queue.dead_letters import RedisDeadLetters
    from poller.sources.redis_queue.queue import RedisQueue

OPTIONS: Final = options_table(
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
        "stream key that receives entries past max_receive_count (default STREAM_KEY:dlq)",
    ),
    SourceOption("tls", "bool", False, "connect with TLS"),
    # "$" (only entries added after the group is created) is Lambda's LATEST; "0" makes a new
    # group see what the stream already holds.
    SourceOption("start", "choice", "$", "where a new consumer group starts", choices=("0", "$")),
    SourceOption(
        "delete_on_ack", "bool", False, "XDEL entries after XACK so the stream stays short"
    ),
)


@dataclass(frozen=True, kw_only=True)
class RedisQueueSpec(SourceSpec):
    address: RedisAddress
    stream_key: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.stream_key

    @property
    def identity(self) -> tuple[Any, ...]:
        # Two consumer groups on one stream are two independent queues.
        a = self.address
        return ("redis-queue", a.host, a.port, a.db, self.stream_key, self.options["group"])

    @property
    def has_credentials(self) -> bool:
        return self.address.password is not None


def parse(uri: str, defaults: AwsDefaults) -> RedisQueueSpec:
    address, path, query, display = parse_redis_uri(uri, "redis-queue")
    key = unquote(path)
    options = parse_options(uri, query, OPTIONS, "redis-queue")
    if options["dead_letter"] is not None and options["max_receive_count"] is None:
        raise uri_error(
            uri, "Option dead_letter needs max_receive_count (as an SQS redrive policy)"
        )
    if options["dead_letter"] == key:
        raise uri_error(uri, "Option dead_letter must differ from the source stream key")
    return RedisQueueSpec(
        uri=uri, display_uri=display, address=address, stream_key=key, options=options
    )


def open_queue(spec: RedisQueueSpec, context: SourceContext) -> RedisQueue:
    """The queue for a mapping (its consumer group defaults to the mapping's UUID, as Lambda
    names a Kafka mapping's group), or for a sender (which never creates a group)."""
    from poller.sources.redis_queue.queue import DEFAULT_GROUP, RedisQueue

    options = spec.options
    tls = bool(options["tls"])
    return RedisQueue(
        spec.stream_key,
        address=spec.address,
        login=credentials(spec.address, tls, context.config.redis, spec.display_uri),
        tls=tls,
        group=options["group"] or context.mapping_uuid or DEFAULT_GROUP,
        visibility_timeout_s=options["visibility_timeout"],
        max_receive_count=options["max_receive_count"],
        dead_letter=options["dead_letter"],
        start_id=options["start"],
        delete_on_ack=bool(options["delete_on_ack"]),
        display_uri=spec.display_uri,
        reader=context.mapping_uuid is not None,
        log=context.log,
    )


def open_dead_letters(spec: RedisQueueSpec, context: SourceContext) -> RedisDeadLetters:
    """The stream the URI names (``STREAM_KEY:dlq`` for the default dead-letter stream of
    ``STREAM_KEY``), read and redriven without a consumer group."""
    from poller.sources.redis_queue.dead_letters import RedisDeadLetters

    tls = bool(spec.options["tls"])
    login = credentials(spec.address, tls, context.config.redis, spec.display_uri)
    return RedisDeadLetters(spec, login, tls)


SOURCE: Final = SourceKind(
    name="redis-queue",
    family=Family.QUEUE,
    forms=("redis-queue://[USER:PASSWORD@]HOST[:PORT][/DB]/STREAM_KEY[?OPTION=VALUE&...]",),
    parse=parse,
    open=open_queue,
    open_sender=open_queue,
    open_dead_letters=open_dead_letters,
    label="redis-queue",
)
