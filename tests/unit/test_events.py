"""Record shapes: the template path gives the same bytes as encoding the dict."""

from __future__ import annotations

import msgspec
import pytest

from poller.events import SqsRecordShape, envelope, sqs_event

BODIES = [
    "plain",
    'quote " and \\ back',
    "ünïcode ☃ 🎉",
    "ctrl \x01\n\t\x7f",
    "%s %b %%",
    "",
    "\u2028 line separator",
    "x" * 10_000,
]


@pytest.mark.parametrize(
    ("source", "arn", "region", "sender"),
    [
        ("poller:redis-queue", "redis-queue://127.0.0.1:6379/0/orders", "local", "AIDAPOLLERLOCAL"),
        # Constants with characters that are special to JSON or to %-formatting.
        ('odd "src"', "redis-queue://h/0/a%40b?x=%s", "ré\\gion", "sender%d"),
    ],
)
def test_encode_plain_matches_the_encoded_dict(
    source: str, arn: str, region: str, sender: str
) -> None:
    shape = SqsRecordShape(source, arn, region, sender)
    for body in BODIES:
        record = shape.record(
            "1700000000000-7",
            "1700000000000-7",
            body,
            "3",
            "1700000000000",
            "1700000000123",
            "d41d8cd98f00b204e9800998ecf8427e",
        )
        encoded = shape.encode_plain(
            b"1700000000000-7",
            b"1700000000000-7",
            body,
            b"3",
            b"1700000000000",
            b"1700000000123",
            b"d41d8cd98f00b204e9800998ecf8427e",
        )
        assert encoded == msgspec.json.encode(record), body
        assert msgspec.json.decode(encoded) == record


def test_sqs_event_matches_the_encoded_dict() -> None:
    shape = SqsRecordShape("poller:local", "local://q", "local")
    records = [
        shape.record(str(i), f"r{i}", body, "1", "1", "2", "m") for i, body in enumerate(BODIES)
    ]
    parts = [msgspec.json.encode(r) for r in records]
    assert sqs_event(parts) == msgspec.json.encode({"Records": records})
    assert sqs_event([]) == msgspec.json.encode({"Records": []})


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_envelope_is_head_joined_records_tail(count: int) -> None:
    records = [b'{"n":%d}' % i for i in range(count)]
    assert envelope(b"<", records, b">") == b"<" + b",".join(records) + b">"
    assert records == [b'{"n":%d}' % i for i in range(count)]  # the caller's list is untouched
