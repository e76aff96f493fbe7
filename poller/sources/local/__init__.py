"""``local://NAME``: a durable development queue in the SQLite state file, with SQS semantics.

The queue itself is in ``queue.py``; this module is what the rest of poller needs to know
about the kind: its URI, options and defaults, and how to open it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from poller.sources.base import (
    AwsDefaults,
    Family,
    SourceContext,
    SourceError,
    SourceKind,
    SourceOption,
    SourceSpec,
    options_table,
    parse_options,
    uri_error,
)

if TYPE_CHECKING:
    from poller.sources.local.dead_letters import LocalDeadLetters
    from poller.sources.local.queue import LocalQueue
    from poller.state.sqlite import SqliteStore

DEFAULT_VISIBILITY_TIMEOUT_S: Final = 30  # SQS's default
# A dev queue dead-letters by default so a poison message cannot loop forever; 5 is the
# redrive setting Lambda's guide recommends at least.
DEFAULT_MAX_RECEIVE_COUNT: Final = 5

_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")

OPTIONS: Final = options_table(
    SourceOption(
        "visibility_timeout",
        "int",
        DEFAULT_VISIBILITY_TIMEOUT_S,
        "seconds a received message stays hidden before it is redelivered",
        minimum=0,
        maximum=43200,
    ),
    SourceOption(
        "max_receive_count",
        "int",
        DEFAULT_MAX_RECEIVE_COUNT,
        "receives before a message moves to dead_letter (0: never)",
        minimum=0,
        maximum=1000,
    ),
    SourceOption("dead_letter", "str", None, "local queue for dead letters (default NAME-dlq)"),
)


@dataclass(frozen=True, kw_only=True)
class LocalSpec(SourceSpec):
    queue_name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.queue_name

    @property
    def identity(self) -> tuple[Any, ...]:
        return ("local", self.queue_name)

    @property
    def fifo(self) -> bool:
        return self.queue_name.endswith(".fifo")


def parse(uri: str, defaults: AwsDefaults) -> LocalSpec:
    name, _, query = uri[len("local://") :].partition("?")
    if not _NAME.match(name) or name == ".fifo":
        raise uri_error(
            uri,
            f"Invalid local queue name {name!r} (use 1-80 letters, digits, '-', '_' or '.'; "
            "a '.fifo' suffix makes it FIFO)",
        )
    options = parse_options(uri, query, OPTIONS, "local")
    if options["dead_letter"] is not None:
        target = str(options["dead_letter"]).removeprefix("local://")
        if not _NAME.match(target) or target == name:
            raise uri_error(
                uri, f"Option dead_letter={options['dead_letter']!r} must name another local queue"
            )
        options["dead_letter"] = target
    return LocalSpec(uri=uri, display_uri=f"local://{name}", queue_name=name, options=options)


def _sqlite_store(spec: LocalSpec, context: SourceContext) -> SqliteStore:
    from poller.state.sqlite import SqliteStore

    if not isinstance(context.store, SqliteStore):
        raise SourceError(
            f"{spec.display_uri}: local:// queues live in the SQLite state file; this daemon's "
            "[state] url is not sqlite://",
            retryable=False,
        )
    return context.store


def open_queue(spec: LocalSpec, context: SourceContext) -> LocalQueue:
    from poller.sources.local.queue import LocalQueue

    store = _sqlite_store(spec, context)
    options = spec.options
    return LocalQueue(
        store,
        spec.queue_name,
        visibility_timeout_s=options["visibility_timeout"],
        max_receive_count=options["max_receive_count"] or None,
        dead_letter=options["dead_letter"],
    )


def open_dead_letters(spec: LocalSpec, context: SourceContext) -> LocalDeadLetters:
    from poller.sources.local.dead_letters import LocalDeadLetters

    return LocalDeadLetters(_sqlite_store(spec, context), spec.queue_name)


SOURCE: Final = SourceKind(
    name="local",
    family=Family.QUEUE,
    forms=("local://NAME[?OPTION=VALUE&...]",),
    parse=parse,
    open=open_queue,
    open_sender=open_queue,
    open_dead_letters=open_dead_letters,
    label="local",
)
