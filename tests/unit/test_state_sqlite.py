"""Unit tests for poller.state.sqlite: the embedded state store."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from poller.state.base import Checkpoint, StateError, open_store
from poller.state.sqlite import SCHEMA_VERSION, SqliteStore, parse_url
from tests.state_contract import check_checkpoints


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path}/state/poller.db")
    await store.open()
    yield store
    await store.close()


def mapping(uuid: str, **fields: object) -> dict[str, object]:
    return {"uuid": uuid, "FunctionName": "f", "BatchSize": 10, **fields}


# -- urls ------------------------------------------------------------------------------------
def test_parse_url_forms(tmp_path: Path) -> None:
    assert parse_url("sqlite:////var/lib/poller/state.db") == Path("/var/lib/poller/state.db")
    # config.example.toml writes three slashes for an absolute path.
    assert parse_url("sqlite:///var/lib/poller/state.db") == Path("/var/lib/poller/state.db")
    assert parse_url("sqlite://state.db", cwd=tmp_path) == tmp_path / "state.db"
    assert parse_url("sqlite:///./a/state.db", cwd=tmp_path) == tmp_path / "a" / "state.db"
    assert parse_url("sqlite://:memory:") is None
    assert parse_url("sqlite:///:memory:") is None
    with pytest.raises(StateError, match="names no file"):
        parse_url("sqlite:///")


def test_open_store_builds_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "s.db"


# -- registry --------------------------------------------------------------------------------
async def test_registry_put_get_list_delete_bumps_revision(
    store: SqliteStore, tmp_path: Path
) -> None:
    assert (tmp_path / "state" / "poller.db").exists()  # parent directory created
    assert await store.revision() == 0
    assert await store.list_mappings() == []
    assert await store.get_mapping("a") is None

    await store.put_mapping(mapping("a"))
    await store.put_mapping(mapping("b"))
    assert await store.revision() == 2
    assert await store.get_mapping("a") == mapping("a")

    # An update replaces the document, bumps the revision and keeps the listing order.
    await store.put_mapping(mapping("a", BatchSize=50))
    assert await store.revision() == 3
    assert [m["uuid"] for m in await store.list_mappings()] == ["a", "b"]
    assert (await store.get_mapping("a") or {})["BatchSize"] == 50

    assert await store.delete_mapping("a") is True
    assert await store.revision() == 4
    assert await store.delete_mapping("a") is False
    assert await store.revision() == 4  # nothing changed, nothing to reload
    assert await store.list_mappings() == [mapping("b")]


async def test_put_mapping_needs_uuid(store: SqliteStore) -> None:
    with pytest.raises(StateError, match="uuid"):
        await store.put_mapping({"FunctionName": "f"})


async def test_two_stores_on_one_file_see_each_other(tmp_path: Path) -> None:
    # The daemon and a `poller mappings` command: two processes, two connections, one file.
    url = f"sqlite:///{tmp_path}/shared.db"
    daemon, cli = SqliteStore(url), SqliteStore(url)
    try:
        await daemon.open()
        before = await daemon.revision()
        await cli.put_mapping(mapping("m1"))
        assert await daemon.revision() == before + 1
        assert await daemon.get_mapping("m1") == mapping("m1")
        claim = await daemon.claim_shard("m1", "shard-0", "daemon")
        await daemon.set_checkpoint("m1", "shard-0", claim.token, Checkpoint("42"))
        assert await cli.list_checkpoints("m1") == {"shard-0": Checkpoint("42")}
        assert await cli.delete_mapping("m1")
        assert await daemon.list_mappings() == []
    finally:
        await daemon.close()
        await cli.close()


# -- status, checkpoints, windows ------------------------------------------------------------
async def test_status_merges_and_does_not_bump_revision(store: SqliteStore) -> None:
    await store.put_mapping(mapping("a"))
    revision = await store.revision()
    assert await store.get_status("a") == {}
    await store.set_status("a", {"LastProcessingResult": "OK"})
    await store.set_status("a", {"State": "Enabled"})
    assert await store.get_status("a") == {"LastProcessingResult": "OK", "State": "Enabled"}
    await store.set_status("a", {"State": None})
    assert await store.get_status("a") == {"LastProcessingResult": "OK"}
    assert await store.revision() == revision


async def test_checkpoints(store: SqliteStore) -> None:
    await check_checkpoints(store, mapping("m"))


# -- lifecycle and errors --------------------------------------------------------------------
async def test_ping_memory_and_reopen() -> None:
    store = SqliteStore("sqlite://:memory:")
    assert await store.ping()
    await store.put_mapping(mapping("a"))
    assert await store.revision() == 1
    await store.close()
    await store.close()  # idempotent


async def test_file_settings(store: SqliteStore) -> None:
    def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int, bool]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA busy_timeout").fetchone()[0],
            conn.in_transaction,
        )

    # synchronous 1 = NORMAL; no transaction is left open between calls.
    assert await store.run(pragmas) == ("wal", 1, 5000, False)


async def test_reopen_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    first = SqliteStore(url)
    await first.put_mapping(mapping("a"))
    await first.close()
    second = SqliteStore(url)
    try:
        assert await second.get_mapping("a") == mapping("a")
        assert await second.revision() == 1
    finally:
        await second.close()


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite at all, " * 100)
    store = SqliteStore(f"sqlite:///{path}")
    with pytest.raises(StateError, match=r"notes\.txt is not a SQLite database.*\[state\] url"):
        await store.open()
    await store.close()


async def test_foreign_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    store = SqliteStore(f"sqlite:///{path}")
    with pytest.raises(StateError, match=r"not a poller state file.*customers"):
        await store.open()
    await store.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = SqliteStore(url)
    await store.open()
    await store.run(
        lambda conn: conn.execute(
            "UPDATE poller_meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    )
    await store.close()
    newer = SqliteStore(url)
    with pytest.raises(StateError, match="newer poller"):
        await newer.open()
    await newer.close()


async def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    store = SqliteStore(f"sqlite:///{tmp_path}/blocker/state.db")
    with pytest.raises(StateError, match=r"cannot create the directory.*writable"):
        await store.open()
    await store.close()


async def test_path_is_a_directory(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path}")
    with pytest.raises(StateError, match=re.escape(f"cannot open the state database {tmp_path}")):
        await store.open()
    await store.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        store = SqliteStore(f"sqlite:///{locked}/state.db")
        with pytest.raises(StateError, match="writable"):
            await store.open()
        await store.close()
    finally:
        locked.chmod(0o700)
