"""Dramatiq's contender: one no-op actor on its Redis broker."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from peers_record import record

dramatiq.set_broker(RedisBroker(url=os.environ["PEERS_REDIS_URL"]))


@dramatiq.actor
def noop(sent: float) -> None:
    record(sent)


def open_producer() -> tuple[Any, Any]:
    return noop.send, lambda: None
