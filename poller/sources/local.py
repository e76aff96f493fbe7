"""``local://NAME``: a durable development queue kept in the SQLite state file.

It behaves like SQS where the engine can tell: visibility timeout and redelivery with an
incrementing receive count, receipts that go stale on redelivery, delays, long polling, FIFO
queues (a ``.fifo`` suffix) with per-group order and one in-flight batch per group, and
dead-lettering (done by the engine: there is no native redrive). The records are §7.1 SQS
records with ``eventSource`` "poller:local".

Every operation is one short transaction on the store's thread. A receive takes the write lock
(``BEGIN IMMEDIATE``) before it selects, so two receivers, even in two processes, never get the
same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from poller.events import (
    SqsRecordShape,
    encode_record,
    md5_hex,
    md5_of_message_attributes,
    string_attribute,
)
from poller.sources.base import Depth, Message, SourceError
from poller.state.base import StateError
from poller.state.sqlite import SqliteStore, immediate

_encode = msgspec.json.Encoder().encode
_decode_attributes = msgspec.json.Decoder(dict[str, str]).decode

EVENT_SOURCE: Final = "poller:local"
MAX_BODY_BYTES: Final = 1_048_576  # SQS's limit, so code tested locally fits real queues
MAX_DELAY_S: Final = 900  # SQS DelaySeconds maximum
SEND_CHUNK: Final = 1000  # rows per insert transaction: bounds how long a send holds the lock
# Long polling re-checks the table (other processes' sends) this often, growing while idle;
# same-process sends wake receivers at once.
POLL_FIRST_S: Final = 0.02
POLL_MAX_S: Final = 0.2
_COLUMNS: Final = "seq, id, body, attributes, group_id, sent_ms, receive_count, first_receive_ms"


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
        visibility_timeout_s: float = 30,
        max_receive_count: int | None = 5,
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
        self._shape = SqsRecordShape(EVENT_SOURCE, self.arn, region)
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
        await self._run(_noop)

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
            waiter = _register(self.store.key, self.name, loop)
            try:
                messages = await self._run(self._receive_sync, max_messages)
                remaining = deadline - loop.time()
                if messages or remaining <= 0:
                    return messages
                await asyncio.wait([waiter], timeout=min(pause, remaining))
                pause = POLL_FIRST_S if waiter.done() else min(pause * 1.5, POLL_MAX_S)
            finally:
                _unregister(self.store.key, self.name, waiter)

    async def delete(self, messages: list[Message]) -> None:
        """Delete the messages whose receipt is still current; stale receipts are ignored."""
        keys = _receipt_keys(messages)
        if keys:
            await self._run(_delete, self.name, keys)

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        keys = _receipt_keys(messages)
        if not keys:
            return
        await self._run(_change_visibility, self.name, keys, self._now_ms() + int(timeout_s * 1000))
        if timeout_s <= 0:
            _notify(self.store.key, self.name)

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Move the messages to ``dead_letter_queue`` in one transaction.

        Body, id, group and attributes are kept; DeadLetterReason and DeadLetterSourceQueue
        are added and the receive count starts again. A message whose receipt went stale
        (redelivered to someone else) is left alone.
        """
        keys = _receipt_keys(messages)
        if not keys:
            return
        target_fifo = self.dead_letter_queue.endswith(".fifo")
        await self._run(
            _dead_letter,
            self.name,
            self.dead_letter_queue,
            target_fifo,
            keys,
            reason,
            self._now_ms(),
        )
        _notify(self.store.key, self.dead_letter_queue)

    async def depth(self) -> Depth:
        """Visible now and in flight; delayed messages (never received yet) count in neither."""
        visible, in_flight = await self._run(_depth, self.name, self._now_ms())
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
            sent += await self._run(_insert, rows)
            _notify(self.store.key, self.name)
        return sent

    # -- inspection ------------------------------------------------------------------------
    async def purge(self) -> int:
        """Delete every message, in flight or not; returns how many."""
        return await self._run(_purge, self.name)

    async def peek(self, limit: int = 10) -> list[PeekedMessage]:
        """The first ``limit`` messages in send order, whatever their visibility."""
        rows = await self._run(_peek, self.name, limit)
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
                rows = _fifo_candidates(conn, self.name, now, limit)
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM local_messages"
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
                f" WHERE seq IN ({_marks(len(seqs))})",
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
            message_id, receipt, body, str(count + 1), str(sent_ms),
            str(first_ms if first_ms is not None else now),
            md5_hex(body), lambda_attributes, extra,
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


