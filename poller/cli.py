"""The `poller` command: thin wrappers that parse, call a service, print."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from poller.config import Config, ConfigError, find_config, load_config
from poller.redaction import redact

app = typer.Typer(
    help="Lambda event source mappings on your own machines: poll queues and streams, "
    "invoke Lambda-style Python handlers in local worker processes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
functions_app = typer.Typer(
    help="Functions declared in the config file.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(functions_app, name="functions")
mappings_app = typer.Typer(
    help="Event source mappings: the same operations and option names as "
    "`aws lambda create-event-source-mapping` and friends. Changes reach a running daemon "
    "within seconds; no daemon needs to be running.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(mappings_app, name="mappings")

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file. Default: ./config.toml, then ./config.example.toml.",
        show_default=False,
    ),
]

_pretty = msgspec.json.Encoder()


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load(config: str | None) -> Config:
    try:
        return load_config(find_config(config))
    except ConfigError as exc:
        raise fail(str(exc)) from None


def print_json(value: Any) -> None:
    typer.echo(msgspec.json.format(_pretty.encode(value), indent=2).decode())


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


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


# -- mappings ---------------------------------------------------------------------------------

OutputOption = Annotated[
    str, typer.Option("--output", "-o", help="json (AWS's shape) or table (for people).")
]


def _json_option(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return msgspec.json.decode(value.encode())
    except msgspec.DecodeError as exc:
        raise fail(f"{option} is not valid JSON ({exc}): {value!r}") from None


def _source_forms() -> list[str]:
    from poller.sources.kinds import accepted_forms

    return accepted_forms()


def _registry_call(cfg: Config, operation: str, call: Any) -> Any:
    from poller.engine.filter_compiler import compile_filter_criteria
    from poller.mappings import MappingError
    from poller.registry import Registry
    from poller.state.base import StateError, open_store

    async def go() -> Any:
        store = open_store(cfg.state_url, key_prefix=cfg.state.key_prefix)
        await store.open()
        try:
            return await call(Registry(store, validate_filters=compile_filter_criteria))
        finally:
            await store.close()

    try:
        return run_async(go())
    except MappingError as exc:
        raise fail(
            f"An error occurred ({exc.code}) when calling the {operation} operation: {exc}", 1
        ) from None
    except StateError as exc:
        raise fail(f"cannot open the state store: {exc}", 1) from None


def _show(cfg: Config, mappings: list[Any], output: str, single: bool) -> None:
    if output not in ("json", "table"):
        raise fail(f"--output must be json or table, not {output!r}")
    shapes = [m.to_aws(region=cfg.aws.region, account=cfg.aws.account) for m in mappings]
    if output == "json":
        print_json(shapes[0] if single else {"EventSourceMappings": shapes})
        return
    columns = (
        "UUID",
        "State",
        "FunctionName",
        "EventSourceArn",
        "BatchSize",
        "LastProcessingResult",
    )
    rows = [[str(shape.get(c, "")) for c in columns] for shape in shapes]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _params(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


@mappings_app.command("create")
def mappings_create(
    function_name: Annotated[str, typer.Option(help="Function from [[functions]].")],
    event_source_arn: Annotated[
        str,
        typer.Option(help="The event source: " + "; ".join(_source_forms()) + "."),
    ],
    batch_size: Annotated[
        int | None,
        typer.Option(help="Records per invoke (1-10000; queues default 10).", show_default=False),
    ] = None,
    maximum_batching_window_in_seconds: Annotated[
        int | None,
        typer.Option(
            help="Seconds to gather a batch (0-300; needed >= 1 when batch size > 10).",
            show_default=False,
        ),
    ] = None,
    function_response_types: Annotated[
        list[str] | None,
        typer.Option(
            help="ReportBatchItemFailures to honour partial batch responses.", show_default=False
        ),
    ] = None,
    filter_criteria: Annotated[
        str | None,
        typer.Option(
            help='JSON: {"Filters": [{"Pattern": "{\\"body\\": ...}"}]}.', show_default=False
        ),
    ] = None,
    scaling_config: Annotated[
        str | None, typer.Option(help='JSON: {"MaximumConcurrency": 2-1000}.', show_default=False)
    ] = None,
    destination_config: Annotated[
        str | None,
        typer.Option(
            help='JSON: {"OnFailure": {"Destination": "..."}} (streams only).', show_default=False
        ),
    ] = None,
    starting_position: Annotated[
        str | None,
        typer.Option(help="TRIM_HORIZON, LATEST or AT_TIMESTAMP (streams).", show_default=False),
    ] = None,
    enabled: Annotated[
        bool,
        typer.Option(
            "--enabled/--no-enabled", help="Start polling at once, or create it disabled."
        ),
    ] = True,
    name: Annotated[
        str | None,
        typer.Option(
            help="A stable name of your own (config-declared mappings use it).", show_default=False
        ),
    ] = None,
    output: OutputOption = "json",
    config: ConfigOption = None,
) -> None:
    """Create a mapping; prints it as AWS does (with its UUID)."""
    cfg = load(config)
    params = _params(
        function_name=function_name,
        event_source_arn=event_source_arn,
        batch_size=batch_size,
        maximum_batching_window_in_seconds=maximum_batching_window_in_seconds,
        function_response_types=function_response_types or None,
        filter_criteria=_json_option(filter_criteria, "--filter-criteria"),
        scaling_config=_json_option(scaling_config, "--scaling-config"),
        destination_config=_json_option(destination_config, "--destination-config"),
        starting_position=starting_position,
        name=name,
    )
    params["enabled"] = enabled
    _warn_unknown_function(cfg, function_name)
    mapping = _registry_call(cfg, "CreateEventSourceMapping", lambda r: r.create(params))
    if mapping.source.has_credentials:
        typer.echo(
            f"warning: the password in the event source URI is stored in the registry "
            f"({redact(cfg.state_url)}) as given; to keep it out, remove it from the URI and "
            "name an environment variable that holds it with [redis] password_env in the config",
            err=True,
        )
    _show(cfg, [mapping], output, single=True)


def _warn_unknown_function(cfg: Config, function_name: str) -> None:
    if function_name not in {f.name for f in cfg.functions}:
        typer.echo(
            f"warning: function {function_name!r} is not in {cfg.path}; the daemon will report "
            "the mapping as a PROBLEM until it is added under [[functions]]",
            err=True,
        )


@mappings_app.command("list")
def mappings_list(
    function_name: Annotated[
        str | None, typer.Option(help="Only this function's.", show_default=False)
    ] = None,
    event_source_arn: Annotated[
        str | None, typer.Option(help="Only this source's.", show_default=False)
    ] = None,
    output: OutputOption = "json",
    config: ConfigOption = None,
) -> None:
    """List mappings."""
    cfg = load(config)
    mappings = _registry_call(
        cfg,
        "ListEventSourceMappings",
        lambda r: r.list(function_name=function_name, event_source_arn=event_source_arn),
    )
    _show(cfg, mappings, output, single=False)


UuidArgument = Annotated[str, typer.Argument(help="The mapping's UUID.")]


@mappings_app.command("get")
def mappings_get(
    uuid: UuidArgument, output: OutputOption = "json", config: ConfigOption = None
) -> None:
    """Show one mapping."""
    cfg = load(config)
    mapping = _registry_call(cfg, "GetEventSourceMapping", lambda r: r.get(uuid))
    _show(cfg, [mapping], output, single=True)


@mappings_app.command("update")
def mappings_update(
    uuid: UuidArgument,
    function_name: Annotated[
        str | None, typer.Option(help="Invoke another function.", show_default=False)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=False)] = None,
    maximum_batching_window_in_seconds: Annotated[
        int | None, typer.Option(show_default=False)
    ] = None,
    function_response_types: Annotated[
        list[str] | None,
        typer.Option(help="ReportBatchItemFailures, or '' to clear.", show_default=False),
    ] = None,
    filter_criteria: Annotated[
        str | None, typer.Option(help="JSON; '{}' removes the filters.", show_default=False)
    ] = None,
    scaling_config: Annotated[
        str | None, typer.Option(help="JSON; '{}' removes the limit.", show_default=False)
    ] = None,
    destination_config: Annotated[str | None, typer.Option(show_default=False)] = None,
    enabled: Annotated[
        bool | None,
        typer.Option("--enabled/--no-enabled", help="Resume or pause polling.", show_default=False),
    ] = None,
    output: OutputOption = "json",
    config: ConfigOption = None,
) -> None:
    """Change a mapping; a running daemon applies it within seconds."""
    cfg = load(config)
    changes = _params(
        function_name=function_name,
        batch_size=batch_size,
        maximum_batching_window_in_seconds=maximum_batching_window_in_seconds,
        filter_criteria=_json_option(filter_criteria, "--filter-criteria"),
        scaling_config=_json_option(scaling_config, "--scaling-config"),
        destination_config=_json_option(destination_config, "--destination-config"),
        enabled=enabled,
    )
    if function_response_types is not None:
        changes["function_response_types"] = [t for t in function_response_types if t]
    if not changes:
        raise fail("nothing to update: give at least one option (see --help)")
    if function_name:
        _warn_unknown_function(cfg, function_name)
    mapping = _registry_call(cfg, "UpdateEventSourceMapping", lambda r: r.update(uuid, changes))
    _show(cfg, [mapping], output, single=True)


@mappings_app.command("delete")
def mappings_delete(
    uuid: UuidArgument, output: OutputOption = "json", config: ConfigOption = None
) -> None:
    """Delete a mapping (a running daemon stops its runner, draining in-flight batches)."""
    cfg = load(config)
    mapping = _registry_call(cfg, "DeleteEventSourceMapping", lambda r: r.delete(uuid))
    _show(cfg, [mapping], output, single=True)


@mappings_app.command("enable")
def mappings_enable(
    uuid: UuidArgument, output: OutputOption = "json", config: ConfigOption = None
) -> None:
    """Resume polling."""
    cfg = load(config)
    mapping = _registry_call(cfg, "UpdateEventSourceMapping", lambda r: r.set_enabled(uuid, True))
    _show(cfg, [mapping], output, single=True)


@mappings_app.command("disable")
def mappings_disable(
    uuid: UuidArgument, output: OutputOption = "json", config: ConfigOption = None
) -> None:
    """Pause polling (in-flight batches finish; nothing is lost)."""
    cfg = load(config)
    mapping = _registry_call(cfg, "UpdateEventSourceMapping", lambda r: r.set_enabled(uuid, False))
    _show(cfg, [mapping], output, single=True)


# -- send -------------------------------------------------------------------------------------

SEND_CHUNK = 500


@app.command()
def send(
    source: Annotated[str, typer.Argument(help="Where to: " + "; ".join(_source_forms()) + ".")],
    body: Annotated[str | None, typer.Option(help="Message body.", show_default=False)] = None,
    file: Annotated[
        Path | None, typer.Option(help="One message per line ('-' for stdin).", show_default=False)
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="Send each body this many times.")] = 1,
    delay_seconds: Annotated[
        int, typer.Option(min=0, max=900, help="Hide the messages this long.")
    ] = 0,
    group_id: Annotated[
        str | None, typer.Option(help="Message group (FIFO queues).", show_default=False)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Put test messages on a source, in batches, with a progress bar for large sends."""
    cfg = load(config)
    if (body is None) == (file is None):
        raise fail("give exactly one of --body or --file")
    if file is not None:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text()
        except OSError as exc:
            raise fail(f"cannot read --file {file}: {exc.strerror}") from None
        bodies = [line for line in text.splitlines() if line.strip()]
        if not bodies:
            raise fail(f"--file {file} has no non-empty lines")
    else:
        bodies = [body or ""]
    total = len(bodies) * count

    from poller.logs import JsonLog
    from poller.mappings import MappingError, parse_event_source
    from poller.sources.base import AwsDefaults, SourceContext, SourceError
    from poller.state.base import StateError, open_store

    try:
        spec = parse_event_source(source, AwsDefaults(cfg.aws.region, cfg.aws.account))
    except MappingError as exc:
        raise fail(str(exc)) from None
    # Never the URI as given: it may hold a password.
    shown = spec.display_uri
    open_sender = spec.kind.open_sender
    if open_sender is None:
        raise fail(f"{spec.kind.name} sources cannot be sent to with this version of poller")

    def all_bodies() -> Any:
        for _ in range(count):
            yield from bodies

    async def go(progress: Any) -> int:
        store = open_store(cfg.state_url, key_prefix=cfg.state.key_prefix)
        await store.open()
        log = JsonLog(sys.stderr.buffer, level="warning")
        sender = open_sender(spec, SourceContext(config=cfg, store=store, log=log))
        sent = 0
        try:
            await sender.start()
            chunk: list[str] = []
            for item in all_bodies():
                chunk.append(item)
                if len(chunk) >= SEND_CHUNK:
                    sent += await sender.send(chunk, delay_s=delay_seconds, group=group_id)
                    progress.update(len(chunk))
                    chunk = []
            if chunk:
                sent += await sender.send(chunk, delay_s=delay_seconds, group=group_id)
                progress.update(len(chunk))
        finally:
            await sender.close()
            await store.close()
        return sent

    try:
        if total >= 2 * SEND_CHUNK:
            with typer.progressbar(
                length=total, label=f"sending to {shown}", file=sys.stderr
            ) as progress:
                sent = run_async(go(progress))
        else:
            sent = run_async(go(_NoProgress()))
    except (SourceError, StateError) as exc:
        raise fail(redact(str(exc)), 1) from None
    typer.echo(f"sent {sent} message(s) to {shown}", err=True)


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
