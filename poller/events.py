"""Lambda-compatible event and record shapes, per source (ESM_SEMANTICS.md §7)."""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


try:
    # CPython's own MD5. For message bodies of a few hundred bytes it costs half of OpenSSL's,
    # whose per-call context set-up dominates at that size; every record needs one (md5OfBody).
    from _md5 import md5
except ImportError:  # an interpreter built without it
    md5 = functools.partial(hashlib.md5, usedforsecurity=False)


def md5_hex(text: str) -> str:
    return md5(text.encode()).hexdigest()


DEFAULT_SENDER_ID = "AIDAPOLLERLOCAL"
# Every queue source's records say "aws:sqs", whatever queue is behind them, so handlers and
# libraries that check it (routing code, strict event models) run unchanged; the real origin
# is in eventSourceARN.
SQS_EVENT_SOURCE = "aws:sqs"


class SqsRecordShape:
    """The §7.1 record for one queue, with what is the same for all its records bound once.

    Sources build a record per message on the hot path; positional calls on a bound shape cost
    about half of a keyword call that repeats the constants.
    """

    __slots__ = ("event_source", "event_source_arn", "plain_template", "region", "sender_id")

    def __init__(
        self,
        event_source: str,
        event_source_arn: str,
        region: str,
        sender_id: str = DEFAULT_SENDER_ID,
    ) -> None:
        self.event_source = event_source
        self.event_source_arn = event_source_arn
        self.region = region
        self.sender_id = sender_id

        def literal(value: str) -> bytes:
            # A JSON string, with any "%" doubled so the template's own fields stay the only ones.
            return _encode(value).replace(b"%", b"%%")

        # The record without message attributes as JSON, byte for byte what encoding record()'s
        # dict gives, with the constants encoded once. Fields, in order: messageId,
        # receiptHandle, the body as a JSON string, ApproximateReceiveCount, SentTimestamp,
        # ApproximateFirstReceiveTimestamp, md5OfBody.
        self.plain_template = (
            b'{"messageId":"%b","receiptHandle":"%b","body":%b,"attributes":{'
            b'"ApproximateReceiveCount":"%b","SentTimestamp":"%b","SenderId":'
            + literal(sender_id)
            + b',"ApproximateFirstReceiveTimestamp":"%b"},"messageAttributes":{},'
            b'"md5OfBody":"%b","eventSource":'
            + literal(event_source)
            + b',"eventSourceARN":'
            + literal(event_source_arn)
            + b',"awsRegion":'
            + literal(region)
            + b"}"
        )

    def encode_plain(
        self,
        message_id: bytes,
        receipt_handle: bytes,
        body: str,
        receive_count: bytes,
        sent_ms: bytes,
        first_receive_ms: bytes,
        md5_of_body: bytes,
    ) -> bytes:
        """record() without message attributes, straight to JSON (no dict on the way).

        Every argument but the body must need no JSON escaping (IDs, digits, hex): sources
        whose IDs might need it build the dict instead. Hot loops use ``plain_template``
        directly, with the body passed through ``json_string``.
        """
        return self.plain_template % (
            message_id,
            receipt_handle,
            _encode(body),
            receive_count,
            sent_ms,
            first_receive_ms,
            md5_of_body,
        )

    def record(
        self,
        message_id: str,
        receipt_handle: str,
        body: str,
        receive_count: str,
        sent_ms: str,
        first_receive_ms: str,
        md5_of_body: str,
        message_attributes: dict[str, dict[str, Any]] | None = None,
        extra_attributes: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Timestamps and the count are strings already: Lambda sends them as strings."""
        attributes = {
            "ApproximateReceiveCount": receive_count,
            "SentTimestamp": sent_ms,
            "SenderId": self.sender_id,
            "ApproximateFirstReceiveTimestamp": first_receive_ms,
        }
        if extra_attributes:
            attributes.update(extra_attributes)
        return {
            "messageId": message_id,
            "receiptHandle": receipt_handle,
            "body": body,
            "attributes": attributes,
            "messageAttributes": message_attributes or {},
            "md5OfBody": md5_of_body,
            "eventSource": self.event_source,
            "eventSourceARN": self.event_source_arn,
            "awsRegion": self.region,
        }


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
    sender_id: str = DEFAULT_SENDER_ID,
    message_attributes: dict[str, dict[str, Any]] | None = None,
    extra_attributes: dict[str, str] | None = None,
    md5_of_body: str | None = None,
) -> dict[str, Any]:
    """One SQS record (§7.1), for callers off the hot path."""
    return SqsRecordShape(event_source, event_source_arn, region, sender_id).record(
        message_id,
        receipt_handle,
        body,
        str(receive_count),
        str(sent_ms),
        str(first_receive_ms),
        md5_of_body or md5_hex(body),
        message_attributes,
        extra_attributes,
    )


def string_attribute(value: str) -> dict[str, Any]:
    """A messageAttributes entry for a string value (§7.1)."""
    return {
        "stringValue": value,
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "String",
    }


def encode_record(record: dict[str, Any]) -> bytes:
    """A record as compact JSON, as it goes into the event (and counts for the 6 MB cap)."""
    return _encode(record)


json_string = _encode  # a str as a JSON string literal, quotes included


def envelope(head: bytes, records: list[bytes], tail: bytes) -> bytes:
    """``head + b",".join(records) + tail``, copying the records once.

    An event is up to 6 MB, and each ``+`` on it is one more copy of all of it (and one more
    allocation of its size): the ends go onto the first and last records instead, which are
    small.
    """
    if not records:
        return head + tail
    parts = list(records)
    parts[0] = head + parts[0]
    parts[-1] += tail
    return b",".join(parts)


def sqs_event(records: list[bytes]) -> bytes:
    """The event for encoded records: exactly what encoding {"Records": [dicts]} gives."""
    return envelope(b'{"Records":[', records, b"]}")


def binary_attribute(value: bytes) -> dict[str, Any]:
    """A messageAttributes entry for a binary value (§7.1)."""
    return {
        "binaryValue": base64.b64encode(value).decode("ascii"),
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "Binary",
    }


def md5_of_message_attributes(attributes: dict[str, dict[str, Any]]) -> str:
    """SQS's MD5OfMessageAttributes over Lambda-shaped attributes: per attribute, sorted by
    name, the length-prefixed name and data type, a transport byte (1 string, 2 binary) and the
    length-prefixed value; lengths are 4-byte big-endian."""
    digest = md5()
    for name in sorted(attributes):
        attribute = attributes[name]
        data_type = attribute["dataType"]
        for part in (name.encode(), data_type.encode()):
            digest.update(struct.pack(">I", len(part)) + part)
        if data_type == "Binary":
            value = base64.b64decode(attribute["binaryValue"])
            digest.update(b"\x02" + struct.pack(">I", len(value)) + value)
        else:
            value = attribute["stringValue"].encode()
            digest.update(b"\x01" + struct.pack(">I", len(value)) + value)
    return digest.hexdigest()


KINESIS_EVENT_SOURCE = "aws:kinesis"


class KinesisRecordShape:
    """The §7.2 record for one stream's records, with the constants bound once.

    Ordered sources build one per record on the hot path: the record goes straight to JSON
    through a template, byte for byte what encoding the equivalent dict gives.
    """

    __slots__ = ("_tail",)

    def __init__(self, event_source_arn: str, region: str, invoke_identity_arn: str) -> None:
        def literal(value: str) -> bytes:
            return _encode(value)

        self._tail = (
            b',"eventName":"aws:kinesis:record","invokeIdentityArn":'
            + literal(invoke_identity_arn)
            + b',"awsRegion":'
            + literal(region)
            + b',"eventSourceARN":'
            + literal(event_source_arn)
        )

    def shard_template(self, shard_id: str) -> bytes:
        """A %-template of the records of one shard, for the hot path; its slots, in order:
        the partition key as a JSON string, the sequence number, the data's base64, the
        arrival's seconds and milliseconds, the sequence number again (for the eventID, after
        ``SHARD:``), and more members (``extra`` of ``encode``). The sequence number must need
        no JSON escaping (digits, '-')."""
        event_id_head = _encode(shard_id + ":")[:-1].replace(b"%", b"%%")
        tail = self._tail.replace(b"%", b"%%")
        return (
            b'{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":%b,"sequenceNumber":"%b",'
            b'"data":"%b","approximateArrivalTimestamp":%b.%b},"eventSource":"aws:kinesis",'
            b'"eventVersion":"1.0","eventID":' + event_id_head + b'%b"' + tail + b"%b}"
        )

    def encode(
        self,
        event_id: str,
        partition_key: str,
        sequence: str,
        data: bytes,
        arrival_ms: int,
        extra: bytes = b"",
    ) -> bytes:
        """The record as JSON. ``data`` is the payload's base64 (ASCII); ``arrival_ms`` is
        written as epoch seconds with milliseconds; ``extra`` is more top-level members, each
        starting with a comma (already JSON)."""
        seconds, millis = divmod(arrival_ms, 1000)
        return (
            b'{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":%b,"sequenceNumber":%b,"data":"%b","approximateArrivalTimestamp":%d.%03d},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":%b%b%b}'
            % (
                _encode(partition_key),
                _encode(sequence),
                data,
                seconds,
                millis,
                _encode(event_id),
                self._tail,
                extra,
            )
        )


DYNAMODB_EVENT_SOURCE = "aws:dynamodb"
# The members of a record's "dynamodb" object, in the order Lambda's events have them (§7.3).
_DYNAMODB_MEMBERS = (
    "ApproximateCreationDateTime",
    "Keys",
    "NewImage",
    "OldImage",
    "SequenceNumber",
    "SizeBytes",
    "StreamViewType",
)


class DynamoDbRecordShape:
    """The §7.3 record for one DynamoDB stream's records, from what GetRecords returns (with
    binary attribute values still base64, as the service sent them)."""

    __slots__ = ("event_source_arn", "region")

    def __init__(self, event_source_arn: str, region: str) -> None:
        self.event_source_arn = event_source_arn
        self.region = region

    def record(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Lambda's record for one stream record: ``eventVersion`` "1.1" (what DynamoDB
        Streams writes today), ``ApproximateCreationDateTime`` in whole epoch seconds, and a
        ``userIdentity`` in Lambda's spelling on the records of TTL deletions only."""
        change = raw.get("dynamodb") or {}
        body: dict[str, Any] = {}
        created = change.get("ApproximateCreationDateTime")
        if created is not None:
            body["ApproximateCreationDateTime"] = int(created)
        for name in _DYNAMODB_MEMBERS[1:]:
            if name in change:
                body[name] = change[name]
        for name, value in change.items():  # members this version does not know yet
            if name not in body and name != "ApproximateCreationDateTime":
                body[name] = value
        record: dict[str, Any] = {
            "eventID": raw.get("eventID"),
            "eventVersion": "1.1",
            "eventName": raw.get("eventName"),
            "eventSource": DYNAMODB_EVENT_SOURCE,
            "awsRegion": raw.get("awsRegion") or self.region,
            "dynamodb": body,
            "eventSourceARN": self.event_source_arn,
        }
        identity = raw.get("userIdentity")
        if identity:
            record["userIdentity"] = {
                "type": identity.get("Type"),
                "principalId": identity.get("PrincipalId"),
            }
        return record


def invocation_record(
    *,
    request_id: str,
    function_arn: str,
    condition: str,
    invoke_count: int,
    function_error: str | None,
    invoked: bool,
    batch_info_key: str,
    batch_info: dict[str, Any],
    timestamp: str,
) -> dict[str, Any]:
    """The on-failure destination record of a stream batch that was given up on (§4.5).

    ``function_error`` is "Unhandled" when the function failed, None when it returned a
    partial failure; a batch never invoked (its records too old already) has no
    responseContext.
    """
    record: dict[str, Any] = {
        "requestContext": {
            "requestId": request_id,
            "functionArn": function_arn,
            "condition": condition,
            "approximateInvokeCount": invoke_count,
        }
    }
    if invoked:
        record["responseContext"] = {
            "statusCode": 200,
            "executedVersion": "$LATEST",
            "functionError": function_error,
        }
    record["version"] = "1.0"
    record["timestamp"] = timestamp
    record[batch_info_key] = batch_info
    return record
