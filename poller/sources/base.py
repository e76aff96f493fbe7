"""What the engine needs from a source, and what every source module declares about itself.

Sources do I/O only: they never decide to retry, split, drop or dead-letter; the engine calls
these methods when it has decided. A source module (one per service, listed in
``poller/sources/__init__.py``) declares a ``SOURCE``: a ``SourceKind`` that says which URIs it
takes, how it parses them into its own small spec, which family of delivery contract it
follows, and how to open the adapter the engine drives and the sender `poller send` uses.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl

import msgspec

from poller.redaction import redact

if TYPE_CHECKING:
    from poller.config import Config
    from poller.logs import JsonLog
    from poller.state.base import StateStore

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


class Message:
    """One queue message as the engine sees it.

    Its §7.1 record comes as a dict (``record``), as JSON (``encoded``) or both; the other is
    derived on first use. The engine puts ``encoded`` into the event, so a source that builds
    the JSON directly skips a dict per message on the hot path, and one that encoded the dict
    to measure it hands the bytes over instead of having them encoded again.
    """

    __slots__ = (
        "_encoded",
        "_record",
        "body",
        "extra",
        "group",
        "id",
        "receipt",
        "receive_count",
        "size",
    )

    def __init__(
        self,
        id: str,  # messageId: what batchItemFailures' itemIdentifier names
        receipt: str,  # the handle delete/change_visibility need (SQS receipt, Redis entry id)
        body: str,
        receive_count: int,  # ApproximateReceiveCount, including this receive
        record: dict[str, Any] | None,
        size: int,  # encoded size of the record in bytes (6 MB cap); an upper bound is fine
        group: str | None = None,  # FIFO message group, if any
        extra: dict[str, Any] | None = None,  # source-private bookkeeping
        encoded: bytes | None = None,
    ) -> None:
        if record is None and encoded is None:
            raise ValueError("a Message needs its record, encoded or as a dict")
        self.id = id
        self.receipt = receipt
        self.body = body
        self.receive_count = receive_count
        self._record = record
        self.size = size
        self.group = group
        self.extra = extra
        self._encoded = encoded

    @property
    def record(self) -> dict[str, Any]:
        """The full SQS-shaped record that goes into the event (§7.1)."""
        if self._record is None:
            self._record = _decode_json(self._encoded)
        return self._record

    @property
    def encoded(self) -> bytes:
        """The record as compact JSON, exactly as it goes into the event."""
        if self._encoded is None:
            self._encoded = _encode_json(self._record)
        return self._encoded

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, receipt={self.receipt!r}, "
            f"receive_count={self.receive_count}, size={self.size})"
        )


@dataclass(slots=True, frozen=True)
class Depth:
    visible: int  # waiting to be received
    in_flight: int  # received, not yet deleted (hidden by the visibility timeout)

    @property
    def backlog(self) -> int:
        return self.visible + self.in_flight


class SourceError(Exception):
    """The service failed in a way a person should see (bad queue name, auth, unreachable).

    ``retryable`` says whether trying again later may work (a restart, a network blip) or whether
    the mapping's configuration must change first. ``throttled`` says the service refused the
    call for its rate limits (Kinesis's ProvisionedThroughputExceededException): the source is
    fine and the caller only has to slow down.
    """

    def __init__(self, message: str, *, retryable: bool = True, throttled: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.throttled = throttled


class QueueSource(Protocol):
    """A queue (SQS-like) the engine polls. One instance per mapping runner."""

    # True where the service moves messages to a dead-letter queue itself (SQS redrive policy);
    # False for a DeadLetterQueue, whose dead_letter() the engine calls.
    native_redrive: bool
    # Seconds a received message stays hidden; known after start().
    visibility_timeout_s: float
    # Receives after which the engine dead-letters a message (None: never); sources without
    # native redrive only.
    max_receive_count: int | None
    # Most messages one receive() call can return (10 for SQS).
    max_receive_batch: int
    # FIFO queue: the service keeps one batch in flight per message group.
    fifo: bool

    async def start(self) -> None:
        """Connect, check the queue exists, read its attributes. Raises SourceError."""

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        """Up to max_messages, waiting up to wait_s for the first to arrive."""

    async def delete(self, messages: list[Message]) -> None:
        """Acknowledge: the messages are done and must not come back."""

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        """Hide the messages for timeout_s more seconds from now (the heartbeat)."""

    async def depth(self) -> Depth:
        """Visible and in-flight counts, for scaling and metrics."""

    async def close(self) -> None:
        """Release connections. Unsettled messages simply reappear after their visibility."""


class DeadLetterQueue(QueueSource, Protocol):
    """A queue without native redrive: the engine moves poison messages itself."""

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Move the messages to the dead-letter target with the reason, atomically per message:
        a crash part-way must neither lose nor duplicate one."""


class QueueSender(Protocol):
    """Putting messages on a queue: `poller send` and the tests. start() before send()."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(
        self,
        bodies: list[str],
        *,
        delay_s: int = 0,
        group: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> int:
        """Enqueue the bodies (in service-sized chunks); returns how many were accepted."""


# -- ordered sources ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shard:
    """One ordered part of a stream: a Kinesis or DynamoDB shard, a Redis stream key."""

    id: str
    # Shards this one was split or merged from: it is read only after they were read to the end.
    parents: tuple[str, ...] = ()
    # No record will be added any more (resharding closed it); its reader reaches an end.
    closed: bool = False


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where a shard reader starts."""

    kind: str  # "after" (a sequence number), "trim_horizon", "latest" or "at_timestamp"
    sequence: str | None = None
    timestamp: float | None = None  # epoch seconds, for at_timestamp

    @classmethod
    def after(cls, sequence: str) -> StartAt:
        return cls("after", sequence=sequence)


TRIM_HORIZON: Final = StartAt("trim_horizon")
LATEST: Final = StartAt("latest")


class StreamRecord(msgspec.Struct, gc=False, eq=False):
    """One record of a shard as the engine sees it: what ordering, checkpoints, lanes, record
    age and the 6 MB cap need, and the record as it goes into the event (``encoded``).

    A struct the garbage collector does not track (it holds no container, so it can be in no
    reference cycle): a stream mapping makes one per record, and tracked objects made at that
    rate set off a young-generation collection every few hundred records. Compared by
    identity, as a plain object would be."""

    sequence: str  # what a checkpoint stores and batchItemFailures names
    partition_key: str  # decides the lane (ParallelizationFactor)
    arrival: float  # epoch seconds the service received it (iterator and record age)
    encoded: bytes
    settled: bool = False  # the engine's: done, filtered or given up on

    @property
    def size(self) -> int:
        return len(self.encoded)

    def __repr__(self) -> str:
        return f"StreamRecord({self.sequence!r}, key={self.partition_key!r})"


@dataclass(slots=True)
class ReadResult:
    records: list[StreamRecord]
    # The reader of a closed shard reached its end: nothing will ever follow.
    end: bool = False
    # How far the reader is behind the tip of the shard, where the service says (ms).
    behind_ms: int | None = None
    # Records the service dropped (retention, trimming) between the last read and these, which
    # the mapping therefore never saw; 1 when the service cannot say how many.
    lost: int = 0


class ShardReader(Protocol):
    # The sequence number the reader starts after, where the service can name it (LATEST and
    # AT_TIMESTAMP resolved when the reader opened): the engine checkpoints it at once, so a
    # restart before the first record does not move the start.
    start_point: str | None

    async def read(self, limit: int, wait_s: float) -> ReadResult:
        """Up to ``limit`` records after the last ones returned, waiting up to wait_s for the
        first where the service can block. Raises SourceError."""

    async def close(self) -> None: ...


class StreamSource(Protocol):
    """An ordered source whose shards are read from positions the engine checkpoints.

    I/O only: listing shards, opening readers, reading. Retries of delivery, checkpoint
    decisions, batching and ordering are the engine's.
    """

    # The key of the batch description in an on-failure record (§4.5): "KinesisBatchInfo",
    # "DDBStreamBatchInfo".
    batch_info_key: str
    # The stream's ARN (or display URI) the on-failure record names as its streamArn.
    stream_arn: str
    # How often an idle shard is polled where reads cannot block (seconds).
    idle_poll_s: float

    async def start(self) -> None:
        """Connect and check the stream exists. Raises SourceError."""

    async def shards(self) -> list[Shard]:
        """Every shard, with its parents and whether it is closed."""

    async def open_reader(self, shard: Shard, start: StartAt) -> ShardReader: ...

    async def close(self) -> None: ...


class StreamSender(Protocol):
    """Putting records on a stream (`poller send`). start() before send()."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, bodies: list[str], *, partition_key: str | None = None) -> int:
        """Append the bodies; returns how many were accepted."""


# -- source kinds --------------------------------------------------------------------------------


class Family(enum.StrEnum):
    """The delivery contract a source follows, which decides the mapping parameters it takes
    and the engine that runs it."""

    QUEUE = "queue"  # SQS's: visibility timeout, delete on success, dead-lettering
    STREAM = "stream"  # Kinesis's: shards read in order, checkpoints in the state store
    KAFKA = "kafka"  # partitions read in order, offsets committed to the consumer group


STARTING_POSITIONS: Final = ("LATEST", "AT_TIMESTAMP", "TRIM_HORIZON")  # AWS's message order


@dataclass(frozen=True, slots=True)
class AwsDefaults:
    """What an AWS URI may leave out (``sqs://NAME`` names neither region nor account)."""

    region: str = "us-east-1"
    account: str = "000000000000"


class SourceUriError(ValueError):
    """A URI of a known kind that is malformed; the message says what and shows the URI
    redacted."""


def uri_error(uri: str, what: str) -> SourceUriError:
    return SourceUriError(f"{what} in event source {redact(uri)!r}.")


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """A parsed event source. Each source module subclasses it with the fields of its service.

    ``uri`` is the URI as given and may hold a password: never show it; ``display_uri`` is
    safe to show and is what events carry as ``eventSourceARN``.
    """

    uri: str = field(repr=False)
    display_uri: str

    @property
    def kind(self) -> SourceKind:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The resource's own short name (queue, stream key, stream, table, topic)."""
        raise NotImplementedError

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two URIs the same resource, for duplicate-mapping detection."""
        raise NotImplementedError

    @property
    def fifo(self) -> bool:
        return False

    @property
    def has_credentials(self) -> bool:
        """True when the URI itself holds a password (stored in the registry as given)."""
        return False

    @property
    def unsupported(self) -> str | None:
        """Why this version cannot run a mapping on this source although its kind runs (a form
        of the service it does not read yet), as a message for the person creating it."""
        return None


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What opening an adapter or a sender may need besides the spec."""

    config: Config
    store: StateStore
    log: JsonLog
    # The mapping the adapter serves (a default consumer group is named after it); None for a
    # sender, which must not create anything only a reader needs.
    mapping_uuid: str | None = None
    # The mapping itself (a ``poller.mappings.Mapping``), for parameters only one kind of
    # source reads (Kafka's Topics and ConsumerGroupId); None for a sender.
    mapping: Any = None


@dataclass(frozen=True)
class SourceKind:
    """One kind of event source, as its module declares it (``SOURCE``)."""

    name: str  # "sqs", "redis-queue", ...: how messages and the README name it
    family: Family
    forms: tuple[str, ...]  # the URI and ARN forms it accepts, for --help and errors
    parse: Callable[[str, AwsDefaults], SourceSpec]
    # The adapter the engine drives (None: this version has no runner for the kind, and
    # creating a mapping on it is refused).
    open: Callable[[Any, SourceContext], Any] | None = None
    open_sender: Callable[[Any, SourceContext], Any] | None = None
    # What `poller dlq` reads and redrives when a URI of this kind names a dead-letter target
    # (a ``dead_letters.DeadLetters``; None: the kind holds no dead letters).
    open_dead_letters: Callable[[Any, SourceContext], Any] | None = None
    # StartingPosition values the service supports (ordered families only).
    starting_positions: tuple[str, ...] = STARTING_POSITIONS
    # On-failure destinations must be standard (not FIFO) queues (DynamoDB Streams).
    standard_destinations_only: bool = False
    # How AWS's duplicate-mapping message names the source ("SQS arn").
    label: str = ""
    # The record shape its events have ("sqs", "kinesis", "dynamodb", "kafka"): how filters
    # find the data of a record.
    record_shape: str = "sqs"
    # The data key a filter pattern may only address with a JSON object ("data" for Kinesis:
    # a plain-string pattern there is rejected at create, ESM_SEMANTICS.md §11.4).
    filter_json_key: str | None = None

    @property
    def runnable(self) -> bool:
        return self.open is not None


# -- query options -------------------------------------------------------------------------------

_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class SourceOption:
    """One ``?option=value`` of a source URI, with its type, default and range."""

    name: str
    type_name: str  # "str", "int", "bool" or "choice"
    default: Any
    help: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()


def options_table(*options: SourceOption) -> Mapping[str, SourceOption]:
    return {o.name: o for o in options}


def parse_options(
    uri: str, query: str, table: Mapping[str, SourceOption], label: str
) -> dict[str, Any]:
    """Every option of ``table``: the query's values, checked, and the defaults for the rest."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise uri_error(uri, f"Invalid query string {query!r}") from None
    options: dict[str, Any] = {name: o.default for name, o in table.items()}
    seen: set[str] = set()
    for key, raw in pairs:
        option = table.get(key)
        if option is None:
            raise uri_error(uri, f"Unknown {label} option {key!r} (valid: {', '.join(table)})")
        if key in seen:
            raise uri_error(uri, f"Option {key!r} given twice")
        seen.add(key)
        options[key] = _option_value(uri, option, raw)
    return options


def _option_value(uri: str, option: SourceOption, raw: str) -> Any:
    if option.type_name == "int":
        if not re.fullmatch(r"\d+", raw):
            raise uri_error(uri, f"Option {option.name}={raw!r} must be a whole number")
        value = int(raw)
        if (option.minimum is not None and value < option.minimum) or (
            option.maximum is not None and value > option.maximum
        ):
            raise uri_error(
                uri,
                f"Option {option.name}={value} is out of range "
                f"({option.minimum}..{option.maximum})",
            )
        return value
    if option.type_name == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise uri_error(uri, f"Option {option.name}={raw!r} must be true or false")
    if option.type_name == "choice":
        if raw not in option.choices:
            raise uri_error(
                uri, f"Option {option.name}={raw!r} must be one of {', '.join(option.choices)}"
            )
        return raw
    if not raw:
        raise uri_error(uri, f"Option {option.name} must not be empty")
    return raw
