"""Producing to Kafka: ``poller send kafka://...`` and the on-failure destination
``kafka://[HOST:PORT/]TOPIC`` (ESM_SEMANTICS.md §5.4). kafka-python's producer blocks when it
waits for acknowledgements, so every call runs in a worker thread, never on the loop."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Final

import msgspec

from poller.config import KafkaClientConfig
from poller.sources.base import AwsDefaults, SourceContext, SourceError
from poller.sources.kafka.client import connection_options, sender_settings, settings_for
from poller.sources.kafka.records import EVENT_SOURCE, iso_ms

_encode = msgspec.json.Encoder().encode
ACK_TIMEOUT_S: Final = 30.0
# The Kafka-topic destination's spelling of the condition (§5.4, §14).
KAFKA_CONDITIONS: Final = {"RetryAttemptsExhausted": "RetriesExhausted"}


class _Producer:
    """A KafkaProducer made on first use, in a thread."""

    def __init__(self, settings: KafkaClientConfig, servers: list[str], shown: str) -> None:
        self._settings = settings
        self._servers = servers
        self.shown = shown
        self._producer: Any = None

    async def call(self, what: str, fn: Any) -> Any:
        try:
            if self._producer is None:
                options = connection_options(self._settings, self._servers, self.shown)
                self._producer = await asyncio.to_thread(_new_producer, options)
            return await asyncio.to_thread(fn, self._producer)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{self.shown}: {what} failed: {exc!r}") from exc

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(producer.close, 10)


def _new_producer(options: dict[str, Any]) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(acks="all", linger_ms=5, **options)


def _send_all(producer: Any, topic: str, messages: list[tuple[bytes | None, bytes, Any]]) -> int:
    futures = [
        producer.send(topic, key=key, value=value, headers=headers or None)
        for key, value, headers in messages
    ]
    producer.flush(ACK_TIMEOUT_S)
    for future in futures:
        future.get(timeout=ACK_TIMEOUT_S)
    return len(futures)


class KafkaSender:
    """``poller send kafka://HOST:PORT/TOPIC --body ... [--key K] [--header K=V]``."""

    def __init__(self, spec: Any, context: SourceContext) -> None:
        if len(spec.topics) != 1:
            raise SourceError(
                f"{spec.display_uri}: name exactly one topic to send to (kafka://HOST:PORT/TOPIC)",
                retryable=False,
            )
        self.topic = spec.topics[0]
        settings = (
            settings_for(context) if context.mapping_uuid else sender_settings(context.config)
        )
        self._producer = _Producer(settings, list(spec.bootstrap_servers), spec.display_uri)

    async def start(self) -> None:
        await self._producer.call("connect", lambda producer: None)

    async def close(self) -> None:
        await self._producer.close()

    async def send(
        self,
        bodies: list[str],
        *,
        partition_key: str | None = None,
        key: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> int:
        raw_key = key if key is not None else partition_key
        encoded_key = raw_key.encode() if raw_key is not None else None
        encoded_headers = [(name, value.encode()) for name, value in headers or []]
        messages = [(encoded_key, body.encode(), encoded_headers) for body in bodies]
        sent: int = await self._producer.call(
            "send", lambda producer: _send_all(producer, self.topic, messages)
        )
        return sent


class KafkaDestination:
    """On-failure records to a Kafka topic, as Lambda writes them: one message per record
    given up on, keyed by the record's own key, with the metadata and the record itself."""

    wants_payload = True  # the engine adds the event of the records given up on

    def __init__(
        self, servers: list[str], topic: str, settings: KafkaClientConfig, shown: str
    ) -> None:
        self.topic = topic
        self.shown = shown
        self._producer = _Producer(settings, servers, shown)

    async def send(self, record: dict[str, Any]) -> None:
        payload = record["payload"]
        info = record["KafkaBatchInfo"]
        context = dict(record["requestContext"])
        context["condition"] = KAFKA_CONDITIONS.get(context["condition"], context["condition"])
        messages: list[tuple[bytes | None, bytes, Any]] = []
        for shard, records in payload["records"].items():
            for one in records:
                message: dict[str, Any] = {"requestContext": context}
                if "responseContext" in record:
                    message["responseContext"] = record["responseContext"]
                message["version"] = record["version"]
                message["timestamp"] = record["timestamp"]
                message["KafkaBatchInfo"] = {
                    "batchSize": info["batchSize"],
                    "eventSourceArn": info["eventSourceArn"],
                    "bootstrapServers": info["bootstrapServers"],
                    "payloadSize": info["payloadSize"],
                    "recordInfo": {
                        "offset": str(one["offset"]),
                        "timestamp": iso_ms(one["timestamp"] / 1000),
                    },
                }
                message["payload"] = {
                    "eventSource": EVENT_SOURCE,
                    "bootstrapServers": payload["bootstrapServers"],
                    "records": {shard: [one]},
                }
                key = base64.b64decode(one["key"]) if "key" in one else None
                messages.append((key, _encode(message), None))
        await self._producer.call(
            "on-failure send", lambda producer: _send_all(producer, self.topic, messages)
        )

    async def close(self) -> None:
        await self._producer.close()


def open_kafka_destination(
    uri: str, context: SourceContext, source: Any | None
) -> KafkaDestination:
    """``kafka://HOST:PORT[,...]/TOPIC``, or ``kafka://TOPIC`` on the source's own cluster."""
    from poller.sources.kafka import parse

    rest = uri[len("kafka://") :]
    settings = settings_for(context)
    if "/" not in rest:
        if source is None or not hasattr(source, "bootstrap_servers"):
            raise SourceError(
                f"on-failure destination {uri}: kafka://TOPIC needs a Kafka event source; "
                "give the cluster as kafka://HOST:PORT/TOPIC",
                retryable=False,
            )
        servers = list(source.bootstrap_servers)
        shown = f"kafka://{','.join(servers)}/{rest}"
        return KafkaDestination(servers, rest, settings, shown)
    spec = parse(uri, AwsDefaults())
    if len(spec.topics) != 1:
        raise SourceError(
            f"on-failure destination {spec.display_uri}: name exactly one topic", retryable=False
        )
    return KafkaDestination(
        list(spec.bootstrap_servers), spec.topics[0], settings, spec.display_uri
    )
