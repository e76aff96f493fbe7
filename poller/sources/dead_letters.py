"""Dead-letter targets a person can act on: look at what sits there (`poller dlq peek`) and move
it back to a source (`poller dlq redrive`).

A source module that can hold dead letters declares ``open_dead_letters`` in its
``SourceKind``; the object it opens satisfies ``DeadLetters``. A redrive moves each message
atomically (it is in the dead-letter target or in the source, never both, never neither,
whatever moment a crash picks), which is why a module only redrives to a source it can move to
in one operation: another queue in the same SQLite file, another stream on the same Redis
server, or SQS's own message move task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

if TYPE_CHECKING:
    from poller.sources.base import SourceSpec

# What poller adds to a message it dead-letters (local://, redis-queue://); a redrive drops
# them, so the message goes back as it was sent.
DEAD_LETTER_FIELDS: Final = frozenset(
    {
        "DeadLetterReason",
        "DeadLetterSourceQueue",
        "DeadLetterSourceId",
        "DeadLetterReceiveCount",
        "DeadLetterMessageGroupId",
    }
)

_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in a dead-letter target, as `poller dlq peek` shows it."""

    id: str
    body: str
    reason: str | None  # why it was given up on, where the target says
    receive_count: int | None  # receives (or invokes) before it was given up on
    source: str | None  # the queue or stream it came from, where the target says
    sent_ms: int | None = None  # when it was first sent, epoch milliseconds
    attributes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "MessageId": self.id,
            "Reason": self.reason,
            "ReceiveCount": self.receive_count,
            "Source": self.source,
            "SentTimestamp": self.sent_ms,
            "Attributes": self.attributes,
            "Body": self.body,
        }


class DeadLetters(Protocol):
    async def start(self) -> None:
        """Connect and check the target can be read. Raises SourceError."""

    async def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` messages, oldest first, without taking them out of the target."""

    async def redrive(self, to: SourceSpec, limit: int | None) -> int:
        """Move up to ``limit`` messages (None: every message there when the redrive
        starts) to ``to``, oldest first, each atomically; returns how many. Raises
        SourceError."""

    async def close(self) -> None: ...


def on_failure_details(body: str) -> tuple[str | None, int | None]:
    """The reason and invoke count of a stream's on-failure record (ESM_SEMANTICS.md §4.5)
    sent to a queue: (requestContext.condition, requestContext.approximateInvokeCount)."""
    if not body.startswith("{") or '"requestContext"' not in body:
        return None, None
    try:
        record = _decode(body)
    except msgspec.DecodeError:
        return None, None
    context = record.get("requestContext") if isinstance(record, dict) else None
    if not isinstance(context, dict):
        return None, None
    condition = context.get("condition")
    count = context.get("approximateInvokeCount")
    return (
        condition if isinstance(condition, str) else None,
        count if isinstance(count, int) else None,
    )


def as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
