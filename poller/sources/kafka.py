"""Apache Kafka (self-managed): ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from poller.sources.base import AwsDefaults, Family, SourceKind, SourceSpec, uri_error

TOPIC: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST: Final = re.compile(
    r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d+))?$"
)
DEFAULT_PORT: Final = 9092
MAX_SERVERS: Final = 10  # SelfManagedEventSource.Endpoints allows 1..10


@dataclass(frozen=True, kw_only=True)
class KafkaSpec(SourceSpec):
    bootstrap_servers: tuple[str, ...]
    topic: str | None = None  # None when the URI names none (the Topics parameter must)

    @property
    def kind(self) -> SourceKind:
        return SOURCE

    @property
    def name(self) -> str:
        return self.topic or self.display_uri

    @property
    def identity(self) -> tuple[Any, ...]:
        return ("kafka", self.bootstrap_servers, self.topic)


def parse(uri: str, defaults: AwsDefaults) -> KafkaSpec:
    rest = uri[len("kafka://") :]
    if "?" in rest or "#" in rest:
        raise uri_error(uri, "Invalid kafka URI (no query or fragment allowed)")
    servers_part, _, topic = rest.partition("/")
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
    if topic and not TOPIC.match(topic):
        raise uri_error(
            uri, f"Invalid Kafka topic {topic!r} (1-249 letters, digits, '.', '_' or '-')"
        )
    joined = ",".join(servers)
    return KafkaSpec(
        uri=uri,
        display_uri=f"kafka://{joined}/{topic}" if topic else f"kafka://{joined}",
        bootstrap_servers=tuple(servers),
        topic=topic or None,
    )


SOURCE: Final = SourceKind(
    name="kafka",
    family=Family.KAFKA,
    forms=("kafka://HOST:PORT[,HOST:PORT...]/TOPIC",),
    parse=parse,
    label="Kafka",
)
