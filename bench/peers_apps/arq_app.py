"""arq's contender: one no-op coroutine job on Redis (run from its own virtualenv)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from peers_record import record

REDIS = RedisSettings.from_dsn(os.environ["PEERS_REDIS_URL"])


async def noop(ctx: dict[str, Any], sent: float) -> None:
    record(sent)


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = REDIS


def open_producer() -> tuple[Any, Any]:
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(create_pool(REDIS))

    def send(sent: float) -> None:
        loop.run_until_complete(pool.enqueue_job("noop", sent))

    def close() -> None:
        loop.run_until_complete(pool.aclose())
        loop.close()

    return send, close
