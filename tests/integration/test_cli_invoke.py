"""`poller invoke` and `poller functions list` as a person runs them: a subprocess, its exit
code, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HANDLERS = Path(__file__).resolve().parents[1] / "fixtures" / "handlers"

CONFIG = f"""
[daemon]
memory_mb = 1024

[[functions]]
name = "echo"
handler = "rt_handlers.echo"
code_path = "{HANDLERS}"

[[functions]]
name = "fails"
handler = "rt_handlers.raises"
code_path = "{HANDLERS}"
memory_mb = 256
timeout_s = 2

[[functions]]
name = "chatty"
handler = "rt_handlers.chatty"
code_path = "{HANDLERS}"
reserved_concurrency = 2

[[functions]]
name = "hangs"
handler = "rt_handlers.sleep"
code_path = "{HANDLERS}"
timeout_s = 0.3

[[functions]]
name = "broken"
handler = "rt_no_such_module.handler"
code_path = "{HANDLERS}"
"""


def poller(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    return subprocess.run(
        [sys.executable, "-m", "poller.cli", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


def test_invoke_prints_the_response_and_exits_0(config: Path) -> None:
    done = poller(
        "invoke",
        "echo",
        "--payload",
        '{"hello": "world"}',
        "--config",
        str(config),
        cwd=config.parent,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"hello": "world"}
    assert done.stderr == ""
    # Only the response: no log lines on stdout.
    assert len(done.stdout.strip().splitlines()) == 1


def test_invoke_reads_the_default_config_and_a_payload_file(config: Path) -> None:
    payload = config.parent / "event.json"
    payload.write_text('{"from": "file"}')
    done = poller("invoke", "echo", "--payload-file", str(payload), cwd=config.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"from": "file"}
    from_stdin = poller(
        "invoke", "echo", "--payload-file", "-", cwd=config.parent, stdin='{"from": "stdin"}'
    )
    assert json.loads(from_stdin.stdout) == {"from": "stdin"}
    default = poller("invoke", "echo", cwd=config.parent)
    assert json.loads(default.stdout) == {}


def test_invoke_function_error_prints_the_error_and_exits_1(config: Path) -> None:
    done = poller("invoke", "fails", "--payload", '{"message": "no good"}', cwd=config.parent)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "no good"
    assert error["requestId"]
    assert error["stackTrace"]
    assert done.stderr.strip() == "FunctionError: Unhandled"


@pytest.mark.parametrize(
    ("function", "error_type"),
    [("hangs", "Sandbox.Timedout"), ("broken", "Runtime.ImportModuleError")],
)
def test_invoke_runtime_failures_exit_1(config: Path, function: str, error_type: str) -> None:
    done = poller("invoke", function, "--payload", '{"seconds": 5}', cwd=config.parent)
    assert done.returncode == 1
    assert json.loads(done.stdout)["errorType"] == error_type
    assert "FunctionError: Unhandled" in done.stderr


def test_log_type_tail_prints_the_last_4_kb_of_logs_on_stderr(config: Path) -> None:
    done = poller(
        "invoke", "chatty", "--payload", '{"lines": 300}', "--log-type", "Tail", cwd=config.parent
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"lines": 300}
    assert len(done.stderr.encode()) <= 4096
    lines = done.stderr.rstrip("\n").split("\n")
    assert lines[-2].startswith("END RequestId: ")
    assert lines[-1].startswith("REPORT RequestId: ")
    assert "Init Duration:" in lines[-1]  # a cold start
    assert "log line 00299" in done.stderr and "log line 00000" not in done.stderr
    # Without --log-type Tail, no logs at all.
    quiet = poller("invoke", "chatty", "--payload", '{"lines": 3}', cwd=config.parent)
    assert quiet.stderr == ""


def test_log_type_tail_on_a_function_error(config: Path) -> None:
    done = poller(
        "invoke",
        "chatty",
        "--payload",
        '{"lines": 2, "fail": true}',
        "--log-type",
        "Tail",
        cwd=config.parent,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["errorType"] == "RuntimeError"
    stderr = done.stderr
    assert "log line 00001" in stderr
    assert "[ERROR] RuntimeError: chatty failed" in stderr
    assert stderr.index("REPORT RequestId:") < stderr.index("FunctionError: Unhandled")


def test_invoke_usage_errors(config: Path) -> None:
    unknown = poller("invoke", "nope", cwd=config.parent)
    assert unknown.returncode == 2
    assert "no function named 'nope'" in unknown.stderr and "echo" in unknown.stderr
    bad_json = poller("invoke", "echo", "--payload", "{nope", cwd=config.parent)
    assert bad_json.returncode == 2
    assert "not valid JSON" in bad_json.stderr
    assert bad_json.stdout == ""


def test_functions_list(config: Path) -> None:
    done = poller("functions", "list", "--config", str(config), cwd=config.parent)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == ["echo", "fails", "chatty", "hangs", "broken"]
    fails = rows[1]
    assert fails[1] == "rt_handlers.raises"
    assert "memory=256MB" in fails and "timeout=2s" in fails
    assert f"code={HANDLERS}" in fails
    assert "reserved=2" in rows[2]


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ("memory_mb = 64", "functions[0].memory_mb"),
        ("memory_mb = 20000", "functions[0].memory_mb"),
        ("timeout_s = 0", "functions[0].timeout_s"),
        ('colour = "blue"', "functions[0].colour"),
    ],
)
@pytest.mark.parametrize("command", [("functions", "list"), ("invoke", "f")])
def test_config_errors_name_the_key_and_the_file(
    tmp_path: Path, snippet: str, key: str, command: tuple[str, ...]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[[functions]]\nname = "f"\nhandler = "rt_handlers.echo"\n{snippet}\n')
    done = poller(*command, "--config", str(path), cwd=tmp_path)
    assert done.returncode != 0
    assert str(path.resolve()) in done.stderr
    assert key in done.stderr
    assert done.stdout == ""


def test_run_stops_on_a_bad_mapping_in_the_config_like_any_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[functions]]\nname = "f"\nhandler = "rt_handlers.echo"\n'
        '[[mappings]]\nname = "m"\nfunction_name = "f"\nevent_source_arn = "local://q"\n'
        "batch_size = 0\n"
    )
    done = poller("run", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {path.resolve()}:8: mappings[0].batch_size: ")
    assert done.stdout == ""
