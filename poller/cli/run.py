"""`poller invoke`, `poller run` and `poller functions`."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from poller.cli.common import ConfigOption, app, fail, functions_app, load, run_async
from poller.config import ConfigError


@app.command()
def invoke(
    function: Annotated[str, typer.Argument(help="Function name from [[functions]].")],
    payload: Annotated[
        str | None, typer.Option(help="Event JSON (inline). Default: {}.", show_default=False)
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option(
            help="Read the event JSON from this file ('-' for stdin).", show_default=False
        ),
    ] = None,
    log_type: Annotated[
        str | None,
        typer.Option(help="'Tail' prints the last 4 KB of the invocation's logs on stderr."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Invoke a function once, synchronously, and print its response JSON."""
    cfg = load(config)
    if payload is not None and payload_file is not None:
        raise fail("give --payload or --payload-file, not both")
    if log_type not in (None, "None", "Tail"):
        raise fail(f"--log-type must be Tail or None, not {log_type!r}")
    if payload_file is not None:
        try:
            raw = sys.stdin.buffer.read() if str(payload_file) == "-" else payload_file.read_bytes()
        except OSError as exc:
            raise fail(f"cannot read --payload-file {payload_file}: {exc.strerror}") from None
    else:
        raw = (payload if payload is not None else "{}").encode()
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise fail(f"the payload is not valid JSON: {exc}") from None
    try:
        cfg.function(function)
    except ConfigError as exc:
        raise fail(str(exc)) from None

    from poller.logs import JsonLog
    from poller.runtime.pool import Runtime
    from poller.runtime.results import Outcome

    async def go() -> Any:
        # Function logs go nowhere unless asked for: stdout carries only the response.
        runtime = Runtime(
            cfg.functions,
            memory_budget_mb=cfg.daemon.memory_mb,
            max_request_bytes=cfg.daemon.max_request_bytes,
            max_response_bytes=cfg.daemon.max_response_bytes,
            region=cfg.aws.region,
            account=cfg.aws.account,
            log=JsonLog(io.BytesIO(), level="error"),
        )
        try:
            return await runtime.invoke(function, raw, capture_logs=log_type == "Tail")
        finally:
            await runtime.close()

    result = run_async(go())
    if log_type == "Tail":
        sys.stderr.write(result.log_tail())
        sys.stderr.flush()
    sys.stdout.write(result.payload.decode(errors="replace") + "\n")
    sys.stdout.flush()
    if result.outcome is not Outcome.OK:
        typer.echo("FunctionError: Unhandled", err=True)
        raise typer.Exit(1)


@functions_app.command("list")
def functions_list(config: ConfigOption = None) -> None:
    """List the functions in the config file."""
    cfg = load(config)
    for fn in cfg.functions:
        typer.echo(
            f"{fn.name}\t{fn.handler}\tmemory={fn.memory_mb}MB\ttimeout={fn.timeout_s:g}s"
            f"\treserved={fn.reserved_concurrency if fn.reserved_concurrency is not None else '-'}"
            f"\tprovisioned={fn.provisioned_concurrency}\tcode={fn.code_path}"
        )


# -- run --------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the daemon in the foreground: JSON log lines on stdout, /metrics on [daemon]
    http_listen. SIGTERM or SIGINT drains in-flight invokes, a second one exits at once."""
    cfg = load(config)
    from poller.daemon import Daemon

    async def go() -> int:
        return await Daemon(cfg).run()

    code = run_async(go())
    raise typer.Exit(code)
