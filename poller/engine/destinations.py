"""On-failure destinations of ordered mappings: where the record of a batch given up on goes.

``DestinationConfig.OnFailure.Destination`` may name any queue poller can send to (an SQS
queue ARN or URL, ``sqs://NAME``, ``redis-queue://...``, ``local://NAME``: the record is one
message, its body the JSON), ``file://PATH`` (one JSON line per record, appended and synced),
or, for a Kafka mapping, a Kafka topic (``kafka://HOST:PORT/TOPIC``, or ``kafka://TOPIC`` on the
source's cluster), which gets Lambda's message per record (sources/kafka/producer.py).
A send that fails raises SourceError; the engine keeps the shard waiting and tries again, so a
destination that is down holds the shard instead of dropping records.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from poller.sources.base import AwsDefaults, SourceContext, SourceError, SourceSpec
from poller.sources.kinds import parse_source

_encode = msgspec.json.Encoder().encode


class Destination(Protocol):
    shown: str  # the destination without credentials, for logs and status

    async def send(self, record: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class QueueDestination:
    """A queue, through the sender `poller send` uses for it."""

    def __init__(self, sender: Any, shown: str) -> None:
        self._sender = sender
        self.shown = shown
        self._started = False

    async def send(self, record: dict[str, Any]) -> None:
        if not self._started:
            await self._sender.start()
            self._started = True
        await self._sender.send([_encode(record).decode()])

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._sender.close()


class FileDestination:
    """JSON lines appended to a file, synced before the send returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shown = f"file://{path}"

    async def send(self, record: dict[str, Any]) -> None:
        line = _encode(record) + b"\n"
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            raise SourceError(
                f"on-failure destination {self.shown}: cannot write: {exc.strerror or exc}; "
                "make the file (and its directory) writable for the daemon's user"
            ) from exc

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    async def close(self) -> None:
        """Nothing stays open between sends."""


def _iso_ms(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def failure_batch_info(source: Any, shard_id: str, records: list[Any]) -> dict[str, Any]:
    """The batch description of an on-failure record: the source's own where it has one
    (Kafka's KafkaBatchInfo, §5.4), else Kinesis's (§4.5)."""
    describe = getattr(source, "batch_info", None)
    if describe is not None:
        info: dict[str, Any] = describe(shard_id, records)
        return info
    first, last = records[0], records[-1]
    return {
        "shardId": shard_id,
        "startSequenceNumber": first.sequence,
        "endSequenceNumber": last.sequence,
        "approximateArrivalOfFirstRecord": _iso_ms(first.arrival),
        "approximateArrivalOfLastRecord": _iso_ms(last.arrival),
        "batchSize": len(records),
        "streamArn": source.stream_arn,
    }


def open_destination(
    uri: str, context: SourceContext, source: SourceSpec | None = None
) -> Destination:
    """The destination for a validated DestinationConfig URI (``source``: the mapping's own,
    which ``kafka://TOPIC`` writes to)."""
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        return FileDestination(path if path.is_absolute() else context.config.base_dir / path)
    if uri.startswith("kafka://"):
        from poller.sources.kafka.producer import open_kafka_destination

        return open_kafka_destination(uri, context, source)
    aws = context.config.aws
    spec = parse_source(uri, AwsDefaults(aws.region, aws.account))
    opener = spec.kind.open_sender
    if opener is None:
        raise SourceError(
            f"on-failure destination {spec.display_uri}: poller cannot send to "
            f"{spec.kind.name} here",
            retryable=False,
        )
    sender_context = SourceContext(config=context.config, store=context.store, log=context.log)
    return QueueDestination(opener(spec, sender_context), spec.display_uri)


async def send_failure(
    destination: Destination,
    record: dict[str, Any],
    runner: Any,
    fields: dict[str, Any],
    pause: Callable[[float], Awaitable[None]],
) -> None:
    """Send until it is delivered: a destination that is down holds the shard (``pause``
    raises when the shard is let go meanwhile). The outage is logged once, with its end."""
    failures = 0
    held = ""
    while True:
        try:
            await destination.send(record)
            break
        except SourceError as exc:
            runner.metrics.destination_failures.inc()
            if not failures:
                held = f"PROBLEM: on-failure destination {destination.shown} unavailable: {exc}"
                runner.health.hold(held, str(exc))
                runner.log.error(
                    "on-failure destination unavailable; the shard waits",
                    **fields,
                    destination=destination.shown,
                    error=str(exc),
                )
            failures += 1
            await pause(runner.health.next_backoff())
    if failures:
        runner.health.release(held)
        runner.log.info(
            "on-failure destination reachable again",
            **fields,
            destination=destination.shown,
            failed_sends=failures,
        )
