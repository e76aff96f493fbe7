"""Event source adapters, one module per service. ``open_queue_source`` picks one by URI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poller.sources.base import SourceError

if TYPE_CHECKING:
    from poller.config import Config
    from poller.mappings import EventSource, Mapping
    from poller.sources.base import QueueSender, QueueSource
    from poller.state.base import StateStore


def _queue(source: EventSource, config: Config, store: StateStore, group: str | None) -> Any:
    if source.kind == "local":
        from poller.sources.local import LocalQueue
        from poller.state.sqlite import SqliteStore

        if not isinstance(store, SqliteStore):
            raise SourceError(
                f"{source.display_uri}: local:// queues live in the SQLite state file; "
                "this daemon's [state] url is not sqlite://", retryable=False,
            )
        options = source.options
        return LocalQueue(
            store,
            source.queue_name or "",
            visibility_timeout_s=options.get("visibility_timeout", 30),
            max_receive_count=options.get("max_receive_count", 5) or None,
            dead_letter=options.get("dead_letter"),
        )
    if source.kind == "sqs":
        from poller.sources.sqs import SqsQueue

        return SqsQueue(
            queue_name=source.queue_name or "",
            region=source.region or config.aws.region,
            account=source.account or config.aws.account,
            queue_url=source.queue_url,
            endpoint_url=config.aws.endpoint_url,
            profile=config.aws.profile,
            arn=source.arn or "",
        )
    if source.kind == "redis-queue":
        from poller.sources.redis import RedisQueue

        return RedisQueue.from_source(source, config, group=group)
    raise SourceError(f"{source.display_uri}: {source.kind} is not a queue source",
                      retryable=False)


def open_queue_source(mapping: Mapping, config: Config, store: StateStore) -> QueueSource:
    """The source a queue mapping polls (not connected yet: the runner calls start())."""
    from poller.mappings import parse_event_source

    # Parsed again with the config's region/account: sqs://NAME says neither.
    parsed = parse_event_source(
        mapping.event_source_arn, default_region=config.aws.region,
        default_account=config.aws.account,
    )
    source: QueueSource = _queue(parsed, config, store, group=mapping.uuid)
    return source


def open_queue_sender(uri: str, config: Config, store: StateStore) -> QueueSender:
    """Something to put messages on the queue at ``uri`` (for `poller send`)."""
    from poller.mappings import parse_event_source

    source = parse_event_source(
        uri, default_region=config.aws.region, default_account=config.aws.account
    )
    sender: QueueSender = _queue(source, config, store, group=None)
    return sender
