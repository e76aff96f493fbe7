"""What the engine needs from a source. Sources do I/O only: they never decide to retry, split,
drop or dead-letter; the engine calls these methods when it has decided."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


class Message:
    """One queue message as the engine sees it.

    Its §7.1 record comes as a dict (``record``), as JSON (``encoded``) or both; the other is
    derived on first use. The engine puts ``encoded`` into the event, so a source that builds
    the JSON directly skips a dict per message on the hot path, and one that encoded the dict
    to measure it hands the bytes over instead of having them encoded again.
    """

    __slots__ = ("_encoded", "_record", "body", "extra", "group", "id", "receipt",
                 "receive_count", "size")

    def __init__(
        self,
        id: str,  # messageId: what batchItemFailures' itemIdentifier names
        receipt: str,  # the handle delete/change_visibility need (SQS receipt, Redis entry id)
        body: str,
        receive_count: int,  # ApproximateReceiveCount, including this receive
        record: dict[str, Any] | None,
        size: int,  # encoded size of the record in bytes (6 MB cap); an upper bound is fine
        group: str | None = None,  # FIFO message group, if any
        extra: dict[str, Any] | None = None,  # source-private bookkeeping
        encoded: bytes | None = None,
    ) -> None:
        if record is None and encoded is None:
            raise ValueError("a Message needs its record, encoded or as a dict")
        self.id = id
        self.receipt = receipt
        self.body = body
        self.receive_count = receive_count
        self._record = record
        self.size = size
        self.group = group
        self.extra = extra
        self._encoded = encoded

    @property
    def record(self) -> dict[str, Any]:
        """The full SQS-shaped record that goes into the event (§7.1)."""
        if self._record is None:
            self._record = _decode_json(self._encoded)
        return self._record

    @property
    def encoded(self) -> bytes:
        """The record as compact JSON, exactly as it goes into the event."""
        if self._encoded is None:
            self._encoded = _encode_json(self._record)
        return self._encoded

    def __repr__(self) -> str:
        return (f"Message(id={self.id!r}, receipt={self.receipt!r}, "
                f"receive_count={self.receive_count}, size={self.size})")


@dataclass(slots=True, frozen=True)
class Depth:
    visible: int  # waiting to be received
    in_flight: int  # received, not yet deleted (hidden by the visibility timeout)

    @property
    def backlog(self) -> int:
        return self.visible + self.in_flight


class SourceError(Exception):
    """The service failed in a way a person should see (bad queue name, auth, unreachable).

    ``retryable`` says whether trying again later may work (a restart, a network blip) or whether
    the mapping's configuration must change first.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class QueueSource(Protocol):
    """A queue (SQS-like) the engine polls. One instance per mapping runner."""

    # True where the service moves messages to a dead-letter queue itself (SQS redrive policy);
    # the engine then never calls dead_letter().
    native_redrive: bool
    # Seconds a received message stays hidden; known after start().
    visibility_timeout_s: float
    # Receives after which the engine dead-letters a message (None: never); sources without
    # native redrive only.
    max_receive_count: int | None
    # Most messages one receive() call can return (10 for SQS).
    max_receive_batch: int
    # FIFO queue: the service keeps one batch in flight per message group.
    fifo: bool

    async def start(self) -> None:
        """Connect, check the queue exists, read its attributes. Raises SourceError."""

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages, waiting up to wait_s for the first to arrive."""

    async def delete(self, messages: list[Message]) -> None:
        """Acknowledge: the messages are done and must not come back."""

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        """Hide the messages for timeout_s more seconds from now (the heartbeat)."""

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Move the messages to the dead-letter target with the reason, atomically per message:
        a crash part-way must neither lose nor duplicate one."""

    async def depth(self) -> Depth:
        """Visible and in-flight counts, for scaling and metrics."""

    async def close(self) -> None:
        """Release connections. Unsettled messages simply reappear after their visibility."""


class QueueSender(Protocol):
    """Putting messages on a queue: `poller send` and the tests. start() before send()."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(
        self,
        bodies: list[str],
        *,
        delay_s: int = 0,
        group: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> int:
        """Enqueue the bodies (in service-sized chunks); returns how many were accepted."""
