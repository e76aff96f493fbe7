"""The embedded state store: one SQLite file, one node.

The daemon and the CLI commands are separate processes that open the same file at the same
time, so the file runs in WAL mode (readers never block the writer) and every write starts with
``BEGIN IMMEDIATE``: the write lock is taken up front, so two writers queue on ``busy_timeout``
instead of one failing with SQLITE_BUSY when it upgrades a read transaction.

sqlite3 blocks, so each store owns ONE connection used from ONE dedicated thread (a
single-worker executor): nothing blocks the event loop, and the connection never crosses
threads. ``run()`` hands that connection to any callable; the local queue builds on it.

URLs (the SQLAlchemy convention, plus the three-slash absolute form of config.example.toml):

* ``sqlite:////var/lib/poller/state.db`` and ``sqlite:///var/lib/poller/state.db``: absolute.
* ``sqlite://state.db``, ``sqlite:///./state.db``: relative to the current directory.
* ``sqlite://:memory:`` (or ``sqlite:///:memory:``): private to this store, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar, TypeVarTuple

import msgspec

from poller.state.base import Checkpoint, Claim, StaleClaimError, StateError

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

MEMORY: Final = ":memory:"
BUSY_TIMEOUT_MS: Final = 5000

# Each entry migrates the schema from version i to i + 1; append, never edit a released one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        # poller_meta marks the file as ours and holds the schema version and the registry
        # revision (bumped in the same transaction as every mapping put/delete).
        "CREATE TABLE poller_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO poller_meta (key, value) VALUES ('revision', 0)",
        "CREATE TABLE mappings (uuid TEXT PRIMARY KEY, json TEXT NOT NULL)",
        "CREATE TABLE status (uuid TEXT PRIMARY KEY, json TEXT NOT NULL)",
        "CREATE TABLE checkpoints ("
        " mapping TEXT NOT NULL, shard TEXT NOT NULL, position TEXT NOT NULL,"
        " PRIMARY KEY (mapping, shard))",
        "CREATE TABLE window_state ("
        " mapping TEXT NOT NULL, shard TEXT NOT NULL, json TEXT NOT NULL,"
        " PRIMARY KEY (mapping, shard))",
        # local:// development queues (poller.sources.local). AUTOINCREMENT so a sequence number
        # is never reused, even after the newest message is deleted: it is the FIFO
        # SequenceNumber and half of every receipt handle.
        "CREATE TABLE local_messages ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " queue TEXT NOT NULL,"
        " id TEXT NOT NULL,"
        " body TEXT NOT NULL,"
        " attributes TEXT,"  # JSON object of str -> str, NULL when there are none
        " group_id TEXT,"  # FIFO message group; NULL on standard queues
        " sent_ms INTEGER NOT NULL,"
        " visible_at INTEGER NOT NULL,"  # epoch ms; in the future = delayed or in flight
        " receive_count INTEGER NOT NULL DEFAULT 0,"
        " first_receive_ms INTEGER,"
        # Token of the current receipt handle ("seq:token"); NULL until first received.
        " receipt TEXT)",
        # A receive is a range scan of this index in (visible_at, seq) order, stopping at LIMIT.
        "CREATE INDEX local_messages_visible ON local_messages (queue, visible_at, seq)",
        # FIFO receives walk a queue in send order; partial, so standard sends pay nothing.
        "CREATE INDEX local_messages_fifo ON local_messages (queue, seq)"
        " WHERE group_id IS NOT NULL",
    ),
    (
        # Checkpoints gain their claim (owner and fencing token) and the tumbling-window state
        # written with them; nothing wrote the old tables (no ordered source ran before).
        "DROP TABLE checkpoints",
        "DROP TABLE window_state",
        "CREATE TABLE checkpoints ("
        " mapping TEXT NOT NULL, shard TEXT NOT NULL,"
        " position TEXT,"  # the last settled sequence number; NULL until the first
        " window TEXT,"  # JSON of the open tumbling window's state; NULL when none is open
        " owner TEXT NOT NULL, token INTEGER NOT NULL,"
        " PRIMARY KEY (mapping, shard))",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds the write lock from its first statement.

    A deferred transaction that reads and then writes can fail with SQLITE_BUSY at the upgrade
    (busy_timeout does not apply there); IMMEDIATE waits for the lock before reading instead.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def parse_url(url: str, *, cwd: Path | None = None) -> Path | None:
    """The database path for a ``sqlite://`` URL; None for an in-memory database."""
    if not url.startswith("sqlite://"):
        raise StateError(f"not a SQLite state url: {url!r} (expected sqlite:///PATH)")
    rest = url[len("sqlite://") :].split("?", 1)[0]
    if rest in (MEMORY, "/" + MEMORY):
        return None
    if not rest or rest == "/":
        raise StateError(
            f"[state] url {url!r} names no file: use sqlite:////absolute/path/state.db "
            "or sqlite://relative/path/state.db"
        )
    base = cwd or Path.cwd()
    if rest.startswith(("/./", "/../")):
        # sqlite:///./state.db reads as "relative", the way people write it.
        return (base / rest[1:]).resolve()
    if rest.startswith("/"):
        # sqlite:////abs (SQLAlchemy) and sqlite:///abs (config.example.toml) both mean /abs.
        return Path("/" + rest.lstrip("/"))
    return (base / rest).resolve()


