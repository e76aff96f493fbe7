"""Starting a mapping: one runner per mapping, built by the factory of its source's family.

The daemon knows runners only through ``Runner``; each family (queue, stream, ...) brings a
factory that turns a mapping, its parsed source and the function's pool into one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from poller.config import Config
from poller.logs import JsonLog
from poller.mappings import Mapping
from poller.metrics import MappingMetrics
from poller.runtime.pool import FunctionPool, Runtime
from poller.sources.base import AwsDefaults, Family, SourceContext, SourceSpec
from poller.sources.kinds import parse_source
from poller.state.base import StateStore


class Runner(Protocol):
    """What the daemon does with a mapping's runner."""

    metrics: MappingMetrics

    @property
    def started(self) -> bool:
        """True once the source answered and polling began (for /readyz)."""

    async def run(self) -> None:
        """Run until stopped, retrying the source while it is unreachable."""

    async def stop(self, grace_s: float) -> None:
        """Stop reading; let in-flight batches finish and settle within grace_s."""

    def status(self) -> dict[str, Any]:
        """What `poller status` and /status show of the mapping while it runs."""


class RunnerError(Exception):
    """The mapping cannot run as configured; the message says why (it becomes its status)."""


@dataclass(frozen=True)
class Services:
    """What every runner may use, shared by all mappings of the daemon."""

    config: Config
    store: StateStore
    runtime: Runtime
    log: JsonLog


Factory = Callable[[Mapping, SourceSpec, FunctionPool, Services, Callable[[str], None]], Runner]


def _factories() -> dict[Family, Factory]:
    from poller.engine.queue import build_queue_runner
    from poller.engine.stream import build_stream_runner

    # Kafka's partitions are shards: the stream engine runs it, with the consumer group as
    # its ownership (the source brings it, see build_stream_runner).
    return {
        Family.QUEUE: build_queue_runner,
        Family.STREAM: build_stream_runner,
        Family.KAFKA: build_stream_runner,
    }


def source_context(
    services: Services, mapping_uuid: str | None, mapping: Mapping | None = None
) -> SourceContext:
    return SourceContext(
        config=services.config,
        store=services.store,
        log=services.log,
        mapping_uuid=mapping_uuid,
        mapping=mapping,
    )


def build_runner(mapping: Mapping, services: Services, on_status: Callable[[str], None]) -> Runner:
    """The runner for ``mapping``; raises RunnerError when it cannot run."""
    aws = services.config.aws
    # Parsed again with the config's region and account: sqs://NAME says neither.
    spec = parse_source(mapping.event_source_arn, AwsDefaults(aws.region, aws.account))
    kind = spec.kind
    factory = _factories().get(kind.family)
    if kind.open is None or factory is None:
        raise RunnerError(f"{kind.name} sources are not supported by this poller version")
    try:
        pool = services.runtime.pool(mapping.function_name)
    except KeyError as exc:
        raise RunnerError(str(exc.args[0])) from None
    return factory(mapping, spec, pool, services, on_status)
