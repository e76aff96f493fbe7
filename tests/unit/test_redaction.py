"""The one credential redactor: every shape of user info loses its password, nothing else."""

from __future__ import annotations

import pytest

from poller.redaction import redact


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:p@h:1/0", "redis://:***@h:1/0"),
        ("redis://bob@h:1/0", "redis://***@h:1/0"),
        # An unencoded '@' or '/' in a password must not leak a piece of it.
        ("rediss://u:p@w@h", "rediss://u:***@h"),
        ("redis-queue://u:pa/ss@h:6379/0/jobs", "redis-queue://u:***@h:6379/0/jobs"),
        ("redis-queue://u:s3cret@h/0/jobs?group=g", "redis-queue://u:***@h/0/jobs?group=g"),
        # Nothing to hide.
        ("redis://h:1/0", "redis://h:1/0"),
        ("unix:///tmp/r.sock?db=2", "unix:///tmp/r.sock?db=2"),
        ("local://orders", "local://orders"),
        ("arn:aws:sqs:us-east-1:123456789012:q", "arn:aws:sqs:us-east-1:123456789012:q"),
        # An '@' only in the query is not user info.
        ("kafka://b:9092/t?x=a@b", "kafka://b:9092/t?x=a@b"),
    ],
)
def test_redact(uri: str, shown: str) -> None:
    assert redact(uri) == shown
    assert "s3cret" not in redact(uri) and "pa/ss" not in redact(uri)
