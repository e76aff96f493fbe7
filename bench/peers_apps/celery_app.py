"""Celery's contender: one no-op task on a Redis broker, acknowledged after it ran."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from peers_record import record

app = Celery("peers", broker=os.environ["PEERS_REDIS_URL"])
app.conf.update(
    # At-least-once, like the others: a job is acked when it has run, not when received.
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop(sent: float) -> None:
    record(sent)


def open_producer() -> tuple[Any, Any]:
    def send(sent: float) -> None:
        noop.apply_async((sent,))

    return send, lambda: None
