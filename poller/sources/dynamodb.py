"""Amazon DynamoDB Streams: the stream ARN of a table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from poller.sources.base import AwsDefaults, Family, SourceKind, SourceSpec, uri_error

_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws(?:-[a-z]+)*):dynamodb:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"table/(?P<table>[A-Za-z0-9_.-]{3,255})/stream/(?P<label>[^/\s]+)$"
)


@dataclass(frozen=True, kw_only=True)
class DynamoDbSpec(SourceSpec):
    region: str
    account: str
    partition: str
    table_name: str
    stream_label: str

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.table_name

    @property
    def identity(self) -> tuple[Any, ...]:
        return ("dynamodb", self.uri)


def parse(uri: str, defaults: AwsDefaults) -> DynamoDbSpec:
    m = _ARN.match(uri)
    if not m:
        raise uri_error(
            uri,
            "Invalid DynamoDB stream ARN (expected "
            "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL; a table ARN is not a "
            "stream)",
        )
    return DynamoDbSpec(
        uri=uri,
        display_uri=uri,
        region=m["region"],
        account=m["account"],
        partition=m["partition"],
        table_name=m["table"],
        stream_label=m["label"],
    )


SOURCE: Final = SourceKind(
    name="dynamodb",
    family=Family.STREAM,
    forms=("arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL",),
    parse=parse,
    # DynamoDB Streams have no AT_TIMESTAMP iterator.
    starting_positions=("TRIM_HORIZON", "LATEST"),
    standard_destinations_only=True,
    label="DynamoDB",
)
