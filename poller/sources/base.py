"""What the engine needs from a source. Sources do I/O only: they never decide to retry, split,
drop or dead-letter; the engine calls these methods when it has decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Message:
    """One queue message as the engine sees it."""

    id: str  # messageId: what batchItemFailures' itemIdentifier names
    receipt: str  # the handle delete/change_visibility need (SQS receipt, Redis entry id, ...)
    body: str
    receive_count: int  # ApproximateReceiveCount, including this receive
    record: dict[str, Any]  # the full SQS-shaped record that goes into the event (§7.1)
    size: int  # encoded size of ``record`` in bytes (for the 6 MB cap), an upper bound is fine
    group: str | None = None  # FIFO message group, if any
    extra: dict[str, Any] = field(default_factory=dict)  # source-private bookkeeping


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
