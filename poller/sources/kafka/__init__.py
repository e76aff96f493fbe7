"""Apache Kafka (self-managed): ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC[,TOPIC...]``.

Partitions are the shards of an ordered mapping; the consumer group decides which of them this
daemon reads (several daemons in one group split them), and the group's committed offsets are
the only checkpoints. This module is what the rest of poller needs to know about the kind and
loads no Kafka client: the consumer (``consumer.py``), the adapter the engine drives
(``stream.py``) and the producer (``producer.py``) are imported when a mapping or a send needs
them. Security settings come from the config file (``[kafka]``), never from the URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from poller.sources.base import (
    AwsDefaults,
    Family,
    SourceContext,
    SourceKind,
    SourceSpec,
    uri_error,
)

if TYPE_CHECKING:
    from poller.sources.kafka.producer import KafkaSender
    from poller.sources.kafka.stream import KafkaStream

TOPIC: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST: Final = re.compile(
    r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d+))?$"
)
DEFAULT_PORT: Final = 9092
MAX_SERVERS: Final = 10  # SelfManagedEventSource.Endpoints allows 1..10
EVENT_SOURCE: Final = "SelfManagedKafka"


@dataclass(frozen=True, kw_only=True)
class KafkaSpec(SourceSpec):
    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...] = ()  # empty when the URI names none (the Topics parameter must)

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def topic(self) -> str | None:
        """The URI's one topic (None when it names none, or several)."""
        return self.topics[0] if len(self.topics) == 1 else None

    @property
    def name(self) -> str:
        return ",".join(self.topics) or self.display_uri

    @property
    def identity(self) -> tuple[Any, ...]:
        return ("kafka", self.bootstrap_servers, frozenset(self.topics))

    @property
    def bootstrap(self) -> str:
        """The servers as Kafka clients and Lambda's events write them."""
        return ",".join(self.bootstrap_servers)


def parse(uri: str, defaults: AwsDefaults) -> KafkaSpec:
    if uri.startswith("arn:"):
        raise uri_error(
            uri,
            "Amazon MSK cluster ARNs are not supported: give the cluster's bootstrap brokers "
            "as kafka://HOST:PORT[,HOST:PORT...]/TOPIC",
        )
    rest = uri[len("kafka://") :]
    if "?" in rest or "#" in rest:
        raise uri_error(
            uri,
            "Invalid kafka URI (no query or fragment allowed: security settings go in the "
            "config file's [kafka] section)",
        )
    servers_part, _, topic_part = rest.partition("/")
    servers: list[str] = []
    for item in servers_part.split(","):
        m = _HOST.match(item)
        port = int(m["port"]) if m and m["port"] else DEFAULT_PORT
        if not m or not 1 <= port <= 65535:
            raise uri_error(uri, f"Invalid Kafka bootstrap server {item!r} (expected HOST:PORT)")
        host = f"[{m['ipv6']}]" if m["ipv6"] else m["host"]
        server = f"{host}:{port}"
        if server not in servers:
            servers.append(server)
    if len(servers) > MAX_SERVERS:
        raise uri_error(uri, f"Too many Kafka bootstrap servers (at most {MAX_SERVERS})")
    topics = tuple(topic_part.split(",")) if topic_part else ()
    for topic in topics:
        if not TOPIC.match(topic):
            raise uri_error(
                uri, f"Invalid Kafka topic {topic!r} (1-249 letters, digits, '.', '_' or '-')"
            )
    if len(set(topics)) != len(topics):
        raise uri_error(uri, "A topic is listed twice in kafka URI")
    joined = ",".join(servers)
    return KafkaSpec(
        uri=uri,
        display_uri=f"kafka://{joined}/{','.join(topics)}" if topics else f"kafka://{joined}",
        bootstrap_servers=tuple(servers),
        topics=topics,
    )


def open_stream(spec: KafkaSpec, context: SourceContext) -> KafkaStream:
    from poller.sources.kafka.stream import KafkaStream

    return KafkaStream(spec, context)


def open_sender(spec: KafkaSpec, context: SourceContext) -> KafkaSender:
    from poller.sources.kafka.producer import KafkaSender

    return KafkaSender(spec, context)


SOURCE: Final = SourceKind(
    name="kafka",
    family=Family.KAFKA,
    forms=("kafka://HOST:PORT[,HOST:PORT...]/TOPIC[,TOPIC...]",),
    parse=parse,
    open=open_stream,
    open_sender=open_sender,
    label="Kafka",
    record_shape="kafka",
)
