"""Lambda-compatible event and record shapes, per source (ESM_SEMANTICS.md §7)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def sqs_record(
    *,
    message_id: str,
    receipt_handle: str,
    body: str,
    receive_count: int,
    sent_ms: int,
    first_receive_ms: int,
    event_source: str,
    event_source_arn: str,
    region: str,
    sender_id: str = "AIDAPOLLERLOCAL",
    message_attributes: dict[str, dict[str, Any]] | None = None,
    extra_attributes: dict[str, str] | None = None,
    md5_of_body: str | None = None,
) -> dict[str, Any]:
    """One SQS record (§7.1). Timestamps are epoch-ms strings, as Lambda sends them."""
    attributes = {
        "ApproximateReceiveCount": str(receive_count),
        "SentTimestamp": str(sent_ms),
        "SenderId": sender_id,
        "ApproximateFirstReceiveTimestamp": str(first_receive_ms),
    }
    if extra_attributes:
        attributes.update(extra_attributes)
    return {
        "messageId": message_id,
        "receiptHandle": receipt_handle,
        "body": body,
        "attributes": attributes,
        "messageAttributes": message_attributes or {},
        "md5OfBody": md5_of_body or md5_hex(body),
        "eventSource": event_source,
        "eventSourceARN": event_source_arn,
        "awsRegion": region,
    }


def string_attribute(value: str) -> dict[str, Any]:
    """A messageAttributes entry for a string value (§7.1)."""
    return {
        "stringValue": value,
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "String",
    }


def record_size(record: dict[str, Any]) -> int:
    return len(_encode(record))


def encode_sqs_event(records: list[dict[str, Any]]) -> bytes:
    return _encode({"Records": records})
