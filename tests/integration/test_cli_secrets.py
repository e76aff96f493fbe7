"""Nothing the CLI prints carries a source's password, and the registry that stores one as given
is its owner's alone."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tests.daemon_helpers import cli
from tests.servers import RedisServer, free_port

SECRET = "hunter2-s3cret"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text('[[functions]]\nname = "f"\nhandler = "h.handler"\n')
    return config


def test_send_errors_never_show_the_password(tmp_path: Path) -> None:
    config = _config(tmp_path)
    # Nothing listens on the port: the send fails after the URI was parsed and opened.
    uri = f"redis-queue://alice:{SECRET}@127.0.0.1:{free_port()}/0/jobs"
    for extra in ((), ("--count", "1500")):  # the second one shows a progress bar first
        result = cli(config, "send", uri, "--body", "x", *extra, check=False)
        assert result.returncode == 1, result.stderr
        assert "cannot reach Redis" in result.stderr
        assert SECRET not in result.stderr + result.stdout
        assert "127.0.0.1" in result.stderr


def test_send_success_shows_the_source_without_its_password(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = _config(tmp_path)
    # A server without a password accepts a client that sends none: the user info is only
    # there to be hidden.
    uri = f"redis-queue://{redis_server.host}:{redis_server.port}/0/jobs"
    shown = cli(config, "send", uri, "--body", "x", "--count", "1200").stderr
    assert f"sent 1200 message(s) to {uri}" in shown
    bad = f"redis-queue://:{SECRET}@{redis_server.host}:{redis_server.port}/0/jobs"
    refused = cli(config, "send", bad, "--body", "x", check=False)
    assert refused.returncode == 1
    assert SECRET not in refused.stderr + refused.stdout


def test_create_warns_that_a_uri_password_is_stored_and_the_state_file_is_private(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    uri = f"redis-queue://alice:{SECRET}@127.0.0.1:6390/0/jobs"
    created = cli(config, "mappings", "create", "--function-name", "f", "--event-source-arn", uri)
    assert "password_env" in created.stderr and "stored in the registry" in created.stderr
    assert SECRET not in created.stderr + created.stdout
    assert json.loads(created.stdout)["EventSourceArn"] == "redis-queue://127.0.0.1:6390/0/jobs"
    state = tmp_path / ".poller" / "state.db"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    plain = cli(
        config, "mappings", "create", "--function-name", "f", "--event-source-arn", "local://q"
    )
    assert "password" not in plain.stderr
