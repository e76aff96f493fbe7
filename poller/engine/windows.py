"""Tumbling windows of ordered mappings (ESM_SEMANTICS.md §4.6, §7.4), pure bookkeeping.

Window boundaries come from the records' arrival times: a record of arrival ``t`` belongs to
the window ``[floor(t / L) * L, ... + L)``. Each invoke gets the window, the state the previous
invoke of the window returned, and whether it is the window's final invoke; the state is
carried in the shard's checkpoint so a restart goes on aggregating where it stopped. A window
closes when a record of a later window is read, or when the shard is read up to the present
past the window's end (arrival times only grow, so nothing more can come for it: Lambda waits
up to two minutes for the same reason). A state over 1 MB ends its window early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

MAX_STATE_BYTES: Final = 1024 * 1024
_encode = msgspec.json.Encoder().encode


def window_of(arrival: float, length_s: int) -> tuple[int, int]:
    start = int(arrival // length_s) * length_s
    return start, start + length_s


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(slots=True)
class Window:
    start: int
    end: int
    state: dict[str, Any] = field(default_factory=dict)

    def saved(self) -> dict[str, Any]:
        """What the checkpoint keeps of the window."""
        return {"start": self.start, "end": self.end, "state": self.state}

    @classmethod
    def restored(cls, saved: dict[str, Any] | None) -> Window | None:
        if not saved:
            return None
        return cls(int(saved["start"]), int(saved["end"]), dict(saved.get("state") or {}))

    def holds(self, arrival: float, length_s: int) -> bool:
        return window_of(arrival, length_s) == (self.start, self.end)

    def event_members(
        self, *, shard_id: str, stream_arn: str, final: bool, terminated_early: bool
    ) -> bytes:
        """The members §7.4 adds to the event, as JSON starting with a comma."""
        return (
            b',"window":%b,"state":%b,"shardId":%b,"eventSourceARN":%b,"isFinalInvokeForWindow":%b,"isWindowTerminatedEarly":%b'
            % (
                _encode({"start": _iso(self.start), "end": _iso(self.end)}),
                _encode(self.state),
                _encode(shard_id),
                _encode(stream_arn),
                b"true" if final else b"false",
                b"true" if terminated_early else b"false",
            )
        )


def too_big(state: dict[str, Any]) -> bool:
    return len(_encode(state)) > MAX_STATE_BYTES
