"""The Kafka baseline: a plain kafka-python consumer loop, and the producer every Kafka
contender is fed by.

As a worker (``python kafka_raw.py``) it polls, runs the no-op on each record, and commits the
offsets after the batch ran (at-least-once), until SIGTERM.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from peers_record import record_many


def open_producer() -> tuple[Any, Any]:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=os.environ["PEERS_KAFKA"], linger_ms=0)
    topic = os.environ["PEERS_TOPIC"]

    def send(sent: float) -> None:
        producer.send(topic, repr(sent).encode())

    def close() -> None:
        producer.flush()
        producer.close()

    return send, close


def main() -> None:
    from kafka import KafkaConsumer

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    consumer = KafkaConsumer(
        os.environ["PEERS_TOPIC"],
        bootstrap_servers=os.environ["PEERS_KAFKA"],
        group_id=os.environ["PEERS_GROUP"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # tansu answers a JoinGroup after about half the session timeout.
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
        fetch_max_wait_ms=int(os.environ.get("PEERS_FETCH_MAX_WAIT_MS", "500")),  # its default
    )
    while not stopping:
        batches = consumer.poll(timeout_ms=200)
        for records in batches.values():
            record_many(float(r.value) for r in records)
        if batches:
            consumer.commit()
    consumer.close()


if __name__ == "__main__":
    main()
