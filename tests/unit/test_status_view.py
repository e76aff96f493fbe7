"""How `poller status` finds the daemon and shows what /status says."""

from __future__ import annotations

from pathlib import Path

from poller.cli.status import daemon_url, render
from poller.config import load_config


def _config(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nhttp_listen = "{listen}"\n')
    return path


def test_a_wildcard_listen_address_is_reached_on_loopback(tmp_path: Path) -> None:
    assert daemon_url(load_config(_config(tmp_path, "0.0.0.0:9102"))) == "http://127.0.0.1:9102"
    assert daemon_url(load_config(_config(tmp_path, "[::]:9102"))) == "http://[::1]:9102"
    assert daemon_url(load_config(_config(tmp_path, "10.1.2.3:80"))) == "http://10.1.2.3:80"


def test_a_stream_mapping_shows_how_far_behind_and_its_iterator_age() -> None:
    document = {
        "daemon": {"version": "1", "pid": 7, "state": "draining", "ready": False},
        "mappings": [
            {
                "uuid": "u-1",
                "name": None,
                "state": "running",
                "functionName": "fn",
                "eventSource": "redis-stream://h/k",
                "backlog": None,
                "iteratorAgeSeconds": 125.2,
                "concurrency": 1,
                "concurrencyTarget": 2,
                "lastProcessingResult": "PROBLEM: Function call failed",
                "lastError": "ValueError: bad",
                "shards": [{"millisBehindLatest": 4000}, {"millisBehindLatest": None}],
            }
        ],
        "functions": [],
    }
    lines = render(document, "http://h:1")
    assert lines[0].startswith("poller 1 at http://h:1 (pid 7): draining, NOT READY")
    row = next(line for line in lines if "u-1" in line)
    assert row.split()[:2] == ["-", "u-1"]
    assert "4.0s behind" in row and "2m05s" in row and " 1/2 " in row
    assert row.endswith("PROBLEM: Function call failed (ValueError: bad)")


def test_the_status_document_names_the_state_of_mappings_without_a_runner() -> None:
    from types import SimpleNamespace

    from poller.mappings import create_mapping
    from poller.status import status_document

    def mapping(name: str, enabled: bool = True) -> object:
        params = {"function_name": "fn", "event_source_arn": f"local://{name}", "enabled": enabled}
        return create_mapping(params, uuid=ids[name], now=1.0)

    ids = {name: f"00000000-0000-4000-8000-00000000000{i}" for i, name in enumerate("abc")}

    supervisor = SimpleNamespace(
        mappings={
            ids["a"]: mapping("a", enabled=False),
            ids["b"]: mapping("b"),
            ids["c"]: mapping("c"),
        },
        running={},
        problems={ids["b"]: "PROBLEM: function 'fn' is not defined"},
    )

    def states(draining: bool) -> dict[str, tuple[str, bool]]:
        document = status_document(
            supervisor=supervisor,  # type: ignore[arg-type]
            runtime=None,
            http_listen="127.0.0.1:1",
            state_url="redis://:secret@h:6379/0",
            started=0.0,
            ready=False,
            draining=draining,
        )
        assert "secret" not in str(document["daemon"])
        return {m["uuid"]: (m["state"], m["problem"]) for m in document["mappings"]}

    assert states(False) == {
        ids["a"]: ("disabled", False),
        ids["b"]: ("not running", True),
        ids["c"]: ("pending", False),
    }
    assert states(True)[ids["c"]] == ("stopped", False)
