"""What every `poller` command shares: the app, config loading, errors, output."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
import typer

from poller.config import Config, ConfigError, find_config, load_config

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


def json_option(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return msgspec.json.decode(value.encode())
    except msgspec.DecodeError as exc:
        raise fail(f"{option} is not valid JSON ({exc}): {value!r}") from None


def source_forms() -> list[str]:
    from poller.sources.kinds import accepted_forms

    return accepted_forms()
