"""Amazon Kinesis Data Streams: a stream's ARN, or ``kinesis://NAME`` in the ``[aws]`` region.

The adapter (aiobotocore, loaded only when a mapping or `poller send` opens the stream) is in
``stream.py``; this module is what the rest of poller needs to know about the kind. Enhanced
fan-out consumer ARNs parse, so a mapping on one is refused by name rather than as an unknown
source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from poller.sources.base import (
    AwsDefaults,
    Family,
    SourceContext,
    SourceKind,
    SourceSpec,
    uri_error,
)

if TYPE_CHECKING:
    from poller.sources.kinesis.stream import KinesisStream

_STREAM_NAME = r"[A-Za-z0-9_.-]{1,128}"
_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws(?:-[a-z]+)*):kinesis:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    rf"stream/(?P<stream>{_STREAM_NAME})"
    r"(?:/consumer/(?P<consumer>[A-Za-z0-9_.-]{1,128})(?::\d+)?)?$"
)
_NAME: Final = re.compile(rf"^{_STREAM_NAME}$")
SCHEME: Final = "kinesis://"


@dataclass(frozen=True, kw_only=True)
class KinesisSpec(SourceSpec):
    region: str
    account: str
    partition: str
    stream_name: str
    stream_arn: str
    consumer_name: str | None = None  # enhanced fan-out only
    # Given as kinesis://NAME: the stream of that name in the credentials' account; its real ARN
    # is read from the service when the adapter starts.
    by_name: bool = False

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.stream_name

    @property
    def identity(self) -> tuple[Any, ...]:
        # kinesis://NAME and the stream's ARN are the same stream (a consumer of it is not).
        return ("kinesis", self.region, self.account, self.stream_name, self.consumer_name)

    @property
    def unsupported(self) -> str | None:
        if self.consumer_name is None:
            return None
        return (
            f"Kinesis enhanced fan-out consumers (ARN {self.uri}) are not supported yet: map the "
            f"stream itself ({self.stream_arn}); records are then read with GetRecords, sharing "
            "the shards' read throughput with other consumers."
        )


def parse(uri: str, defaults: AwsDefaults) -> KinesisSpec:
    if uri[: len(SCHEME)].lower() == SCHEME:
        name = uri[len(SCHEME) :]
        if not _NAME.match(name):
            raise uri_error(
                uri,
                "Invalid Kinesis stream name (expected kinesis://NAME, NAME 1-128 letters, "
                "digits, '_', '.' or '-')",
            )
        arn = f"arn:aws:kinesis:{defaults.region}:{defaults.account}:stream/{name}"
        return KinesisSpec(
            uri=uri,
            display_uri=arn,
            region=defaults.region,
            account=defaults.account,
            partition="aws",
            stream_name=name,
            stream_arn=arn,
            by_name=True,
        )
    m = _ARN.match(uri)
    if not m:
        raise uri_error(
            uri,
            "Invalid Kinesis ARN (expected arn:aws:kinesis:REGION:ACCOUNT:stream/NAME"
            "[/consumer/CONSUMER:TIMESTAMP])",
        )
    return KinesisSpec(
        uri=uri,
        display_uri=uri,
        region=m["region"],
        account=m["account"],
        partition=m["partition"],
        stream_name=m["stream"],
        stream_arn=f"arn:{m['partition']}:kinesis:{m['region']}:{m['account']}:stream/{m['stream']}",
        consumer_name=m["consumer"],
    )


def open_stream(spec: KinesisSpec, context: SourceContext) -> KinesisStream:
    from poller.sources.kinesis.stream import KinesisStream

    aws = context.config.aws
    return KinesisStream(
        spec,
        endpoint_url=aws.endpoint_url,
        profile=aws.profile,
        invoke_identity_arn=aws.invoke_identity_arn,
        log=context.log,
    )


SOURCE: Final = SourceKind(
    name="kinesis",
    family=Family.STREAM,
    forms=("arn:aws:kinesis:REGION:ACCOUNT:stream/NAME", "kinesis://NAME"),
    parse=parse,
    open=open_stream,
    open_sender=open_stream,
    label="Kinesis",
    record_shape="kinesis",
    filter_json_key="data",
)
