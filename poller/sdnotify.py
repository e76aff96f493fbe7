"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Under `Type=notify` systemd passes the path of a datagram socket in $NOTIFY_SOCKET and waits
for a `READY=1` datagram before it counts the service as started (so `systemctl start` and the
units ordered after it wait for the daemon to really work); `STOPPING=1` tells it a requested
stop is under way and `STATUS=` sets the line `systemctl status` shows. Each message is one
datagram of newline-separated assignments. A name starting with "@" is in Linux's abstract
socket namespace, where the first byte of the address is NUL.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from poller.logs import JsonLog

READY_POLL_S = 0.1


def socket_address(environ: Mapping[str, str] = os.environ) -> str | None:
    """The address to send to, or None when systemd did not ask for notifications."""
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    return "\0" + name[1:] if name.startswith("@") else name


def send(address: str, *assignments: str) -> None:
    """One datagram to `address`; raises OSError if it cannot be delivered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # A notification is tiny and systemd reads it at once: no need to block the loop on it.
        sock.setblocking(False)
        sock.sendto("\n".join(assignments).encode(), address)


class Notifier:
    """What the daemon tells systemd; does nothing when not started by systemd."""

    def __init__(self, log: JsonLog, environ: Mapping[str, str] = os.environ) -> None:
        self.log = log
        self.name = environ.get("NOTIFY_SOCKET", "")
        self.address = socket_address(environ)

    def notify(self, *assignments: str) -> None:
        if self.address is None:
            return
        try:
            send(self.address, *assignments)
        except OSError as exc:
            # Without READY=1 systemd fails the start after TimeoutStartSec: say why here.
            self.log.warning(
                f"cannot notify systemd at NOTIFY_SOCKET={self.name}: "
                f"{exc}; check the unit's NotifyAccess= and that systemd still runs the unit",
                sent=list(assignments),
            )

    async def ready_when(self, ready: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        """Send READY=1 once `ready` (Supervisor.ready, what /readyz answers) holds."""
        if self.address is None:
            return
        ok, detail = ready()
        while not ok:
            await asyncio.sleep(READY_POLL_S)
            ok, detail = ready()
        problems = len(detail.get("problems", ()))
        self.notify(
            "READY=1",
            f"STATUS=running {detail.get('runners', 0)} mapping(s)"
            + (f"; {problems} with a problem (see /readyz)" if problems else ""),
        )

    def stopping(self, grace_s: float) -> None:
        self.notify("STOPPING=1", f"STATUS=draining: in-flight invokes have up to {grace_s:g} s")
