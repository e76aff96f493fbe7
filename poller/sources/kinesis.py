"""Amazon Kinesis Data Streams: the stream ARN (enhanced fan-out consumer ARNs parse too, so
they can be refused by name)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from poller.sources.base import AwsDefaults, Family, SourceKind, SourceSpec, uri_error

_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws(?:-[a-z]+)*):kinesis:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"stream/(?P<stream>[A-Za-z0-9_.-]{1,128})"
    r"(?:/consumer/(?P<consumer>[A-Za-z0-9_.-]{1,128})(?::\d+)?)?$"
)


@dataclass(frozen=True, kw_only=True)
class KinesisSpec(SourceSpec):
    region: str
    account: str
    partition: str
    stream_name: str
    stream_arn: str
    consumer_name: str | None = None  # enhanced fan-out only

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.stream_name

    @property
    def identity(self) -> tuple[Any, ...]:
        return ("kinesis", self.uri)


def parse(uri: str, defaults: AwsDefaults) -> KinesisSpec:
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


SOURCE: Final = SourceKind(
    name="kinesis",
    family=Family.STREAM,
    forms=("arn:aws:kinesis:REGION:ACCOUNT:stream/NAME",),
    parse=parse,
    label="Kinesis",
)
