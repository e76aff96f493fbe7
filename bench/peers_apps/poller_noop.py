"""poller's contender: a no-op Lambda handler for SQS-shaped (redis-queue) or Kafka events."""

from __future__ import annotations

import base64
from typing import Any

from peers_record import record_many


def handler(event: dict[str, Any], context: object) -> None:
    if "Records" in event:
        record_many(float(r["body"]) for r in event["Records"])
    else:  # SelfManagedKafka: records grouped by "topic-partition", values in base64
        record_many(
            float(base64.b64decode(r["value"]))
            for batch in event["records"].values()
            for r in batch
        )


def open_producer() -> tuple[Any, Any]:
    """XADD to the redis-queue stream, as any producer of a Redis stream would."""
    import os

    import redis

    client = redis.Redis.from_url(os.environ["PEERS_REDIS_URL"])
    stream = os.environ["PEERS_STREAM"]

    def send(sent: float) -> None:
        client.xadd(stream, {"body": repr(sent)})

    return send, client.close
