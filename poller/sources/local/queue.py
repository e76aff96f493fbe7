"""``local://NAME``: a durable development queue kept in the SQLite state file.

It behaves like SQS where the engine can tell: visibility timeout and redelivery with an
incrementing receive count, receipts that go stale on redelivery, delays, long polling, FIFO
queues (a ``.fifo`` suffix) with per-group order and one in-flight batch per group, and
dead-lettering (done by the engine: there is no native redrive). The records are §7.1 SQS
records with ``eventSource`` "aws:sqs", as Lambda sends them, and the queue's URI as
``eventSourceARN``.

Every operation is one short transaction on the store's thread. A receive takes the write lock
(``BEGIN IMMEDIATE``) before it selects, so two receivers, even in two processes, never get the
same message.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from poller.events import (
    SQS_EVENT_SOURCE,
    SqsRecordShape,
    encode_record,
    md5_hex,
    md5_of_message_attributes,
    string_attribute,
)
from poller.sources.base import Depth, Message, SourceError
from poller.sources.local import DEFAULT_MAX_RECEIVE_COUNT, DEFAULT_VISIBILITY_TIMEOUT_S
from poller.sources.local.sql import (
    COLUMNS,
    change_visibility,
    dead_letter,
    delete,
    depth,
    fifo_candidates,
    insert,
    marks,
    noop,
    peek,
    purge,
    receipt_keys,
)
from poller.sources.local.wakeups import notify, register, unregister
from poller.state.base import StateError
from poller.state.sqlite import SqliteStore, immediate

_encode = msgspec.json.Encoder().encode
_decode_attributes = msgspec.json.Decoder(dict[str, str]).decode

MAX_BODY_BYTES: Final = 1_048_576  # SQS's limit, so code tested locally fits real queues
MAX_DELAY_S: Final = 900  # SQS DelaySeconds maximum
SEND_CHUNK: Final = 1000  # rows per insert transaction: bounds how long a send holds the lock
# Long polling re-checks the table (other processes' sends) this often, growing while idle;
# same-process sends wake receivers at once.
POLL_FIRST_S: Final = 0.02
POLL_MAX_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class PeekedMessage:
    """A message as `peek()` lists it: nothing is received, nothing changes."""

    id: str
    body: str
    attributes: dict[str, str]
    receive_count: int
    sent_ms: int
    group: str | None


class LocalQueue:
    """A local queue: a QueueSource (for a mapping runner) and a QueueSender (`poller send`)."""

    native_redrive = False

    def __init__(
        self,
        store: SqliteStore,
        name: str,
        *,
        visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
        max_receive_count: int | None = DEFAULT_MAX_RECEIVE_COUNT,
        dead_letter: str | None = None,
        region: str = "local",
        clock: Callable[[], float] = time.time,
    ) -> None:
        name = name.removeprefix("local://")
        if not name:
            raise SourceError("a local queue needs a name (local://NAME)", retryable=False)
        self.store = store
        self.name = name
        self.arn = f"local://{name}"
        self.visibility_timeout_s = visibility_timeout_s
        self.max_receive_count = max_receive_count
        target = dead_letter if dead_letter is not None else f"{name}-dlq"
        self.dead_letter_queue = target.removeprefix("local://")
        self.region = region
        self.fifo = name.endswith(".fifo")
        self._shape = SqsRecordShape(SQS_EVENT_SOURCE, self.arn, region)
        # Local receives are one indexed range scan: as big as the engine's batch, no SQS cap.
        self.max_receive_batch = 10_000
        # Wall-clock epoch seconds; injectable so tests can move time instead of sleeping.
        self._clock = clock

    def __repr__(self) -> str:
        return f"LocalQueue({self.name!r}, store={self.store.where!r})"

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- QueueSource -----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store (creates the schema). A local queue exists as soon as it is named."""
        await self._run(noop)

    async def close(self) -> None:
        """Nothing to release: the store belongs to whoever created it."""

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages; waits up to wait_s for the first (long polling).

        If the calling task is cancelled while a receive is running on the store thread, that
        receive still completes and its messages reappear after the visibility timeout, as an
        SQS receive lost on the network would.
        """
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, 0.0)
        pause = POLL_FIRST_S
        while True:
            # Register before looking, so a send that commits after our SELECT still wakes us.
            waiter = register(self.store.key, self.name, loop)
            try:
                messages = await self._run(self._receive_sync, max_messages)
                remaining = deadline - loop.time()
                if messages or remaining <= 0:
                    return messages
                await asyncio.wait([waiter], timeout=min(pause, remaining))
                pause = POLL_FIRST_S if waiter.done() else min(pause * 1.5, POLL_MAX_S)
            finally:
                unregister(self.store.key, self.name, waiter)

    async def delete(self, messages: list[Message]) -> None:
        """Delete the messages whose receipt is still current; stale receipts are ignored."""
        keys = receipt_keys(messages)
        if keys:
            await self._run(delete, self.name, keys)

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        keys = receipt_keys(messages)
        if not keys:
            return
        await self._run(change_visibility, self.name, keys, self._now_ms() + int(timeout_s * 1000))
        if timeout_s <= 0:
            notify(self.store.key, self.name)

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Move the messages to ``dead_letter_queue`` in one transaction.

        Body, id, group and attributes are kept; DeadLetterReason and DeadLetterSourceQueue
        are added and the receive count starts again. A message whose receipt went stale
        (redelivered to someone else) is left alone.
        """
        keys = receipt_keys(messages)
        if not keys:
            return
        target_fifo = self.dead_letter_queue.endswith(".fifo")
        await self._run(
            dead_letter,
            self.name,
            self.dead_letter_queue,
            target_fifo,
            keys,
            reason,
            self._now_ms(),
        )
        notify(self.store.key, self.dead_letter_queue)

    async def depth(self) -> Depth:
        """Visible now and in flight; delayed messages (never received yet) count in neither."""
        visible, in_flight = await self._run(depth, self.name, self._now_ms())
        return Depth(visible=visible, in_flight=in_flight)

    # -- QueueSender -----------------------------------------------------------------------
    async def send(
        self,
        bodies: list[str],
        *,
        delay_s: int = 0,
        group: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> int:
        """Enqueue ``bodies`` in order; returns how many were stored.

        FIFO queues need ``group``; standard queues ignore it (SQS standard order is best
        effort anyway).
        """
        if self.fifo and not group:
            raise SourceError(
                f"local queue {self.name!r} is FIFO: every message needs a message group "
                "(pass a group, e.g. `poller send ... --group ID`)",
                retryable=False,
            )
        if not 0 <= delay_s <= MAX_DELAY_S:
            raise SourceError(
                f"local queue {self.name!r}: delay {delay_s}s is out of range 0-{MAX_DELAY_S}",
                retryable=False,
            )
        for index, body in enumerate(bodies):
            if len(body.encode()) > MAX_BODY_BYTES:
                raise SourceError(
                    f"local queue {self.name!r}: message {index} is larger than SQS's "
                    f"{MAX_BODY_BYTES} bytes; nothing was sent",
                    retryable=False,
                )
        attributes_text = _encode(attributes).decode() if attributes else None
        group_id = group if self.fifo else None
        sent = 0
        for start in range(0, len(bodies), SEND_CHUNK):
            now = self._now_ms()
            visible_at = now + int(delay_s * 1000)
            rows = [
                (self.name, str(uuid.uuid4()), body, attributes_text, group_id, now, visible_at)
                for body in bodies[start : start + SEND_CHUNK]
            ]
            # One transaction per chunk, not per send: other writers (receivers, the registry)
            # get the lock between chunks of a big send.
            sent += await self._run(insert, rows)
            notify(self.store.key, self.name)
        return sent

    # -- inspection ------------------------------------------------------------------------
    async def purge(self) -> int:
        """Delete every message, in flight or not; returns how many."""
        return await self._run(purge, self.name)

    async def peek(self, limit: int = 10) -> list[PeekedMessage]:
        """The first ``limit`` messages in send order, whatever their visibility."""
        rows = await self._run(peek, self.name, limit)
        return [
            PeekedMessage(
                id=row[1],
                body=row[2],
                attributes=_decode_attributes(row[3]) if row[3] else {},
                receive_count=row[6],
                sent_ms=row[5],
                group=row[4],
            )
            for row in rows
        ]

    # -- internals -------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        # The engine only understands SourceError; a broken state file is worth retrying
        # (disk full, a lock held too long), so it stays retryable.
        try:
            return await self.store.run(fn, *args)
        except StateError as exc:
            raise SourceError(f"local queue {self.name!r}: {exc}") from exc

    def _receive_sync(self, conn: sqlite3.Connection, limit: int) -> list[Message]:
        now = self._now_ms()
        hidden_until = now + int(self.visibility_timeout_s * 1000)
        with immediate(conn):
            if self.fifo:
                rows = fifo_candidates(conn, self.name, now, limit)
            else:
                rows = conn.execute(
                    f"SELECT {COLUMNS} FROM local_messages"
                    " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?",
                    (self.name, now, limit),
                ).fetchall()
            if not rows:
                return []
            # A receipt handle is "seq:token": seq finds the row by primary key, and the token,
            # new for every receive, makes a handle from an earlier receive stale. One token per
            # receive call lets one statement update (and later delete) the whole batch.
            token = os.urandom(8).hex()
            seqs = [row[0] for row in rows]
            conn.execute(
                "UPDATE local_messages SET visible_at = ?, receive_count = receive_count + 1,"
                " receipt = ?, first_receive_ms = COALESCE(first_receive_ms, ?)"
                f" WHERE seq IN ({marks(len(seqs))})",
                (hidden_until, token, now, *seqs),
            )
        return [self._message(row, f"{row[0]}:{token}", now) for row in rows]

    def _message(self, row: tuple[Any, ...], receipt: str, now: int) -> Message:
        seq, message_id, body, attributes_text, group, sent_ms, count, first_ms = row
        attributes = _decode_attributes(attributes_text) if attributes_text else {}
        extra: dict[str, str] | None = None
        if group is not None:
            extra = {
                "SequenceNumber": f"{seq:020d}",
                "MessageGroupId": group,
                # No deduplication locally: every message is its own.
                "MessageDeduplicationId": message_id,
            }
        lambda_attributes = {k: string_attribute(v) for k, v in attributes.items()}
        record = self._shape.record(
            message_id,
            receipt,
            body,
            str(count + 1),
            str(sent_ms),
            str(first_ms if first_ms is not None else now),
            md5_hex(body),
            lambda_attributes,
            extra,
        )
        if attributes:
            record["md5OfMessageAttributes"] = md5_of_message_attributes(lambda_attributes)
        encoded = encode_record(record)
        return Message(
            id=message_id,
            receipt=receipt,
            body=body,
            receive_count=count + 1,
            record=record,
            size=len(encoded),
            group=group,
            encoded=encoded,
        )