class SqliteStore:
    """StateStore on one SQLite file (see the module docstring for URLs and concurrency)."""

    # One node owns every shard: no leases (engine/ownership.py's StoreOwnership).
    leases = None

    def __init__(self, url: str) -> None:
        self.url = url
        self.path: Path | None = parse_url(url)
        # Identifies the database for in-process wake-ups (local queues): two stores on the
        # same file share it, an in-memory database is private to its store.
        self.key: str = str(self.path) if self.path is not None else f"{MEMORY}{id(self)}"
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"

    @property
    def where(self) -> str:
        """The file, for messages a person reads."""
        return str(self.path) if self.path is not None else MEMORY

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the file (and its directories) and the schema if missing. Idempotent."""
        await self._submit(lambda: None)

    async def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._disconnect)
        finally:
            executor.shutdown(wait=False)

    async def ping(self) -> bool:
        try:
            return await self.run(_select_one)
        except StateError:
            return False

    async def run(self, fn: Callable[[sqlite3.Connection, *Ts], T], *args: *Ts) -> T:
        """``fn(connection, *args)`` on the store's thread; opens the store on first use.

        ``fn`` runs to completion even if the awaiting task is cancelled, so it must leave the
        database consistent on its own (wrap writes in ``immediate``). sqlite3 errors come
        back as StateError naming the file.
        """

        def call() -> T:
            assert self._conn is not None
            return fn(self._conn, *args)

        return await self._submit(call)

    async def _submit(self, call: Callable[[], T]) -> T:
        with self._lock:
            if self._executor is None:
                # One worker: the connection is only ever used from this thread, and calls run
                # in submission order.
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="poller-sqlite")
            executor = self._executor

        def guarded() -> T:
            if self._conn is None:
                self._connect()
            try:
                return call()
            except sqlite3.Error as exc:
                hint = _PERMISSION_HINT if _is_permission_error(exc) else ""
                raise StateError(f"state database {self.where}: {exc}{hint}") from exc

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, guarded)
        except RuntimeError as exc:
            # close() shut the executor down between our lookup and the submit.
            if "shutdown" in str(exc):
                raise StateError(f"state database {self.where}: the store is closed") from exc
            raise

    def _connect(self) -> None:
        """Open, configure and migrate; on the store thread."""
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"cannot create the directory for the state database {self.path}: "
                    f"{exc.strerror or exc}. Create it with write permission for this user, or "
                    "set [state] url in the config to a writable place."
                ) from exc
            with contextlib.suppress(OSError):  # sqlite3 reports a real problem below
                # The registry may hold source passwords: a new file is its owner's alone
                # (SQLite gives its -wal and -shm files the same mode).
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        target = str(self.path) if self.path is not None else MEMORY
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: no implicit transactions; we BEGIN IMMEDIATE ourselves.
            conn = sqlite3.connect(target, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL under WAL: a commit survives a process crash; only a power cut can lose
            # the last commits, never corrupt the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, self.where)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._open_error(exc) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn

    def _open_error(self, exc: sqlite3.Error) -> StateError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            return StateError(
                f"{self.where} is not a SQLite database ({exc}). Point [state] url at another "
                "file (poller creates it) or move this one away."
            )
        if _is_permission_error(exc) or name == "SQLITE_IOERR":
            return StateError(
                f"cannot open the state database {self.where} for writing ({exc})."
                + _PERMISSION_HINT
            )
        return StateError(f"cannot open the state database {self.where}: {exc}")

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- mapping registry ------------------------------------------------------------------
    async def revision(self) -> int:
        return await self.run(_revision)

    async def list_mappings(self) -> list[dict[str, Any]]:
        return await self.run(_list_mappings)

    async def get_mapping(self, uuid: str) -> dict[str, Any] | None:
        return await self.run(_get_json, "SELECT json FROM mappings WHERE uuid = ?", (uuid,))

    async def put_mapping(self, mapping: dict[str, Any]) -> None:
        uuid = mapping.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise StateError(f"put_mapping: the mapping has no 'uuid' string: {mapping!r}")
        await self.run(_put_mapping, uuid, _encode(mapping).decode())

    async def delete_mapping(self, uuid: str) -> bool:
        return await self.run(_delete_mapping, uuid)

    # -- runtime status --------------------------------------------------------------------
    async def set_status(self, uuid: str, status: dict[str, Any]) -> None:
        """Merge ``status`` into the stored status; a key set to None is removed.

        Merged, not replaced, so the runner (LastProcessingResult) and the supervisor (State,
        StateTransitionReason) can each write their own keys.
        """
        await self.run(_set_status, uuid, status)

    async def get_status(self, uuid: str) -> dict[str, Any]:
        found = await self.run(_get_json, "SELECT json FROM status WHERE uuid = ?", (uuid,))
        return found or {}

    # -- stream checkpoints --------------------------------------------------------------
    async def claim_shard(self, mapping_uuid: str, shard: str, owner: str) -> Claim:
        return await self.run(_claim_shard, mapping_uuid, shard, owner)

    async def set_checkpoint(
        self, mapping_uuid: str, shard: str, token: int, checkpoint: Checkpoint
    ) -> None:
        window = None if checkpoint.window is None else _encode(checkpoint.window).decode()
        written = await self.run(
            _set_checkpoint, mapping_uuid, shard, token, checkpoint.position, window
        )
        if not written:
            raise StaleClaimError(
                f"checkpoint of shard {shard!r} of mapping {mapping_uuid} refused: the shard was "
                f"claimed again after claim {token}"
            )

    async def list_checkpoints(self, mapping_uuid: str) -> dict[str, Checkpoint]:
        return await self.run(_list_checkpoints, mapping_uuid)


_PERMISSION_HINT: Final = (
    " The file and its directory must be writable by this user (SQLite writes -wal and -shm "
    "files beside it); fix the permissions or set [state] url to another path."
)


def _is_permission_error(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"))


# -- schema ----------------------------------------------------------------------------------
def _schema_version(conn: sqlite3.Connection, where: str) -> int:
    tables = {
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not row[0].startswith("sqlite_")
    }
    if "poller_meta" in tables:
        row = conn.execute("SELECT value FROM poller_meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            # Version 1 wrote the row in the same transaction as the tables, so a missing row
            # means a foreign table that happens to share the name.
            raise _not_poller(where, tables)
        return int(row[0])
    if tables:
        raise _not_poller(where, tables)
    return 0


def _not_poller(where: str, tables: set[str]) -> StateError:
    shown = ", ".join(sorted(tables)[:5])
    return StateError(
        f"{where} is a SQLite database but not a poller state file (it has tables {shown}). "
        "Point [state] url at another file; poller creates it."
    )


def _migrate(conn: sqlite3.Connection, where: str) -> None:
    # The common case (already current) takes no write lock: CLI commands open the file often.
    if _schema_version(conn, where) == SCHEMA_VERSION:
        return
    with immediate(conn):
        # Re-read under the lock: another process may have migrated while we waited.
        version = _schema_version(conn, where)
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{where} was written by a newer poller (schema {version}; this version knows "
                f"up to {SCHEMA_VERSION}). Upgrade poller, or use another [state] url."
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO poller_meta (key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (SCHEMA_VERSION,),
        )


# -- statements (run on the store thread) ----------------------------------------------------
def _select_one(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1").fetchone() == (1,)


def _revision(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM poller_meta WHERE key = 'revision'").fetchone()
    return int(row[0]) if row else 0


def _bump_revision(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE poller_meta SET value = value + 1 WHERE key = 'revision'")


def _get_json(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else _decode(row[0])


def _list_mappings(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    # rowid order = creation order (updates keep their rowid: see _put_mapping).
    return [_decode(row[0]) for row in conn.execute("SELECT json FROM mappings ORDER BY rowid")]


def _put_mapping(conn: sqlite3.Connection, uuid: str, text: str) -> None:
    with immediate(conn):
        # An upsert rather than INSERT OR REPLACE, which would delete and re-insert the row
        # and move the mapping to the end of `mappings list`.
        conn.execute(
            "INSERT INTO mappings (uuid, json) VALUES (?, ?)"
            " ON CONFLICT (uuid) DO UPDATE SET json = excluded.json",
            (uuid, text),
        )
        _bump_revision(conn)


def _delete_mapping(conn: sqlite3.Connection, uuid: str) -> bool:
    with immediate(conn):
        existed = conn.execute("DELETE FROM mappings WHERE uuid = ?", (uuid,)).rowcount > 0
        if existed:
            # What belonged to the mapping goes with it; a recreated mapping has a new uuid.
            conn.execute("DELETE FROM status WHERE uuid = ?", (uuid,))
            conn.execute("DELETE FROM checkpoints WHERE mapping = ?", (uuid,))
            _bump_revision(conn)
    return existed


def _set_status(conn: sqlite3.Connection, uuid: str, status: dict[str, Any]) -> None:
    with immediate(conn):
        row = conn.execute("SELECT json FROM status WHERE uuid = ?", (uuid,)).fetchone()
        merged: dict[str, Any] = _decode(row[0]) if row else {}
        merged.update(status)
        merged = {key: value for key, value in merged.items() if value is not None}
        conn.execute(
            "INSERT INTO status (uuid, json) VALUES (?, ?)"
            " ON CONFLICT (uuid) DO UPDATE SET json = excluded.json",
            (uuid, _encode(merged).decode()),
        )


def _checkpoint(position: str | None, window: str | None) -> Checkpoint:
    return Checkpoint(position, None if window is None else _decode(window))


def _claim_shard(conn: sqlite3.Connection, mapping: str, shard: str, owner: str) -> Claim:
    with immediate(conn):
        row = conn.execute(
            "SELECT position, window, token FROM checkpoints WHERE mapping = ? AND shard = ?",
            (mapping, shard),
        ).fetchone()
        position, window, token = row if row is not None else (None, None, 0)
        conn.execute(
            "INSERT INTO checkpoints (mapping, shard, owner, token) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (mapping, shard) DO UPDATE SET owner = excluded.owner,"
            " token = excluded.token",
            (mapping, shard, owner, token + 1),
        )
    return Claim(token + 1, _checkpoint(position, window))


def _set_checkpoint(
    conn: sqlite3.Connection,
    mapping: str,
    shard: str,
    token: int,
    position: str | None,
    window: str | None,
) -> bool:
    # One statement is its own transaction; the token test makes it a compare-and-set.
    return (
        conn.execute(
            "UPDATE checkpoints SET position = ?, window = ?"
            " WHERE mapping = ? AND shard = ? AND token = ?",
            (position, window, mapping, shard, token),
        ).rowcount
        == 1
    )


def _list_checkpoints(conn: sqlite3.Connection, mapping: str) -> dict[str, Checkpoint]:
    rows = conn.execute(
        "SELECT shard, position, window FROM checkpoints WHERE mapping = ? ORDER BY shard",
        (mapping,),
    ).fetchall()
    return {shard: _checkpoint(position, window) for shard, position, window in rows}
