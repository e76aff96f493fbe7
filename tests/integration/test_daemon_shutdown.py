"""A shutdown that hangs after its grace: the daemon says where every task waits and exits.

In process, so that a close can be made to hang and the exit observed without ending pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from pathlib import Path

import pytest

from poller import daemon as daemon_module
from poller.config import parse_config
from poller.logs import JsonLog
from poller.runtime.pool import Runtime
from tests.servers import free_port


async def _hang_forever(self: Runtime) -> None:
    await asyncio.Event().wait()


async def test_a_shutdown_stuck_after_its_grace_says_where_it_waits_and_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        {
            "daemon": {"http_listen": f"127.0.0.1:{free_port()}", "shutdown_grace_s": 0.2},
            "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        },
        str(tmp_path / "config.toml"),
    )
    monkeypatch.setattr(daemon_module, "STUCK_AFTER_GRACE_S", 0.3)
    real_close = Runtime.close
    monkeypatch.setattr(Runtime, "close", _hang_forever)
    stream = io.BytesIO()
    log = JsonLog(stream)
    daemon = daemon_module.Daemon(config, log=log)
    exits: list[float] = []
    loop = asyncio.get_running_loop()
    run = loop.create_task(daemon.run())
    # Where os._exit would end the process, end the run instead.
    monkeypatch.setattr(daemon, "_exit_now", lambda: (exits.append(loop.time()), run.cancel()))
    try:
        for _ in range(100):
            if daemon.supervisor is not None and daemon.supervisor.ready()[0]:
                break
            await asyncio.sleep(0.05)
        stopped_at = loop.time()
        daemon.stopping.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, 5)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if daemon.runtime is not None:
            await real_close(daemon.runtime)
        if daemon.store is not None:
            await daemon.store.close()
    assert len(exits) == 1
    assert 0.45 <= exits[0] - stopped_at < 2  # the grace (0.2 s) and 0.3 s more, not before
    log.flush()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    (stuck,) = [r for r in records if r["message"].startswith("shutdown still not done")]
    assert stuck["level"] == "ERROR"
    # The run's task, suspended in the hanging close, with the chain of awaits down to it.
    assert any("_close" in t and "_hang_forever" in t for t in stuck["waiting"]), stuck
    assert not any(r["message"] == "poller daemon stopped" for r in records)
