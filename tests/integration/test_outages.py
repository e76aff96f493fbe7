"""A service a running mapping depends on goes wrong: its key deleted, its credentials revoked,
a password it does not have, a server that accepts connections and never answers. Each time
the mapping shows the problem in its status, logs it once for the outage, and resumes by itself
when the service is back, with nothing lost. A real `poller run` against a private redis-server
per test (they reconfigure it)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.daemon_helpers import DaemonProcess, cli, wait_for
from tests.fault.proxy import Proxy
from tests.servers import RedisServer, free_port

HANDLER = textwrap.dedent(
    """
    import base64, os

    def handle(event, context):
        with open(os.environ["OUT"], "a") as out:
            for r in event["Records"]:
                body = r["body"] if "body" in r else base64.b64decode(r["kinesis"]["data"]).decode()
                out.write(body + "\\n")
    """
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    instance = RedisServer(workdir=tmp_path / "redis")
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()


class Mapped:
    """One daemon with one declared mapping on ``uri``, and what its handler saw."""

    def __init__(self, tmp: Path, server: RedisServer, kind: str, uri: str) -> None:
        self.tmp, self.server, self.kind, self.key = tmp, server, kind, "jobs"
        self.out = tmp / "handled.txt"
        (tmp / "outage_handler.py").write_text(HANDLER)
        start = 'starting_position = "TRIM_HORIZON"\n' if kind == "redis-stream" else ""
        self.config = tmp / "config.toml"
        http_port = free_port()
        self.config.write_text(
            textwrap.dedent(
                f"""
                [daemon]
                http_listen = "127.0.0.1:{http_port}"
                reconcile_interval_s = 0.5

                [[functions]]
                name = "handle"
                handler = "outage_handler.handle"
                environment = {{ OUT = "{self.out}" }}

                [[mappings]]
                name = "m"
                function_name = "handle"
                event_source_arn = "{uri}"
                """
            )
            + start
        )
        self.daemon = DaemonProcess(self.config, http_port)

    def admin(self) -> redis.Redis:
        return redis.Redis(host=self.server.host, port=self.server.port, socket_timeout=5)

    def send(self, *bodies: str, client: redis.Redis | None = None) -> None:
        client = client or self.admin()
        for body in bodies:
            client.xadd(self.key, {"body": body})

    def handled(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def result(self) -> str:
        mappings = json.loads(cli(self.config, "mappings", "list").stdout)["EventSourceMappings"]
        return str(mappings[0].get("LastProcessingResult")) if mappings else ""  # not declared yet

    def outage_logs(self) -> list[dict[str, object]]:
        return [
            r
            for r in self.daemon.log_records()
            if str(r.get("message", "")).startswith("event source unavailable")
        ]

    def problem_then_recovery(self, what: str, heal: object, timeout: float = 30) -> None:
        """Wait for the mapping to show a PROBLEM naming ``what``, heal the service, then wait
        for records sent meanwhile to arrive; the outage is logged once."""
        wait_for(lambda: what in self.result(), timeout, f"a PROBLEM naming {what!r}")
        assert self.result().startswith("PROBLEM: "), self.result()
        assert len(self.outage_logs()) == 1
        heal()  # type: ignore[operator]
        self.send("after-1", "after-2")
        wait_for(lambda: {"after-1", "after-2"} <= set(self.handled()), 45, "resumed")
        assert len(self.outage_logs()) == 1
        assert "Traceback" not in self.daemon.logs()


def _uri(kind: str, host: str, port: int, auth: str = "") -> str:
    # A queue's group starts at the stream's beginning, so records sent before the daemon count.
    query = "?start=0" if kind == "redis-queue" else ""
    return f"{kind}://{auth}{host}:{port}/0/jobs{query}"


@pytest.mark.parametrize("kind", ["redis-queue", "redis-stream"])
def test_a_key_deleted_while_running_is_followed_when_written_again(
    tmp_path: Path, server: RedisServer, kind: str
) -> None:
    m = Mapped(tmp_path, server, kind, _uri(kind, server.host, server.port))
    m.send("before-1", "before-2")
    m.daemon.start()
    try:
        wait_for(lambda: len(m.handled()) == 2, 30, "the first records handled")
        m.admin().delete(m.key)
        m.send("after-1", "after-2")
        wait_for(lambda: len(m.handled()) == 4, 30, "records written after the delete handled")
        assert m.handled() == ["before-1", "before-2", "after-1", "after-2"]
        m.daemon.wait_ready(5)
        assert "Traceback" not in m.daemon.logs()
    finally:
        m.daemon.stop()


def test_revoked_credentials_show_a_problem_until_they_are_restored(
    tmp_path: Path, server: RedisServer
) -> None:
    admin = redis.Redis(host=server.host, port=server.port)
    grant = ["on", ">s3cret", "~*", "&*", "+@all"]
    admin.acl_setuser("app", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    m = Mapped(
        tmp_path,
        server,
        "redis-queue",
        _uri("redis-queue", server.host, server.port, "app:s3cret@"),
    )
    m.daemon.start()
    try:
        m.send("first")
        wait_for(lambda: m.handled() == ["first"], 30, "the first record handled")
        admin.acl_deluser("app")  # closes the user's connections: every reconnect is refused
        m.problem_then_recovery(
            "refused the credentials",
            lambda: admin.execute_command("ACL", "SETUSER", "app", *grant),
        )
        assert m.handled()[0] == "first"
    finally:
        m.daemon.stop()


def test_a_password_the_config_lacks_shows_a_problem_until_it_is_not_required(
    tmp_path: Path, server: RedisServer
) -> None:
    admin = redis.Redis(host=server.host, port=server.port)
    admin.config_set("requirepass", "wanted")
    authed = redis.Redis(host=server.host, port=server.port, password="wanted")
    m = Mapped(tmp_path, server, "redis-stream", _uri("redis-stream", server.host, server.port))
    m.send("early", client=authed)
    m.daemon.start(wait_ready=False)  # not ready: a mapping's source refuses it
    try:
        wait_for(lambda: "refused the credentials" in m.result(), 30, "the problem shown")
        status, body = m.daemon.http("/readyz")
        assert status == 503 and "refused the credentials" in body, body
        # The mapping's runner retries; the first record is still there when it gets in.
        m.problem_then_recovery(
            "refused the credentials", lambda: authed.config_set("requirepass", "")
        )
        assert m.handled()[0] == "early"
        m.daemon.wait_ready(10)
    finally:
        m.daemon.stop()


def test_a_server_that_never_answers_is_a_problem_until_it_answers(
    tmp_path: Path, server: RedisServer
) -> None:
    proxy = Proxy(server.port)
    proxy.start()
    m = Mapped(tmp_path, server, "redis-queue", _uri("redis-queue", "127.0.0.1", proxy.port))
    m.daemon.start()
    try:
        m.send("first")
        wait_for(lambda: m.handled() == ["first"], 30, "the first record handled")
        # Connections stay open (new ones are accepted too); nothing comes back for a minute,
        # or until the test lets it flow again.
        proxy.stall(60)
        m.problem_then_recovery("cannot reach Redis", lambda: proxy.stall(0), timeout=40)
    finally:
        m.daemon.stop()
        proxy.stop()