# seq IN (...) lists stay well under SQLite's 32766 bound parameters.
IN_CHUNK: Final = 5000

ReceiptKeys = dict[str, list[int]]  # receipt token -> seqs received with it


def _receipt_keys(messages: Sequence[Message]) -> ReceiptKeys:
    """Group the messages' receipt handles by token; handles we did not issue are skipped."""
    keys: ReceiptKeys = {}
    for message in messages:
        head, sep, token = message.receipt.partition(":")
        if sep and head.isdigit() and token:
            keys.setdefault(token, []).append(int(head))
    return keys


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _chunks(seqs: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(seqs), IN_CHUNK):
        yield seqs[start : start + IN_CHUNK]


# -- statements (run on the store thread) ----------------------------------------------------
def _noop(conn: sqlite3.Connection) -> None:
    return None


def _fifo_candidates(
    conn: sqlite3.Connection, queue: str, now: int, limit: int
) -> list[tuple[Any, ...]]:
    """Visible messages in send order that keep FIFO's promises.

    A group is skipped while any of its messages is in flight, and a message is never handed
    out ahead of an older message of its group that is not visible (in flight or delayed).
    Every older message of an eligible message's group is therefore eligible too, so taking a
    prefix in seq order keeps each group's order within the batch.
    """
    blocked: set[str] = set()
    oldest_hidden: dict[str, int] = {}
    for group, min_seq, in_flight in conn.execute(
        "SELECT group_id, MIN(seq), MAX(receipt IS NOT NULL) FROM local_messages"
        " WHERE queue = ? AND visible_at > ? GROUP BY group_id",
        (queue, now),
    ):
        if in_flight:
            blocked.add(group)
        else:
            oldest_hidden[group] = min_seq
    picked: list[tuple[Any, ...]] = []
    cursor = conn.execute(
        f"SELECT {_COLUMNS} FROM local_messages INDEXED BY local_messages_fifo"
        " WHERE queue = ? AND group_id IS NOT NULL AND visible_at <= ? ORDER BY seq",
        (queue, now),
    )
    while len(picked) < limit:
        batch = cursor.fetchmany(256)
        if not batch:
            break
        for row in batch:
            group = row[4]
            if group in blocked or row[0] > oldest_hidden.get(group, row[0]):
                continue
            picked.append(row)
            if len(picked) == limit:
                break
    cursor.close()
    return picked


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    with immediate(conn):
        conn.executemany(
            "INSERT INTO local_messages (queue, id, body, attributes, group_id, sent_ms,"
            " visible_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return len(rows)


# In the two statements below `+queue` keeps SQLite off the (queue, ...) index: left to itself
# it scans every message of the queue through that index instead of looking the listed seqs
# up by primary key, which made a 10-message delete cost ~1.7 ms on a 20,000-message queue.
def _delete(conn: sqlite3.Connection, queue: str, keys: ReceiptKeys) -> None:
    with immediate(conn):
        for token, seqs in keys.items():
            for chunk in _chunks(seqs):
                conn.execute(
                    "DELETE FROM local_messages WHERE receipt = ? AND +queue = ?"
                    f" AND seq IN ({_marks(len(chunk))})",
                    (token, queue, *chunk),
                )


def _change_visibility(
    conn: sqlite3.Connection, queue: str, keys: ReceiptKeys, visible_at: int
) -> None:
    with immediate(conn):
        for token, seqs in keys.items():
            for chunk in _chunks(seqs):
                conn.execute(
                    "UPDATE local_messages SET visible_at = ? WHERE receipt = ? AND +queue = ?"
                    f" AND seq IN ({_marks(len(chunk))})",
                    (visible_at, token, queue, *chunk),
                )


def _dead_letter(
    conn: sqlite3.Connection,
    queue: str,
    target: str,
    target_fifo: bool,
    keys: ReceiptKeys,
    reason: str,
    now: int,
) -> None:
    # One transaction for the whole call: each message is either still in the source or
    # already in the target, whatever moment a crash picks.
    with immediate(conn):
        for seq, token in [(seq, token) for token, seqs in keys.items() for seq in seqs]:
            row = conn.execute(
                "SELECT id, body, attributes, group_id, sent_ms FROM local_messages"
                " WHERE seq = ? AND receipt = ? AND queue = ?",
                (seq, token, queue),
            ).fetchone()
            if row is None:
                continue  # deleted already, or redelivered: its new holder decides
            message_id, body, attributes_text, group, sent_ms = row
            attributes = _decode_attributes(attributes_text) if attributes_text else {}
            attributes["DeadLetterReason"] = reason
            attributes["DeadLetterSourceQueue"] = queue
            if not target_fifo:
                group = None
            elif group is None:
                group = message_id  # a FIFO target needs a group; each message its own
            # SentTimestamp is kept, as SQS keeps it when it moves a message to a DLQ.
            conn.execute(
                "INSERT INTO local_messages (queue, id, body, attributes, group_id, sent_ms,"
                " visible_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (target, message_id, body, _encode(attributes).decode(), group, sent_ms, now),
            )
            conn.execute("DELETE FROM local_messages WHERE seq = ?", (seq,))


def _depth(conn: sqlite3.Connection, queue: str, now: int) -> tuple[int, int]:
    visible = conn.execute(
        "SELECT COUNT(*) FROM local_messages WHERE queue = ? AND visible_at <= ?", (queue, now)
    ).fetchone()[0]
    in_flight = conn.execute(
        "SELECT COUNT(*) FROM local_messages"
        " WHERE queue = ? AND visible_at > ? AND receipt IS NOT NULL",
        (queue, now),
    ).fetchone()[0]
    return int(visible), int(in_flight)


def _purge(conn: sqlite3.Connection, queue: str) -> int:
    with immediate(conn):
        return int(conn.execute("DELETE FROM local_messages WHERE queue = ?", (queue,)).rowcount)


def _peek(conn: sqlite3.Connection, queue: str, limit: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        f"SELECT {_COLUMNS} FROM local_messages WHERE queue = ? ORDER BY seq LIMIT ?",
        (queue, limit),
    ).fetchall()


# In-process wake-ups: a send resolves the futures of receivers waiting on that queue, so a
# long poll answers at once instead of at its next table check. Keyed by (database key, queue
# name), so two stores on the same file share them. A future per waiter rather than one shared
# Event: each waiter registers before it looks, so no clear() can swallow a send. Kept per event
# loop (weakly, so a closed loop takes its futures with it); waiters on another loop or thread
# are woken through call_soon_threadsafe.
_QueueKey = tuple[str, str]
_WAITERS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[_QueueKey, set[asyncio.Future[None]]]
] = weakref.WeakKeyDictionary()
_WAITERS_LOCK = threading.Lock()


def _register(db: str, queue: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    with _WAITERS_LOCK:
        _WAITERS.setdefault(loop, {}).setdefault((db, queue), set()).add(future)
    return future


def _unregister(db: str, queue: str, future: asyncio.Future[None]) -> None:
    with _WAITERS_LOCK:
        per_loop = _WAITERS.get(future.get_loop(), {})
        waiting = per_loop.get((db, queue))
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del per_loop[(db, queue)]
    if not future.done():
        future.cancel()


def _notify(db: str, queue: str) -> None:
    with _WAITERS_LOCK:
        targets = [
            (loop, list(per_loop.get((db, queue), ()))) for loop, per_loop in _WAITERS.items()
        ]
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for loop, futures in targets:
        for future in futures:
            if loop is current:
                _wake(future)
            else:
                # The other loop may close under us; its receivers are gone with it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
