"""Amazon DynamoDB Streams: a table's stream ARN, or ``dynamodb://TABLE`` for the table's
current stream (its LatestStreamArn, looked up when the mapping starts).

The adapter (aiobotocore, loaded only when a mapping opens the stream) is in ``stream.py``.
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
    from poller.sources.dynamodb.stream import DynamoDbStream

_TABLE = r"[A-Za-z0-9_.-]{3,255}"
_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws(?:-[a-z]+)*):dynamodb:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    rf"table/(?P<table>{_TABLE})/stream/(?P<label>[^/\s]+)$"
)
_TABLE_NAME: Final = re.compile(rf"^{_TABLE}$")
SCHEME: Final = "dynamodb://"


@dataclass(frozen=True, kw_only=True)
class DynamoDbSpec(SourceSpec):
    region: str
    account: str
    partition: str
    table_name: str
    # None for dynamodb://TABLE: whichever stream the table has when the mapping starts.
    stream_label: str | None

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.table_name

    @property
    def identity(self) -> tuple[Any, ...]:
        # dynamodb://TABLE is the same as the ARN of the table's stream.
        return ("dynamodb", self.region, self.account, self.table_name)

    @property
    def stream_arn(self) -> str | None:
        return None if self.stream_label is None else self.uri


def parse(uri: str, defaults: AwsDefaults) -> DynamoDbSpec:
    if uri[: len(SCHEME)].lower() == SCHEME:
        table = uri[len(SCHEME) :]
        if not _TABLE_NAME.match(table):
            raise uri_error(
                uri,
                "Invalid DynamoDB table name (expected dynamodb://TABLE, TABLE 3-255 letters, "
                "digits, '_', '.' or '-')",
            )
        return DynamoDbSpec(
            uri=uri,
            display_uri=f"{SCHEME}{table}",
            region=defaults.region,
            account=defaults.account,
            partition="aws",
            table_name=table,
            stream_label=None,
        )
    m = _ARN.match(uri)
    if not m:
        raise uri_error(
            uri,
            "Invalid DynamoDB stream ARN (expected "
            "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL, or dynamodb://TABLE for "
            "the table's current stream; a table ARN is not a stream)",
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


def open_stream(spec: DynamoDbSpec, context: SourceContext) -> DynamoDbStream:
    from poller.sources.dynamodb.stream import DynamoDbStream

    aws = context.config.aws
    return DynamoDbStream(spec, endpoint_url=aws.endpoint_url, profile=aws.profile, log=context.log)


SOURCE: Final = SourceKind(
    name="dynamodb",
    family=Family.STREAM,
    forms=("arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/LABEL", "dynamodb://TABLE"),
    parse=parse,
    open=open_stream,
    # DynamoDB Streams have no AT_TIMESTAMP iterator.
    starting_positions=("TRIM_HORIZON", "LATEST"),
    standard_destinations_only=True,
    label="DynamoDB",
    record_shape="dynamodb",
    filter_json_key="dynamodb",
)
