"""`poller dlq peek|redrive`: what sits in a dead-letter target, and moving it back."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from poller.cli.common import ConfigOption, app, fail, load, print_json, run_async
from poller.config import Config
from poller.redaction import redact

dlq_app = typer.Typer(
    help="Dead-letter targets: local:// queues, redis-queue:// streams (STREAM_KEY:dlq by "
    "default) and SQS queues.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(dlq_app, name="dlq")

UriArgument = Annotated[
    str,
    typer.Argument(
        help="The dead-letter target: local://NAME-dlq, redis-queue://HOST/KEY:dlq, an SQS "
        "queue ARN, URL or sqs://NAME."
    ),
]
BODY_CHARS = 60  # of a body in the table; --output json shows it whole


def _with_dead_letters(cfg: Config, uri: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open the target ``uri`` names and run ``call(target)`` on it."""
    from poller.logs import JsonLog
    from poller.mappings import MappingError, parse_event_source
    from poller.sources.base import AwsDefaults, SourceContext, SourceError
    from poller.state.base import StateError, open_store

    defaults = AwsDefaults(cfg.aws.region, cfg.aws.account)
    try:
        spec = parse_event_source(uri, defaults)
    except MappingError as exc:
        raise fail(str(exc)) from None
    opener = spec.kind.open_dead_letters
    if opener is None:
        raise fail(f"{spec.kind.name} sources hold no dead letters poller can read or move")

    async def go() -> Any:
        store = open_store(cfg.state_url, key_prefix=cfg.state.key_prefix)
        await store.open()
        log = JsonLog(sys.stderr.buffer, level="warning")
        try:
            target = opener(spec, SourceContext(config=cfg, store=store, log=log))
            try:
                await target.start()
                return await call(target)
            finally:
                await target.close()
        finally:
            await store.close()

    try:
        return run_async(go())
    except (SourceError, StateError) as exc:
        raise fail(redact(str(exc)), 1) from None


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def _short(body: str) -> str:
    flat = body.replace("\n", " ")
    return flat if len(flat) <= BODY_CHARS else flat[: BODY_CHARS - 3] + "..."


@dlq_app.command("peek")
def dlq_peek(
    uri: UriArgument,
    max_messages: Annotated[
        int, typer.Option("--max", min=1, max=10000, help="Show at most this many, oldest first.")
    ] = 10,
    output: Annotated[
        str, typer.Option("--output", "-o", help="table (for people) or json (whole bodies).")
    ] = "table",
    config: ConfigOption = None,
) -> None:
    """Show the messages in a dead-letter target with the reason and receive count of each,
    without taking them out (for SQS, see the README: a peek counts as a receive)."""
    if output not in ("table", "json"):
        raise fail(f"--output must be table or json, not {output!r}")
    cfg = load(config)
    letters = _with_dead_letters(cfg, uri, lambda target: target.peek(max_messages))
    if output == "json":
        print_json({"Messages": [letter.to_json() for letter in letters]})
        return
    if not letters:
        typer.echo("no messages", err=True)
        return
    from poller.cli.status import table_lines

    rows = [
        [
            letter.id,
            _when(letter.sent_ms),
            "-" if letter.receive_count is None else str(letter.receive_count),
            letter.reason or "-",
            letter.source or "-",
            _short(letter.body),
        ]
        for letter in letters
    ]
    columns = ("MESSAGE ID", "SENT (UTC)", "RECEIVES", "REASON", "FROM", "BODY")
    typer.echo("\n".join(table_lines(columns, rows)))


@dlq_app.command("redrive")
def dlq_redrive(
    uri: UriArgument,
    to: Annotated[
        str,
        typer.Option(
            help="The source to move them to: another local:// queue, a redis-queue:// stream "
            "on the same server."
        ),
    ],
    max_messages: Annotated[
        int | None,
        typer.Option(
            "--max",
            min=1,
            help="Move at most this many, oldest first (default: all).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Move dead letters back to a source, oldest first, each atomically: a crash part-way
    neither loses nor duplicates one. Messages dead-lettered again meanwhile stay."""
    cfg = load(config)
    from poller.mappings import MappingError, parse_event_source
    from poller.sources.base import AwsDefaults

    try:
        destination = parse_event_source(to, AwsDefaults(cfg.aws.region, cfg.aws.account))
    except MappingError as exc:
        raise fail(f"--to: {exc}") from None
    moved = _with_dead_letters(cfg, uri, lambda target: target.redrive(destination, max_messages))
    typer.echo(f"moved {moved} message(s) from {redact(uri)} to {destination.display_uri}")
