"""Stream entries as §7.1 SQS records, the shape every queue source delivers.

An entry with a lone UTF-8 ``body`` field (what `poller send` writes) becomes a record whose
body is that field; anything else is still delivered, never dropped: a body that is not UTF-8
is base64-encoded, other fields become message attributes, and an entry without a ``body``
field gets the field map as JSON. The ``poller.bodyEncoding`` message attribute says which.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Final

import msgspec

from poller.events import (
    SQS_EVENT_SOURCE,
    SqsRecordShape,
    binary_attribute,
    json_string,
    md5,
    md5_of_message_attributes,
    string_attribute,
)
from poller.sources.base import Message

_encode_json = msgspec.json.Encoder().encode

BODY_FIELD: Final = b"body"
# Set on records whose body is not the entry's UTF-8 ``body`` field as stored.
BODY_ENCODING_ATTRIBUTE: Final = "poller.bodyEncoding"
ENCODING_BASE64: Final = "base64"  # body = base64 of the raw (non-UTF-8) ``body`` value
ENCODING_FIELDS_JSON: Final = "fields-json"  # no ``body`` field: body = the field map as JSON


def _text(value: bytes) -> str:
    # Field names and attribute values we cannot decode are still shown, never dropped.
    return value.decode("utf-8", "backslashreplace")


class RecordBuilder:
    """Messages for one queue's entries, with its record shape bound once."""

    __slots__ = ("_shape",)

    def __init__(self, display_uri: str, region: str) -> None:
        self._shape = SqsRecordShape(SQS_EVENT_SOURCE, display_uri, region)

    def first_deliveries(self, entries: list[list[Any]]) -> list[Message]:
        """Messages for entries XREADGROUP just delivered for the first time.

        The hot path: the loop is _message's fast case inlined, with everything it touches
        in locals, for the usual entry (a lone UTF-8 ``body`` field). The record goes straight
        to JSON through the shape's template; anything else goes through _message.
        """
        now_ms = int(time.time() * 1000)
        now = b"%d" % now_ms
        digest = md5
        json_body = json_string
        template = self._shape.plain_template
        slow = self.message
        messages: list[Message] = []
        append = messages.append
        for raw_id, fields in entries:
            if len(fields) != 2 or fields[0] != BODY_FIELD:
                append(slow(raw_id, fields, 1, now_ms))
                continue
            raw = fields[1]
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                append(slow(raw_id, fields, 1, now_ms))
                continue
            entry_id = raw_id.decode("ascii")
            encoded = template % (
                raw_id,
                raw_id,
                json_body(body),
                b"1",
                raw_id.partition(b"-")[0],
                now,
                digest(raw).hexdigest().encode("ascii"),
            )
            # Positional: half the cost of keywords here.
            append(Message(entry_id, entry_id, body, 1, None, len(encoded), None, None, encoded))
        return messages

    def message(
        self, raw_id: bytes, fields: list[bytes] | None, receive_count: int, now_ms: int
    ) -> Message:
        """The message and its §7.1 record for one entry."""
        entry_id = raw_id.decode("ascii")
        sent_ms = raw_id.partition(b"-")[0]
        attributes: dict[str, dict[str, Any]] | None = None
        if fields is not None and len(fields) == 2 and fields[0] == BODY_FIELD:
            # The common case: just a body.
            raw = fields[1]
            try:
                body = raw.decode("utf-8")
            except UnicodeDecodeError:
                body = base64.b64encode(raw).decode("ascii")
                raw = body.encode("ascii")
                attributes = {BODY_ENCODING_ATTRIBUTE: string_attribute(ENCODING_BASE64)}
        else:
            body, attributes = self._decode_fields(fields or [])
            raw = body.encode()
        # The PEL keeps only the last delivery time: for a redelivery the send time is the
        # closest bound we have for the first receive.
        first_receive = b"%d" % now_ms if receive_count <= 1 else sent_ms
        md5_of_body = md5(raw).hexdigest()
        if not attributes:
            encoded = self._shape.encode_plain(
                raw_id,
                raw_id,
                body,
                b"%d" % receive_count,
                sent_ms,
                first_receive,
                md5_of_body.encode("ascii"),
            )
            return Message(
                entry_id, entry_id, body, receive_count, None, len(encoded), encoded=encoded
            )
        record = self._shape.record(
            entry_id,
            entry_id,
            body,
            str(receive_count),
            sent_ms.decode("ascii"),
            first_receive.decode("ascii"),
            md5_of_body,
            attributes,
        )
        record["md5OfMessageAttributes"] = md5_of_message_attributes(attributes)
        encoded = _encode_json(record)
        return Message(
            entry_id, entry_id, body, receive_count, record, len(encoded), encoded=encoded
        )

    @staticmethod
    def _decode_fields(fields: list[bytes]) -> tuple[str, dict[str, dict[str, Any]]]:
        """Body and messageAttributes of an entry that is not a lone UTF-8 ``body``."""
        pairs = list(zip(fields[0::2], fields[1::2], strict=False))
        attributes: dict[str, dict[str, Any]] = {}
        raw_body: bytes | None = None
        for name, value in pairs:
            if name == BODY_FIELD:
                raw_body = value
                continue
            try:
                attributes[_text(name)] = string_attribute(value.decode("utf-8"))
            except UnicodeDecodeError:
                attributes[_text(name)] = binary_attribute(value)
        if raw_body is None:
            # Nothing to call the body: hand over every field so nothing is lost.
            body = _encode_json({_text(n): _text(v) for n, v in pairs}).decode()
            attributes[BODY_ENCODING_ATTRIBUTE] = string_attribute(ENCODING_FIELDS_JSON)
            return body, attributes
        try:
            return raw_body.decode("utf-8"), attributes
        except UnicodeDecodeError:
            attributes[BODY_ENCODING_ATTRIBUTE] = string_attribute(ENCODING_BASE64)
            return base64.b64encode(raw_body).decode("ascii"), attributes
