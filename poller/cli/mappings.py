"""`poller mappings ...`: the registry, with the option names of `aws lambda
create-event-source-mapping` and friends."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from poller.cli.common import (
    ConfigOption,
    fail,
    json_option,
    load,
    mappings_app,
    print_json,
    run_async,
    source_forms,
)
from poller.config import Config
from poller.redaction import redact

OutputOption = Annotated[
    str, typer.Option("--output", "-o", help="json (AWS's shape) or table (for people).")
]


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
    _table(columns, [[str(shape.get(c, "")) for c in columns] for shape in shapes])


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> None:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _timestamp(value: str | None) -> Any:
    """Epoch seconds as a number; anything else (ISO-8601) is left to the model to check."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _params(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


# Options of ordered sources (streams), shared by create and update.
ParallelizationFactor = Annotated[
    int | None,
    typer.Option(
        help="Batches of one shard at once, 1-10 (order per key holds).", show_default=False
    ),
]
BisectOption = Annotated[
    bool | None,
    typer.Option(
        "--bisect-batch-on-function-error/--no-bisect-batch-on-function-error",
        help="Split a failing batch in halves and retry each (streams).",
        show_default=False,
    ),
]
RetryAttempts = Annotated[
    int | None,
    typer.Option(
        help="Retries of a failing batch: -1 (until the records are too old) or 0-10000.",
        show_default=False,
    ),
]
RecordAge = Annotated[
    int | None,
    typer.Option(
        help="Give up on records older than this: -1 (never) or 60-604800 s.", show_default=False
    ),
]
TumblingWindow = Annotated[
    int | None,
    typer.Option(
        help="Aggregate in tumbling windows of this many seconds (0-900; 0: off).",
        show_default=False,
    ),
]
DestinationOption = Annotated[
    str | None,
    typer.Option(
        help='JSON: {"OnFailure": {"Destination": URI}} where URI is an SQS queue, sqs://NAME, '
        "redis-queue://..., local://NAME or file://PATH (streams), or a Kafka topic, "
        "kafka://TOPIC or kafka://HOST:PORT/TOPIC (Kafka sources); an empty Destination "
        "removes it.",
        show_default=False,
    ),
]


@mappings_app.command("create")
def mappings_create(
    function_name: Annotated[str, typer.Option(help="Function from [[functions]].")],
    event_source_arn: Annotated[
        str,
        typer.Option(help="The event source: " + "; ".join(source_forms()) + "."),
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
    destination_config: DestinationOption = None,
    starting_position: Annotated[
        str | None,
        typer.Option(
            help="Where a shard without a checkpoint starts: TRIM_HORIZON, LATEST or "
            "AT_TIMESTAMP (streams; required there).",
            show_default=False,
        ),
    ] = None,
    starting_position_timestamp: Annotated[
        str | None,
        typer.Option(
            help="With AT_TIMESTAMP: epoch seconds or ISO-8601 (not in the future).",
            show_default=False,
        ),
    ] = None,
    parallelization_factor: ParallelizationFactor = None,
    bisect_batch_on_function_error: BisectOption = None,
    maximum_retry_attempts: RetryAttempts = None,
    maximum_record_age_in_seconds: RecordAge = None,
    tumbling_window_in_seconds: TumblingWindow = None,
    topics: Annotated[
        list[str] | None,
        typer.Option(
            help="Kafka: the topic to read (default: the topic in the kafka:// URI).",
            show_default=False,
        ),
    ] = None,
    self_managed_kafka_event_source_config: Annotated[
        str | None,
        typer.Option(
            help='Kafka: JSON {"ConsumerGroupId": "..."} (default: the mapping UUID); fixed '
            "once created.",
            show_default=False,
        ),
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
    kafka_config = json_option(
        self_managed_kafka_event_source_config, "--self-managed-kafka-event-source-config"
    )
    if kafka_config is not None and (
        not isinstance(kafka_config, dict) or set(kafka_config) - {"ConsumerGroupId"}
    ):
        raise fail(
            '--self-managed-kafka-event-source-config must be {"ConsumerGroupId": "..."}; '
            f"got {self_managed_kafka_event_source_config!r}"
        )
    params = _params(
        function_name=function_name,
        event_source_arn=event_source_arn,
        topics=topics or None,
        consumer_group_id=(kafka_config or {}).get("ConsumerGroupId"),
        batch_size=batch_size,
        maximum_batching_window_in_seconds=maximum_batching_window_in_seconds,
        function_response_types=function_response_types or None,
        filter_criteria=json_option(filter_criteria, "--filter-criteria"),
        scaling_config=json_option(scaling_config, "--scaling-config"),
        destination_config=json_option(destination_config, "--destination-config"),
        starting_position=starting_position,
        starting_position_timestamp=_timestamp(starting_position_timestamp),
        parallelization_factor=parallelization_factor,
        bisect_batch_on_function_error=bisect_batch_on_function_error,
        maximum_retry_attempts=maximum_retry_attempts,
        maximum_record_age_in_seconds=maximum_record_age_in_seconds,
        tumbling_window_in_seconds=tumbling_window_in_seconds,
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
    """Show one mapping; an ordered one with each shard's checkpoint, iterator age and state;
    one with a PROBLEM with the error behind it (LastError)."""
    cfg = load(config)
    mapping, shards, last_error = _registry_call(
        cfg, "GetEventSourceMapping", lambda r: r.get_detail(uuid)
    )
    if output == "json" and (shards or last_error):
        shape = mapping.to_aws(region=cfg.aws.region, account=cfg.aws.account)
        extra: dict[str, Any] = {"LastError": last_error} if last_error else {}
        print_json({**shape, **extra, **({"Shards": shards} if shards else {})})
        return
    _show(cfg, [mapping], output, single=True)
    if last_error:
        typer.echo(f"LastError: {last_error}")
    if shards:
        typer.echo("")
        _table(
            ("ShardId", "State", "Checkpoint", "IteratorAgeSeconds"),
            [
                [
                    str(s.get(c, ""))
                    for c in ("ShardId", "State", "Checkpoint", "IteratorAgeSeconds")
                ]
                for s in shards
            ],
        )


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
    destination_config: DestinationOption = None,
    parallelization_factor: ParallelizationFactor = None,
    bisect_batch_on_function_error: BisectOption = None,
    maximum_retry_attempts: RetryAttempts = None,
    maximum_record_age_in_seconds: RecordAge = None,
    tumbling_window_in_seconds: TumblingWindow = None,
    enabled: Annotated[
        bool | None,
        typer.Option("--enabled/--no-enabled", help="Resume or pause polling.", show_default=False),
    ] = None,
    output: OutputOption = "json",
    config: ConfigOption = None,
) -> None:
    """Change a mapping; a running daemon applies it within seconds (an ordered mapping goes on
    from its checkpoints)."""
    cfg = load(config)
    changes = _params(
        function_name=function_name,
        batch_size=batch_size,
        maximum_batching_window_in_seconds=maximum_batching_window_in_seconds,
        filter_criteria=json_option(filter_criteria, "--filter-criteria"),
        scaling_config=json_option(scaling_config, "--scaling-config"),
        destination_config=json_option(destination_config, "--destination-config"),
        parallelization_factor=parallelization_factor,
        bisect_batch_on_function_error=bisect_batch_on_function_error,
        maximum_retry_attempts=maximum_retry_attempts,
        maximum_record_age_in_seconds=maximum_record_age_in_seconds,
        tumbling_window_in_seconds=tumbling_window_in_seconds,
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
