"""The state store interface: what must outlive a process.

The SQLite store (embedded default, one node) and the Redis store (a fleet) both satisfy it;
the daemon and the CLI only ever talk to this interface. Mappings are stored as the plain dicts
of ``Mapping.to_dict()``; the store does not interpret them beyond the ``uuid`` key.
"""

from __future__ import annotations

from typing import Any, Protocol


class StateError(Exception):
    """The store cannot be reached or used; the message says which and how to fix it."""


class StateStore(Protocol):
    url: str

    async def open(self) -> None:
        """Connect and create what is missing (tables, keys). Raises StateError."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers (for /readyz)."""

    # -- mapping registry ------------------------------------------------------------------
    async def revision(self) -> int:
        """A counter bumped by every registry change; cheap, polled by running daemons."""

    async def list_mappings(self) -> list[dict[str, Any]]: ...

    async def get_mapping(self, uuid: str) -> dict[str, Any] | None: ...

    async def put_mapping(self, mapping: dict[str, Any]) -> None:
        """Insert or replace by mapping["uuid"]; bumps the revision."""

    async def delete_mapping(self, uuid: str) -> bool:
        """True if it existed; bumps the revision."""

    # -- runtime status (not configuration: writing it does not bump the revision) ---------
    async def set_status(self, uuid: str, status: dict[str, Any]) -> None:
        """E.g. {"LastProcessingResult": "OK"}; merged into what `mappings get` shows."""

    async def get_status(self, uuid: str) -> dict[str, Any]: ...

    # -- stream checkpoints and tumbling-window state ---------------------------------------
    async def get_checkpoint(self, mapping_uuid: str, shard: str) -> str | None: ...

    async def set_checkpoint(self, mapping_uuid: str, shard: str, position: str) -> None: ...

    async def get_window_state(self, mapping_uuid: str, shard: str) -> dict[str, Any] | None: ...

    async def set_window_state(
        self, mapping_uuid: str, shard: str, state: dict[str, Any] | None
    ) -> None: ...


def open_store(url: str, *, key_prefix: str = "poller:") -> StateStore:
    """The store for a ``[state] url``: sqlite:///PATH or redis://..."""
    if url.startswith("sqlite://"):
        from poller.state.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from poller.state.redis import RedisStore

        return RedisStore(url, key_prefix=key_prefix)
    raise StateError(
        f"unsupported [state] url {url!r}: use sqlite:///PATH (embedded, one node) or "
        "redis://HOST:PORT/DB (shared by several daemons)"
    )
