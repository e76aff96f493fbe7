"""``redis-stream://``: Redis stream keys read in order, each key a shard, like a Kinesis stream.

No consumer group: the engine checkpoints the last entry id it settled per key, in the state
store. Records have Kinesis's shape (§7.2). The reader is in ``stream.py``; this module is what
the rest of poller needs to know about the kind.
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
    from poller.sources.redis_stream.stream import RedisStream

OPTIONS: Final = options_table(SourceOption("tls", "bool", False, "connect with TLS"))
MAX_KEYS: Final = 1000


@dataclass(frozen=True, kw_only=True)
class RedisStreamSpec(SourceSpec):
    address: RedisAddress
    keys: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return ",".join(self.keys)

    @property
    def identity(self) -> tuple[Any, ...]:
        a = self.address
        return ("redis-stream", a.host, a.port, a.db, frozenset(self.keys))

    @property
    def has_credentials(self) -> bool:
        return self.address.password is not None


def parse(uri: str, defaults: AwsDefaults) -> RedisStreamSpec:
    address, path, query, display = parse_redis_uri(uri, "redis-stream")
    # Split before decoding: a key may hold a comma written as %2C.
    keys = tuple(unquote(part) for part in path.split(","))
    if any(not key for key in keys):
        raise uri_error(uri, "Empty stream key in redis-stream URI (KEY[,KEY...])")
    if len(set(keys)) != len(keys):
        raise uri_error(uri, "A stream key is listed twice in redis-stream URI")
    if len(keys) > MAX_KEYS:
        raise uri_error(uri, f"Too many stream keys in redis-stream URI (at most {MAX_KEYS})")
    options = parse_options(uri, query, OPTIONS, "redis-stream")
    return RedisStreamSpec(
        uri=uri, display_uri=display, address=address, keys=keys, options=options
    )


def open_stream(spec: RedisStreamSpec, context: SourceContext) -> RedisStream:
    from poller.sources.redis_stream.stream import RedisStream

    tls = bool(spec.options["tls"])
    aws = context.config.aws
    return RedisStream(
        spec.keys,
        address=spec.address,
        login=credentials(spec.address, tls, context.config.redis, spec.display_uri),
        tls=tls,
        display_uri=spec.display_uri,
        region=aws.region,
        invoke_identity_arn=aws.invoke_identity_arn,
        log=context.log,
    )


SOURCE: Final = SourceKind(
    name="redis-stream",
    family=Family.STREAM,
    forms=("redis-stream://[USER:PASSWORD@]HOST[:PORT][/DB]/KEY[,KEY...][?tls=true]",),
    parse=parse,
    open=open_stream,
    open_sender=open_stream,
    label="redis-stream",
    record_shape="kinesis",
    filter_json_key="data",
)
