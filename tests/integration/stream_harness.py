"""The stream engine over a real ordered source (redis-server stream keys by default, or any
``source_uri``: a Kinesis stream on moto...) and real worker processes, in-process: what the
handler saw is in a file, what the destination got in another (or in ``destination_uri``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from poller.config import Config, FunctionConfig
from poller.engine.destinations import FileDestination, open_destination
from poller.engine.stream import StreamRunner, StreamSettings
from poller.logs import JsonLog
from poller.mappings import parse_event_source
from poller.metrics import MappingMetrics
from poller.runtime.pool import Runtime
from poller.sources.base import TRIM_HORIZON, AwsDefaults, SourceContext
from poller.state.base import StateStore
from poller.state.sqlite import SqliteStore
from tests.servers import RedisServer

# What every handler records: one JSON line per record it was given, with the invoke's id.
HANDLERS = textwrap.dedent(
    """
    import base64, json, os, time

    def _note(event, context, **extra):
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(json.dumps({
                    "shard": r["eventID"].rsplit(":", 1)[0],
                    "seq": r["kinesis"]["sequenceNumber"],
                    "pk": r["kinesis"]["partitionKey"],
                    "body": base64.b64decode(r["kinesis"]["data"]).decode(),
                    "request": context.aws_request_id,
                    "source": r["eventSource"],
                    **extra,
                }) + "\\n")

    def ok(event, context):
        time.sleep(float(os.environ.get("SLEEP", "0")))
        _note(event, context)

    def raw(event, context):
        with open(os.environ["OUT"] + ".events", "a") as f:
            f.write(json.dumps(event) + "\\n")

    def changes(event, context):
        # DynamoDB records, whole, with the invoke's id.
        with open(os.environ["OUT"], "a") as f:
            for r in event["Records"]:
                f.write(json.dumps({**r, "request": context.aws_request_id}) + "\\n")

    def changes_partial(event, context):
        # Fails the records whose new image has a "bad" attribute.
        changes(event, context)
        return {"batchItemFailures": [
            {"itemIdentifier": r["dynamodb"]["SequenceNumber"]}
            for r in event["Records"] if "bad" in r["dynamodb"].get("NewImage", {})
        ]}

    def ordered(event, context):
        # Bodies are "KEY:N", N growing per key as they were sent: a record whose N is not above
        # the last one handled for its key came out of order, and is written down as such.
        keys = os.environ["OUT"] + ".keys"
        os.makedirs(keys, exist_ok=True)
        for r in event["Records"]:
            key, n = base64.b64decode(r["kinesis"]["data"]).decode().rsplit(":", 1)
            path = os.path.join(keys, key)
            last = int(open(path).read()) if os.path.exists(path) else -1
            if int(n) <= last:
                with open(os.environ["OUT"] + ".disorder", "a") as f:
                    f.write(f"{key}: {n} after {last}\\n")
            with open(path, "w") as f:
                f.write(n)
        _note(event, context)

    def poison(event, context):
        bodies = [base64.b64decode(r["kinesis"]["data"]).decode() for r in event["Records"]]
        if any(b.startswith("poison") for b in bodies):
            raise ValueError("poison in the batch")
        _note(event, context)

    def partial(event, context):
        failures = []
        for r in event["Records"]:
            body = base64.b64decode(r["kinesis"]["data"]).decode()
            if body.startswith("bad") and not os.path.exists(os.environ["OUT"] + ".healed"):
                failures.append({"itemIdentifier": r["kinesis"]["sequenceNumber"]})
        _note(event, context)
        return {"batchItemFailures": failures}

    def bogus(event, context):
        _note(event, context)
        return {"batchItemFailures": [{"itemIdentifier": "0-1"}]}

    def failing(event, context):
        _note(event, context)
        raise RuntimeError("always")

    def window(event, context):
        state = dict(event.get("state") or {})
        for r in event["Records"]:
            value = int(base64.b64decode(r["kinesis"]["data"]))
            state["sum"] = state.get("sum", 0) + value
        with open(os.environ["OUT"], "a") as f:
            f.write(json.dumps({
                "window": event["window"], "final": event["isFinalInvokeForWindow"],
                "records": len(event["Records"]), "state": state,
                "shard": event["shardId"],
            }) + "\\n")
        return {"state": state}
    """
)


@dataclass
class Harness:
    server: RedisServer | None
    tmp: Path
    handler: str = "ok"
    keys: tuple[str, ...] = ("s0",)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    destination: bool = False
    destination_path: Path | None = None
    log_stream: io.BytesIO = field(default_factory=io.BytesIO)
    log: JsonLog | None = field(default=None, init=False)
    # Another source than the Redis server's keys, and the config it is opened with.
    source_uri: str | None = None
    config: Config = field(default_factory=Config)
    # An on-failure destination URI (an SQS queue...) instead of the file.
    destination_uri: str | None = None
    # A StreamSource object to run instead of opening the URI (what a real service cannot do).
    stub_source: Any = None

    @property
    def uri(self) -> str:
        if self.source_uri is not None:
            return self.source_uri
        assert self.server is not None
        return f"redis-stream://{self.server.host}:{self.server.port}/0/{','.join(self.keys)}"

    @property
    def out(self) -> Path:
        return self.tmp / "handled.jsonl"

    @property
    def failures(self) -> Path:
        return self.destination_path or self.tmp / "failures.jsonl"

    def events(self) -> list[dict[str, Any]]:
        """The events the ``raw`` handler was given, whole."""
        path = self.tmp / "handled.jsonl.events"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def disorder(self) -> list[str]:
        """What the ``ordered`` handler saw out of order."""
        path = self.tmp / "handled.jsonl.disorder"
        return path.read_text().splitlines() if path.exists() else []

    def handled(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def given_up(self) -> list[dict[str, Any]]:
        if not self.failures.exists():
            return []
        return [json.loads(line) for line in self.failures.read_text().splitlines()]

    def logs(self) -> list[dict[str, Any]]:
        if self.log is not None:
            self.log.flush()  # info and debug records wait up to FLUSH_DELAY_S in its buffer
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]

    async def add(
        self, key: str, *bodies: str, pk: str | None = None, at_ms: int | None = None
    ) -> list[str]:
        """XADD the bodies; ``at_ms`` gives them ids of that millisecond (an arrival time in
        the past)."""
        assert self.server is not None
        client = aioredis.Redis(host=self.server.host, port=self.server.port)
        try:
            pipe = client.pipeline(transaction=False)
            for index, body in enumerate(bodies):
                fields = {"body": body} if pk is None else {"body": body, "pk": pk}
                pipe.xadd(key, fields, id="*" if at_ms is None else f"{at_ms}-{index + 1}")
            return [i.decode() for i in await pipe.execute()]
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def running(
        self,
        store: StateStore | None = None,
        ownership: Any = None,
        *,
        owner: str | None = None,
        wrap_source: Callable[[Any], Any] | None = None,
    ) -> AsyncIterator[StreamRunner]:
        """A runner of mapping "m"; several (each with its ``owner``) may share a store."""
        (self.tmp / "stream_handlers.py").write_text(HANDLERS)
        function = FunctionConfig(
            name="f",
            handler=f"stream_handlers.{self.handler}",
            code_path=str(self.tmp),
            timeout_s=10,
            environment={"OUT": str(self.out), **self.environment},
        )
        log = self.log = JsonLog(self.log_stream, level="debug")
        runtime = Runtime([function], memory_budget_mb=4096, log=log)
        own_store = store is None
        if store is None:
            store = SqliteStore(f"sqlite:///{self.tmp}/state.db")
            await store.open()
        context = SourceContext(config=self.config, store=store, log=log, mapping_uuid="m")
        source = self.stub_source
        if source is None:
            aws = self.config.aws
            spec = parse_event_source(self.uri, AwsDefaults(aws.region, aws.account))
            assert spec.kind.open is not None
            source = spec.kind.open(spec, context)
        if wrap_source is not None:
            source = wrap_source(source)
        settings = StreamSettings(
            uuid="m",
            function_name="f",
            function_arn="arn:aws:lambda:us-east-1:000000000000:function:f",
            batch_size=100,
            batching_window_s=0,
            max_payload_bytes=6 * 1024 * 1024,
            starting=TRIM_HORIZON,
            owner=owner or f"test-{uuid.uuid4().hex[:6]}",
            retry_first_s=0.05,
            retry_most_s=0.2,
        )
        settings = replace(settings, **self.settings)
        runner = StreamRunner(
            settings,
            source,
            runtime.pool("f"),
            store,
            log=log,
            metrics=MappingMetrics(f"m-{uuid.uuid4().hex[:6]}", "f"),
            destination=(
                open_destination(self.destination_uri, context)
                if self.destination_uri
                else FileDestination(self.failures)
                if self.destination
                else None
            ),
            ownership=ownership(store, settings) if ownership is not None else None,
        )
        task = asyncio.get_running_loop().create_task(runner.run())
        try:
            yield runner
        finally:
            await runner.stop(5)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await runtime.close()
            if own_store:
                await store.close()


async def until(condition: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
