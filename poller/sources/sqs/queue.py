"""Amazon SQS (or anything speaking its API: moto, LocalStack, ElasticMQ) over aiobotocore.

I/O only: the engine decides what to delete, hide or dead-letter. SQS moves poison messages to
the queue's own dead-letter queue (redrive policy) on receive, so ``native_redrive`` is True and
the engine never counts receives for this source.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from poller.events import SQS_EVENT_SOURCE, encode_record, sqs_record
from poller.logs import JsonLog
from poller.sources.base import Depth, Message, SourceError
from poller.sources.sqs.wire import (
    AUTH_CODES,
    BATCH_CONCURRENCY,
    BEFORE_MD5_ATTRS,
    CONFIG_CODES,
    EXTRA_SYSTEM_ATTRIBUTES,
    MAX_BATCH_ENTRIES,
    MAX_VISIBILITY_S,
    MAX_WAIT_S,
    NETWORK_ERRORS,
    NON_EXISTENT_CODES,
    NON_EXISTENT_QUEUE_MESSAGE,
    RECEIVED_AT,
    VISIBILITY_MARGIN_S,
    chunks,
    collect,
    error_code,
    error_message,
    http_status,
    is_stale_receipt,
    lambda_attributes,
    parse_arn,
    size_chunks,
    summarise,
)

__all__ = ["SqsQueue"]


class SqsQueue:
    """One SQS queue: QueueSource for the engine, QueueSender for `poller send` and tests."""

    native_redrive: bool = True
    max_receive_count: int | None = None
    max_receive_batch: int = MAX_BATCH_ENTRIES

    def __init__(
        self,
        *,
        queue_name: str,
        region: str,
        account: str,
        queue_url: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        arn: str,
        log: JsonLog | None = None,
    ) -> None:
        self.queue_name = queue_name
        self.region = region
        self.account = account
        self.queue_url = queue_url
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.arn = arn
        self.log = log or JsonLog()
        # Provisional until start() reads the queue's attributes.
        self.fifo: bool = queue_name.endswith(".fifo")
        self.visibility_timeout_s: float = 30.0
        self.content_based_dedup: bool = False
        # Informative only: SQS applies it itself. Kept so dead_letter() and status can use it.
        self.redrive_policy: dict[str, Any] | None = None
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._system_attr_param = "MessageSystemAttributeNames"
        self._dlq_url: str | None = None
        self._dlq_url_for: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.close()
        session = get_session()
        if self.profile:
            session.set_config_variable("profile", self.profile)
        config = AioConfig(
            # One quick retry (jittered, <= 2 s) smooths a blip; anything longer is the engine's
            # to back off from, and a dead endpoint is reported within seconds, not minutes.
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=5,
            # Must outlast the 20 s long poll, or every idle receive would time out.
            read_timeout=MAX_WAIT_S + 15,
            # Several pollers long-poll through this one client at once, and each holds a
            # connection for up to 20 s; botocore's default of 10 would serialise them.
            max_pool_connections=64,
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "sqs",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=config,
                )
            )
        except ProfileNotFound as exc:
            await stack.aclose()
            raise SourceError(
                f"SQS queue {self.queue_name}: AWS profile {self.profile!r} not found ({exc}); "
                "fix aws.profile in the config or your ~/.aws files",
                retryable=False,
            ) from None
        except ValueError as exc:
            await stack.aclose()
            # botocore's "Invalid endpoint: ..." for a malformed endpoint_url.
            raise SourceError(
                f"SQS queue {self.queue_name}: bad endpoint_url {self.endpoint_url!r}: {exc}",
                retryable=False,
            ) from None
        self._stack = stack
        input_members = self._client.meta.service_model.operation_model(
            "ReceiveMessage"
        ).input_shape.members
        # botocore before 1.34.x only knows the deprecated AttributeNames.
        if "MessageSystemAttributeNames" not in input_members:
            self._system_attr_param = "AttributeNames"
        try:
            if not self.queue_url:
                self.queue_url = await self._resolve_url(self.queue_name, self._owner(self.arn))
            await self._read_attributes(
                [
                    "VisibilityTimeout",
                    "RedrivePolicy",
                    "FifoQueue",
                    "ContentBasedDeduplication",
                ]
            )
        except BaseException:
            await self.close()
            raise
        self.log.info(
            "sqs queue ready",
            queue=self.queue_name,
            queue_url=self.queue_url,
            fifo=self.fifo,
            visibility_timeout_s=self.visibility_timeout_s,
            redrive_policy=self.redrive_policy,
        )

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- QueueSource -------------------------------------------------------------------

    async def receive(self, max_messages: int, wait_s: float) -> list[Message]:
        if max_messages < 1:
            return []
        params: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": min(MAX_BATCH_ENTRIES, max_messages),
            "WaitTimeSeconds": max(0, int(min(MAX_WAIT_S, wait_s))),
            self._system_attr_param: ["All"],
            "MessageAttributeNames": ["All"],
        }
        response = await self._call("ReceiveMessage", self._require().receive_message, **params)
        return [self._message(raw) for raw in response.get("Messages", [])]

    async def delete(self, messages: list[Message]) -> None:
        # SQS rejects a batch naming the same receipt twice, and once is enough anyway.
        receipts = list(dict.fromkeys(m.receipt for m in messages))
        entries = [{"ReceiptHandle": r} for r in receipts]
        await self._settle("DeleteMessageBatch", self._require().delete_message_batch, entries)

    async def change_visibility(self, messages: list[Message], timeout_s: float) -> None:
        now = time.time()
        timeouts: dict[str, int] = {}
        for message in messages:
            # SQS caps a message's total hidden time at 12 h counted from its receive, and
            # rejects a change that would pass it; ask for what is left instead.
            received_at = float((message.extra or {}).get(RECEIVED_AT, now))
            left = MAX_VISIBILITY_S - int(now - received_at) - VISIBILITY_MARGIN_S
            timeouts[message.receipt] = max(0, min(int(timeout_s), left))
        entries = [{"ReceiptHandle": r, "VisibilityTimeout": t} for r, t in timeouts.items()]
        await self._settle(
            "ChangeMessageVisibilityBatch",
            self._require().change_message_visibility_batch,
            entries,
        )

    async def depth(self) -> Depth:
        attrs = await self._read_attributes(
            [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                # Called periodically, so a changed queue setting is picked up here.
                "VisibilityTimeout",
                "RedrivePolicy",
            ]
        )
        return Depth(
            visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        )

    # -- QueueSender -------------------------------------------------------------------

    async def send(
        self,
        bodies: list[str],
        *,
        delay_s: int = 0,
        group: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> int:
        if not bodies:
            return 0
        if self.fifo and not group:
            raise SourceError(
                f"SQS queue {self.queue_name} is FIFO: sending needs a message group",
                retryable=False,
            )
        if self.fifo and delay_s:
            raise SourceError(
                f"SQS queue {self.queue_name} is FIFO: per-message delay is not supported; "
                "set DelaySeconds on the queue instead",
                retryable=False,
            )
        message_attributes = {
            name: {"DataType": "String", "StringValue": value}
            for name, value in (attributes or {}).items()
        }
        entries: list[dict[str, Any]] = []
        for body in bodies:
            entry: dict[str, Any] = {"MessageBody": body}
            if delay_s:
                entry["DelaySeconds"] = int(delay_s)
            if message_attributes:
                entry["MessageAttributes"] = message_attributes
            if group:
                # Also valid on standard queues (fair queues); FIFO requires it.
                entry["MessageGroupId"] = group
            if self.fifo and not self.content_based_dedup:
                entry["MessageDeduplicationId"] = uuid.uuid4().hex
            entries.append(entry)
        return await self._send_entries(self._require_url(), entries, queue=self.queue_name)

    # -- internals ---------------------------------------------------------------------

    def _require(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"SqsQueue({self.queue_name}) used before start()")
        return self._client

    def _require_url(self) -> str:
        self._require()
        assert self.queue_url is not None  # set by start()
        return self.queue_url

    def _owner(self, arn: str) -> str | None:
        """QueueOwnerAWSAccountId for GetQueueUrl: only for another account's queue."""
        try:
            _region, owner, _name = parse_arn(arn)
        except SourceError:
            return None
        return owner if owner and owner != self.account else None

    async def _resolve_url(self, name: str, owner: str | None) -> str:
        params: dict[str, Any] = {"QueueName": name}
        if owner:
            params["QueueOwnerAWSAccountId"] = owner
        response = await self._call(
            "GetQueueUrl", self._require().get_queue_url, queue=name, **params
        )
        return str(response["QueueUrl"])

    async def _read_attributes(self, names: list[str]) -> dict[str, str]:
        response = await self._call(
            "GetQueueAttributes",
            self._require().get_queue_attributes,
            QueueUrl=self._require_url(),
            AttributeNames=names,
        )
        attrs: dict[str, str] = response.get("Attributes", {})
        if "VisibilityTimeout" in attrs:
            self.visibility_timeout_s = float(attrs["VisibilityTimeout"])
        if "FifoQueue" in names:
            self.fifo = attrs.get("FifoQueue", "false").lower() == "true"
        if "ContentBasedDeduplication" in names:
            self.content_based_dedup = (
                attrs.get("ContentBasedDeduplication", "false").lower() == "true"
            )
        if "RedrivePolicy" in names:
            policy = attrs.get("RedrivePolicy")
            try:
                self.redrive_policy = json.loads(policy) if policy else None
            except ValueError:
                self.redrive_policy = None
        return attrs

    def _message(self, raw: dict[str, Any]) -> Message:
        attrs: dict[str, str] = raw.get("Attributes", {})
        now_ms = int(time.time() * 1000)
        receive_count = int(attrs.get("ApproximateReceiveCount", "1"))
        extra = {k: attrs[k] for k in EXTRA_SYSTEM_ATTRIBUTES if k in attrs}
        optional: dict[str, Any] = {}
        if attrs.get("SenderId"):
            optional["sender_id"] = attrs["SenderId"]
        record = sqs_record(
            message_id=raw["MessageId"],
            receipt_handle=raw["ReceiptHandle"],
            body=raw.get("Body", ""),
            receive_count=receive_count,
            sent_ms=int(attrs.get("SentTimestamp", now_ms)),
            first_receive_ms=int(attrs.get("ApproximateFirstReceiveTimestamp", now_ms)),
            event_source=SQS_EVENT_SOURCE,
            event_source_arn=self.arn,
            region=self.region,
            message_attributes=lambda_attributes(raw.get("MessageAttributes") or {}),
            extra_attributes=extra,
            md5_of_body=raw.get("MD5OfBody"),
            **optional,
        )
        md5_attrs = raw.get("MD5OfMessageAttributes")
        if md5_attrs:
            # Lambda places it right after md5OfBody; keep that order for byte-level parity.
            record = {
                **{k: v for k, v in record.items() if k in BEFORE_MD5_ATTRS},
                "md5OfMessageAttributes": md5_attrs,
                **{k: v for k, v in record.items() if k not in BEFORE_MD5_ATTRS},
            }
        encoded = encode_record(record)
        return Message(
            id=raw["MessageId"],
            receipt=raw["ReceiptHandle"],
            body=record["body"],
            receive_count=receive_count,
            record=record,
            size=len(encoded),
            group=attrs.get("MessageGroupId"),
            extra={RECEIVED_AT: now_ms / 1000},
            encoded=encoded,
        )

    async def _call(
        self,
        operation: str,
        method: Callable[..., Awaitable[dict[str, Any]]],
        *,
        queue: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """One API call; every failure comes out as a SourceError a person can act on."""
        try:
            return await method(**params)
        except ClientError as exc:
            raise self._client_error(operation, exc, queue or self.queue_name) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise SourceError(
                f"SQS {operation} on queue {queue or self.queue_name}: no usable AWS "
                f"credentials ({exc}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "aws.profile, or an instance role",
                retryable=True,
            ) from None
        except ProfileNotFound as exc:
            raise SourceError(
                f"SQS queue {queue or self.queue_name}: AWS profile {self.profile!r} not "
                f"found ({exc}); fix aws.profile in the config or your ~/.aws files",
                retryable=False,
            ) from None
        except NETWORK_ERRORS as exc:
            where = self.endpoint_url or f"the SQS endpoint for {self.region}"
            raise SourceError(
                f"SQS {operation} on queue {queue or self.queue_name}: cannot reach {where}: {exc}",
                retryable=True,
            ) from None
        except BotoCoreError as exc:
            raise SourceError(
                f"SQS {operation} on queue {queue or self.queue_name} failed: {exc}",
                retryable=True,
            ) from None

    def _client_error(self, operation: str, exc: ClientError, queue: str) -> SourceError:
        code, text, status = error_code(exc), error_message(exc), http_status(exc)
        if code in NON_EXISTENT_CODES:
            # Retryable: the queue may yet be created (as Lambda keeps the ESM and retries).
            return SourceError(
                f"{NON_EXISTENT_QUEUE_MESSAGE} Queue: {queue} (region {self.region})",
                retryable=True,
            )
        if code in AUTH_CODES:
            # Retryable: credentials and IAM policies change outside the mapping's config.
            return SourceError(
                f"SQS {operation} on queue {queue}: access denied ({code}: {text}); check the "
                "AWS credentials/profile and that they allow sqs:ReceiveMessage, "
                "sqs:DeleteMessage, sqs:GetQueueAttributes (and kms:Decrypt for encrypted "
                "queues)",
                retryable=True,
            )
        retryable = code not in CONFIG_CODES and not (
            code == "InvalidParameterValue" and operation == "GetQueueUrl"
        )
        kind = "server error" if status >= 500 else "error"
        return SourceError(
            f"SQS {operation} on queue {queue}: {kind} {code or status}: {text}",
            retryable=retryable,
        )

    async def _settle(
        self,
        operation: str,
        method: Callable[..., Awaitable[dict[str, Any]]],
        entries: list[dict[str, Any]],
    ) -> None:
        """Delete/ChangeVisibility batches: stale receipts are fine (the message was already
        deleted or redelivered); other per-entry failures get one retry, then raise."""
        if not entries:
            return
        url = self._require_url()
        limit = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one_chunk(chunk: list[dict[str, Any]]) -> tuple[int, list[str]]:
            pending = [{"Id": str(i), **entry} for i, entry in enumerate(chunk)]
            failures: list[str] = []
            for attempt in range(2):
                async with limit:
                    response = await self._call(operation, method, QueueUrl=url, Entries=pending)
                by_id = {entry["Id"]: entry for entry in pending}
                retry: list[dict[str, Any]] = []
                for failed in response.get("Failed", []):
                    code, text = str(failed.get("Code", "")), str(failed.get("Message", ""))
                    if is_stale_receipt(code, text):
                        self.log.debug(
                            "sqs receipt no longer valid; ignored",
                            queue=self.queue_name,
                            operation=operation,
                            code=code,
                        )
                        continue
                    if "total visibilitytimeout" in text.lower():
                        # The 12 h cap is reached (our receive clock and SQS's disagree):
                        # nothing can hide it longer, and a retry would fail the same way.
                        self.log.warning(
                            "sqs message at its 12 h visibility limit; not extended",
                            queue=self.queue_name,
                            code=code,
                            error=text,
                        )
                        continue
                    entry = by_id.get(str(failed.get("Id", "")))
                    if attempt == 0 and entry is not None:
                        retry.append(entry)
                    else:
                        failures.append(f"{code}: {text}")
                if not retry:
                    break
                pending = retry
            return 0, failures

        results = await asyncio.gather(
            *(one_chunk(chunk) for chunk in chunks(entries, MAX_BATCH_ENTRIES)),
            return_exceptions=True,
        )
        _, problems, retryable = collect(results)
        if problems:
            raise SourceError(
                f"SQS {operation} on queue {self.queue_name}: {len(problems)} of "
                f"{len(entries)} entries failed: {summarise(problems)}",
                retryable=retryable,
            )

    async def _send_entries(self, url: str, entries: list[dict[str, Any]], *, queue: str) -> int:
        """SendMessageBatch in size-bounded chunks, a few at once. Server-side failures get
        one retry; returns how many were accepted, raises if any were not."""
        client = self._require()
        limit = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one_chunk(chunk: list[dict[str, Any]]) -> tuple[int, list[str]]:
            pending = [{"Id": str(i), **entry} for i, entry in enumerate(chunk)]
            accepted = 0
            failures: list[str] = []
            for attempt in range(2):
                async with limit:
                    response = await self._call(
                        "SendMessageBatch",
                        client.send_message_batch,
                        queue=queue,
                        QueueUrl=url,
                        Entries=pending,
                    )
                accepted += len(response.get("Successful", []))
                by_id = {entry["Id"]: entry for entry in pending}
                retry: list[dict[str, Any]] = []
                for failed in response.get("Failed", []):
                    entry = by_id.get(str(failed.get("Id", "")))
                    # A sender fault (bad attribute, too big, ...) would fail the same way again.
                    if attempt == 0 and entry is not None and not failed.get("SenderFault"):
                        retry.append(entry)
                    else:
                        failures.append(f"{failed.get('Code', '')}: {failed.get('Message', '')}")
                if not retry:
                    break
                pending = retry
            return accepted, failures

        results = await asyncio.gather(
            *(one_chunk(chunk) for chunk in size_chunks(entries)), return_exceptions=True
        )
        accepted, problems, retryable = collect(results)
        if problems:
            raise SourceError(
                f"SQS SendMessageBatch on queue {queue}: {accepted} of {len(entries)} messages "
                f"accepted; failures: {summarise(problems)}",
                retryable=retryable,
            )
        return accepted
