"""faust-streaming's contender: a no-op agent on the topic, one app (consumer group) per run."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import faust
from peers_record import record

app = faust.App(
    os.environ["PEERS_GROUP"],
    broker=f"kafka://{os.environ['PEERS_KAFKA']}",
    store="memory://",
    web_enabled=False,
    # tansu answers a JoinGroup after about half the session timeout.
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
)
topic = app.topic(os.environ["PEERS_TOPIC"], value_type=bytes, value_serializer="raw")


@app.agent(topic)
async def noop(stream: AsyncIterator[bytes]) -> None:
    async for value in stream:
        record(float(value))
