"""`poller send`: put test messages on a source."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from poller.cli.common import ConfigOption, app, fail, load, run_async, source_forms
from poller.redaction import redact

SEND_CHUNK = 500


@app.command()
def send(
    source: Annotated[str, typer.Argument(help="Where to: " + "; ".join(source_forms()) + ".")],
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
    partition_key: Annotated[
        str | None,
        typer.Option(
            help="Partition key of every record (streams): it picks the shard and keeps one "
            "key's records in order. Default: records are spread over the shards.",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="Kafka: the key of every record (it picks the partition).", show_default=False
        ),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option(help="Kafka: a record header, NAME=VALUE (repeatable).", show_default=False),
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
    ordered = spec.kind.family != "queue"
    kafka = spec.kind.family == "kafka"
    if ordered and (delay_seconds or group_id):
        raise fail("--delay-seconds and --group-id are for queues; a stream takes --partition-key")
    if not ordered and partition_key is not None:
        raise fail("--partition-key is for streams; a queue takes --group-id (FIFO queues)")
    if kafka and partition_key is not None:
        raise fail("--partition-key is for streams; a Kafka record takes --key")
    if not kafka and (key is not None or header):
        raise fail("--key and --header are for Kafka topics")
    headers = []
    for item in header or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise fail(f"--header must be NAME=VALUE; got {item!r}")
        headers.append((name, value))
    options: dict[str, Any]
    if kafka:
        options = {"key": key, "headers": headers}
    elif ordered:
        options = {"partition_key": partition_key}
    else:
        options = {"delay_s": delay_seconds, "group": group_id}

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
                    sent += await sender.send(chunk, **options)
                    progress.update(len(chunk))
                    chunk = []
            if chunk:
                sent += await sender.send(chunk, **options)
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
