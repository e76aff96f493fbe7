"""Amazon SQS (or anything speaking its API: moto, LocalStack, ElasticMQ), over aiobotocore.

The adapter is in ``queue.py``; this module is what the rest of poller needs to know about the
kind: the queue's ARN, URL and ``sqs://NAME`` forms, parsed into an ``SqsSpec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from poller.sources.base import (
    AwsDefaults,
    Family,
    SourceContext,
    SourceKind,
    SourceSpec,
    uri_error,
)

if TYPE_CHECKING:
    from poller.sources.sqs.dead_letters import SqsDeadLetters
    from poller.sources.sqs.queue import SqsQueue

_PARTITION = r"(?P<partition>aws(?:-[a-z]+)*)"
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+(?:\.fifo)?$")
_ARN: Final = re.compile(
    rf"^arn:{_PARTITION}:sqs:(?P<region>[a-z0-9-]+):(?P<account>\d{{12}}):(?P<name>[^:/]+)$"
)
_URL_ACCOUNT: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_URL_REGIONS: Final = (
    re.compile(r"^sqs\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\."),  # sqs.REGION.amazonaws.com
    re.compile(r"^(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.queue\."),  # legacy REGION.queue...
)


@dataclass(frozen=True, kw_only=True)
class SqsSpec(SourceSpec):
    queue_name: str
    region: str
    account: str
    partition: str
    arn: str
    queue_url: str | None = None  # only when the queue was given as a URL

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.queue_name

    @property
    def identity(self) -> tuple[Any, ...]:
        # A queue URL and the queue's ARN are the same queue.
        return ("sqs", self.region, self.account, self.queue_name)

    @property
    def fifo(self) -> bool:
        return self.queue_name.endswith(".fifo")


def _spec(
    uri: str, name: str, region: str, account: str, partition: str, queue_url: str | None
) -> SqsSpec:
    # SQS names: 1-80 chars of alphanumerics, '-' and '_', ".fifo" counted in.
    if not _NAME.match(name) or len(name) > 80:
        raise uri_error(
            uri,
            f"Invalid SQS queue name {name!r} (use 1-80 letters, digits, '-' or '_', "
            "optionally ending in '.fifo')",
        )
    arn = f"arn:{partition}:sqs:{region}:{account}:{name}"
    return SqsSpec(
        uri=uri,
        display_uri=arn,
        queue_name=name,
        region=region,
        account=account,
        partition=partition,
        arn=arn,
        queue_url=queue_url,
    )


def parse(uri: str, defaults: AwsDefaults) -> SqsSpec:
    """An SQS ARN, a queue URL, or ``sqs://NAME`` (region and account from ``defaults``)."""
    if uri.startswith("arn:"):
        m = _ARN.match(uri)
        if not m:
            raise uri_error(
                uri,
                "Invalid SQS queue ARN (expected arn:aws:sqs:REGION:ACCOUNT:NAME, ACCOUNT 12 "
                "digits)",
            )
        return _spec(uri, m["name"], m["region"], m["account"], m["partition"], None)
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "sqs":
        return _spec(uri, uri[len("sqs://") :], defaults.region, defaults.account, "aws", None)
    return _parse_url(uri, defaults.region)


def _parse_url(uri: str, default_region: str) -> SqsSpec:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port, which we want to report
    except ValueError:
        raise uri_error(uri, "Invalid host or port in SQS queue URL") from None
    segments = parts.path.strip("/").split("/")
    if not parts.hostname or len(segments) != 2 or parts.query or parts.fragment:
        raise uri_error(uri, "Invalid SQS queue URL (expected http(s)://HOST[:PORT]/ACCOUNT/NAME)")
    account, name = segments
    if not _URL_ACCOUNT.match(account):
        raise uri_error(uri, f"Invalid account {account!r} in SQS queue URL")
    host = parts.hostname
    region = default_region
    # AWS hosts (and LocalStack's sqs.REGION.localhost.localstack.cloud) carry the region; a
    # moto/ElasticMQ endpoint such as localhost:5000 does not.
    for pattern in _URL_REGIONS:
        found = pattern.match(host)
        if found:
            region = found["region"]
            break
    partition = "aws-cn" if host.endswith(".amazonaws.com.cn") else "aws"
    return _spec(uri, name, region, account, partition, uri)


def open_queue(spec: SqsSpec, context: SourceContext) -> SqsQueue:
    from poller.sources.sqs.queue import SqsQueue

    aws = context.config.aws
    return SqsQueue(
        queue_name=spec.queue_name,
        region=spec.region,
        account=spec.account,
        queue_url=spec.queue_url,
        endpoint_url=aws.endpoint_url,
        profile=aws.profile,
        arn=spec.arn,
        log=context.log,
    )


def open_dead_letters(spec: SqsSpec, context: SourceContext) -> SqsDeadLetters:
    from poller.sources.sqs.dead_letters import SqsDeadLetters

    return SqsDeadLetters(open_queue(spec, context))


SOURCE: Final = SourceKind(
    name="sqs",
    family=Family.QUEUE,
    forms=(
        "arn:aws:sqs:REGION:ACCOUNT:NAME",
        "https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (or any http(s)://HOST[:PORT]/ACCOUNT/NAME)",
        "sqs://NAME",
    ),
    parse=parse,
    open=open_queue,
    open_sender=open_queue,
    open_dead_letters=open_dead_letters,
    label="SQS",
)
