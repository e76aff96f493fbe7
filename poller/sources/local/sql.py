"""The local queue's transactions, each run on the state store's thread."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgspec

from poller.sources.base import Message
from poller.sources.dead_letters import DEAD_LETTER_FIELDS
from poller.state.sqlite import immediate

_encode = msgspec.json.Encoder().encode
_decode_attributes = msgspec.json.Decoder(dict[str, str]).decode

# seq IN (...) lists stay well under SQLite's 32766 bound parameters.
IN_CHUNK: Final = 5000

COLUMNS: Final = "seq, id, body, attributes, group_id, sent_ms, receive_count, first_receive_ms"

ReceiptKeys = dict[str, list[int]]  # receipt token -> seqs received with it


def receipt_keys(messages: Sequence[Message]) -> ReceiptKeys:
    """Group the messages' receipt handles by token; handles we did not issue are skipped."""
    keys: ReceiptKeys = {}
    for message in messages:
        head, sep, token = message.receipt.partition(":")
        if sep and head.isdigit() and token:
            keys.setdefault(token, []).append(int(head))
    return keys


def marks(count: int) -> str:
    return ",".join("?" * count)


def chunks(seqs: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(seqs), IN_CHUNK):
        yield seqs[start : start + IN_CHUNK]


# -- statements (run on the store thread) ----------------------------------------------------
def noop(conn: sqlite3.Connection) -> None:
    return None


def fifo_candidates(
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
        f"SELECT {COLUMNS} FROM local_messages INDEXED BY local_messages_fifo"
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


def insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
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
def delete(conn: sqlite3.Connection, queue: str, keys: ReceiptKeys) -> None:
    with immediate(conn):
        for token, seqs in keys.items():
            for chunk in chunks(seqs):
                conn.execute(
                    "DELETE FROM local_messages WHERE receipt = ? AND +queue = ?"
                    f" AND seq IN ({marks(len(chunk))})",
                    (token, queue, *chunk),
                )


def change_visibility(
    conn: sqlite3.Connection, queue: str, keys: ReceiptKeys, visible_at: int
) -> None:
    with immediate(conn):
        for token, seqs in keys.items():
            for chunk in chunks(seqs):
                conn.execute(
                    "UPDATE local_messages SET visible_at = ? WHERE receipt = ? AND +queue = ?"
                    f" AND seq IN ({marks(len(chunk))})",
                    (visible_at, token, queue, *chunk),
                )


def dead_letter(
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
                "SELECT id, body, attributes, group_id, sent_ms, receive_count FROM local_messages"
                " WHERE seq = ? AND receipt = ? AND queue = ?",
                (seq, token, queue),
            ).fetchone()
            if row is None:
                continue  # deleted already, or redelivered: its new holder decides
            message_id, body, attributes_text, group, sent_ms, receive_count = row
            attributes = _decode_attributes(attributes_text) if attributes_text else {}
            attributes["DeadLetterReason"] = reason
            attributes["DeadLetterSourceQueue"] = queue
            attributes["DeadLetterReceiveCount"] = str(receive_count)
            if not target_fifo:
                if group is not None:
                    # Kept for a redrive back to the FIFO source.
                    attributes["DeadLetterMessageGroupId"] = group
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


def depth(conn: sqlite3.Connection, queue: str, now: int) -> tuple[int, int]:
    visible = conn.execute(
        "SELECT COUNT(*) FROM local_messages WHERE queue = ? AND visible_at <= ?", (queue, now)
    ).fetchone()[0]
    in_flight = conn.execute(
        "SELECT COUNT(*) FROM local_messages"
        " WHERE queue = ? AND visible_at > ? AND receipt IS NOT NULL",
        (queue, now),
    ).fetchone()[0]
    return int(visible), int(in_flight)


def purge(conn: sqlite3.Connection, queue: str) -> int:
    with immediate(conn):
        return int(conn.execute("DELETE FROM local_messages WHERE queue = ?", (queue,)).rowcount)


def peek(conn: sqlite3.Connection, queue: str, limit: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        f"SELECT {COLUMNS} FROM local_messages WHERE queue = ? ORDER BY seq LIMIT ?",
        (queue, limit),
    ).fetchall()


def redrive(
    conn: sqlite3.Connection,
    queue: str,
    target: str,
    target_fifo: bool,
    up_to_seq: int,
    limit: int,
    now: int,
) -> int:
    """Move up to ``limit`` visible messages (seq <= ``up_to_seq``) of a dead-letter queue to
    ``target``, oldest first, in one transaction: each is in one queue or the other, whatever
    moment a crash picks. The attributes dead-lettering added are dropped, the receive count
    starts again, and a FIFO target gets the message's original group back."""
    with immediate(conn):
        rows = conn.execute(
            "SELECT seq, id, body, attributes, group_id, sent_ms FROM local_messages"
            " WHERE queue = ? AND visible_at <= ? AND seq <= ? ORDER BY seq LIMIT ?",
            (queue, now, up_to_seq, limit),
        ).fetchall()
        for seq, message_id, body, attributes_text, group, sent_ms in rows:
            attributes = _decode_attributes(attributes_text) if attributes_text else {}
            original_group = attributes.get("DeadLetterMessageGroupId", group)
            kept = {k: v for k, v in attributes.items() if k not in DEAD_LETTER_FIELDS}
            group = (original_group or message_id) if target_fifo else None
            conn.execute(
                "INSERT INTO local_messages (queue, id, body, attributes, group_id, sent_ms,"
                " visible_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    target,
                    message_id,
                    body,
                    _encode(kept).decode() if kept else None,
                    group,
                    sent_ms,
                    now,
                ),
            )
            conn.execute("DELETE FROM local_messages WHERE seq = ?", (seq,))
    return len(rows)


def last_seq(conn: sqlite3.Connection, queue: str) -> int:
    row = conn.execute("SELECT MAX(seq) FROM local_messages WHERE queue = ?", (queue,)).fetchone()
    return int(row[0] or 0)
