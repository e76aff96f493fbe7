"""Amazon SQS (or anything speaking its API: moto, LocalStack, ElasticMQ) over aiobotocore.

I/O only: the engine decides what to delete, hide or dead-letter. SQS moves poison messages to
the queue's own dead-letter queue (redrive policy) on receive, so ``native_redrive`` is True and
the engine never counts receives for this source.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from poller.events import encode_record, sqs_record
from poller.logs import log
from poller.sources.base import Depth, Message, SourceError

__all__ = ["NON_EXISTENT_QUEUE_MESSAGE", "SqsQueue"]

# Lambda's own wording (ESM_SEMANTICS.md §1.7), so people can search for it.
NON_EXISTENT_QUEUE_MESSAGE = (
    "Error occurred while ReceiveMessage. SQS Error Code: "
    "AWS.SimpleQueueService.NonExistentQueue. SQS Error Message: "
    "The specified queue does not exist."
)

# SQS API limits (ESM_SEMANTICS.md §3.2).
MAX_BATCH_ENTRIES = 10
MAX_WAIT_S = 20
MAX_VISIBILITY_S = 43_200
# Send batches are also capped by total payload. SQS raised the cap from 256 KiB to 1 MiB in
# 2025; staying at the old value keeps older endpoints (and LocalStack/ElasticMQ) happy, and a
# single larger message still goes out alone in its own batch.
MAX_SEND_BATCH_BYTES = 256 * 1024
# Batch calls (delete, change visibility, send) in flight at once per operation: enough to
# drain a large settle quickly without one call hogging the connection pool from receivers.
BATCH_CONCURRENCY = 8
# Message.extra key: wall-clock receive time, for the 12 h total-visibility cap.
_RECEIVED_AT = "sqs_received_at"
# Slack for clock skew between us and SQS when computing what is left of the 12 h.
_VISIBILITY_MARGIN_S = 5
# A message may carry at most 10 message attributes.
MAX_MESSAGE_ATTRIBUTES = 10
DEAD_LETTER_REASON_ATTRIBUTE = "DeadLetterReason"

# Both spellings: query protocol (and the x-amzn-query-error header botocore maps for the
# JSON protocol) use the long code, the JSON protocol's modeled shape name is the short one.
_NON_EXISTENT_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "KMS.AccessDeniedException",
    }
)
# Errors that will not go away until someone changes the configuration.
_CONFIG_CODES = frozenset(
    {
        "InvalidAddress",
        "InvalidSecurity",
        "AWS.SimpleQueueService.UnsupportedOperation",
        "UnsupportedOperation",
    }
)
# Per-entry batch failures meaning "this receipt no longer names an in-flight message": the
# message was deleted already, or became visible and was received again. Nothing to do.
_STALE_RECEIPT_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
        "InvalidReceiptHandle",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
    }
)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
    aiohttp.ClientError,
    OSError,  # includes TimeoutError
)
# System attributes Lambda forwards in a record besides the four sqs_record always sets.
_EXTRA_SYSTEM_ATTRIBUTES = (
    "SequenceNumber",
    "MessageGroupId",
    "MessageDeduplicationId",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "") or "")


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_stale_receipt(code: str, message: str) -> bool:
    if code in _STALE_RECEIPT_CODES:
        return True
    # Real SQS reports an expired handle as InvalidParameterValue naming the ReceiptHandle.
    return code == "InvalidParameterValue" and "receipthandle" in message.lower().replace(" ", "")


def _lambda_attributes(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """SQS MessageAttributes -> the camelCase shape Lambda puts in a record (§7.1)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        entry: dict[str, Any] = {}
        if "StringValue" in value:
            entry["stringValue"] = value["StringValue"]
        if "BinaryValue" in value:
            entry["binaryValue"] = _b64(value["BinaryValue"])
        entry["stringListValues"] = list(value.get("StringListValues") or [])
        entry["binaryListValues"] = [_b64(v) for v in value.get("BinaryListValues") or []]
        entry["dataType"] = value.get("DataType", "String")
        out[name] = entry
    return out


def _sqs_attributes(lambda_attrs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The reverse of _lambda_attributes, for re-sending a received message (dead_letter)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in lambda_attrs.items():
        entry: dict[str, Any] = {"DataType": value.get("dataType", "String")}
        if value.get("stringValue") is not None:
            entry["StringValue"] = value["stringValue"]
        elif value.get("binaryValue") is not None:
            entry["BinaryValue"] = base64.b64decode(value["binaryValue"])
        else:
            continue  # list values are reserved by SQS and never set; nothing to carry
        out[name] = entry
    return out


def _b64(value: bytes | str) -> str:
    # botocore decodes blobs to bytes; a str would be already-encoded wire text.
    if isinstance(value, str):
        return value
    return base64.b64encode(value).decode("ascii")


def _entry_size(entry: dict[str, Any]) -> int:
    size = len(entry["MessageBody"].encode())
    for name, value in entry.get("MessageAttributes", {}).items():
        size += len(name.encode()) + len(value["DataType"].encode())
        if "StringValue" in value:
            size += len(value["StringValue"].encode())
        if "BinaryValue" in value:
            size += len(value["BinaryValue"])
    return size


def _size_chunks(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Send batches: at most 10 entries and MAX_SEND_BATCH_BYTES each (an oversize single
    message goes alone and lets the service judge it)."""
    chunk: list[dict[str, Any]] = []
    chunk_bytes = 0
    for entry in entries:
        size = _entry_size(entry)
        if chunk and (len(chunk) == MAX_BATCH_ENTRIES or chunk_bytes + size > MAX_SEND_BATCH_BYTES):
            yield chunk
            chunk, chunk_bytes = [], 0
        chunk.append(entry)
        chunk_bytes += size
    if chunk:
        yield chunk


def _parse_arn(arn: str) -> tuple[str, str, str]:
    """(region, account, name) from arn:aws:sqs:region:account:name."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs":
        raise SourceError(f"not an SQS queue ARN: {arn!r}", retryable=False)
    return parts[3], parts[4], parts[5]


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
    ) -> None:
        self.queue_name = queue_name
        self.region = region
        self.account = account
        self.queue_url = queue_url
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.arn = arn
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
        log.info(
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
            received_at = float((message.extra or {}).get(_RECEIVED_AT, now))
            left = MAX_VISIBILITY_S - int(now - received_at) - _VISIBILITY_MARGIN_S
            timeouts[message.receipt] = max(0, min(int(timeout_s), left))
        entries = [{"ReceiptHandle": r, "VisibilityTimeout": t} for r, t in timeouts.items()]
        await self._settle(
            "ChangeMessageVisibilityBatch",
            self._require().change_message_visibility_batch,
            entries,
        )

    async def dead_letter(self, messages: list[Message], reason: str) -> None:
        """Copy to the redrive policy's dead-letter queue, then delete from this one.

        The engine never calls this (SQS redrives natively); it exists so an explicit call is
        still correct. Sending first means a crash in between duplicates, never loses. A FIFO
        DLQ deduplicates the retry by message id.
        """
        if not messages:
            return
        target = (self.redrive_policy or {}).get("deadLetterTargetArn")
        if not target:
            raise SourceError(
                f"SQS queue {self.queue_name} has no redrive policy (deadLetterTargetArn); "
                "set one on the queue to dead-letter messages",
                retryable=False,
            )
        dlq_url = await self._dead_letter_url(str(target))
        dlq_fifo = str(target).endswith(".fifo")
        entries: list[dict[str, Any]] = []
        for message in messages:
            attrs = _sqs_attributes(message.record.get("messageAttributes") or {})
            if reason and len(attrs) < MAX_MESSAGE_ATTRIBUTES:
                attrs.setdefault(
                    DEAD_LETTER_REASON_ATTRIBUTE,
                    {"DataType": "String", "StringValue": reason[:1024]},
                )
            entry: dict[str, Any] = {"MessageBody": message.body}
            if attrs:
                entry["MessageAttributes"] = attrs
            if dlq_fifo:
                entry["MessageGroupId"] = message.group or "dead-letter"
                entry["MessageDeduplicationId"] = message.id[:128]
            entries.append(entry)
        await self._send_entries(dlq_url, entries, queue=str(target))
        log.warning(
            "sqs messages dead-lettered",
            queue=self.queue_name,
            target=target,
            count=len(messages),
            reason=reason,
        )
        await self.delete(messages)

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
            _region, owner, _name = _parse_arn(arn)
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

    async def _dead_letter_url(self, target_arn: str) -> str:
        if self._dlq_url is None or self._dlq_url_for != target_arn:
            _region, _account, name = _parse_arn(target_arn)
            self._dlq_url = await self._resolve_url(name, self._owner(target_arn))
            self._dlq_url_for = target_arn
        return self._dlq_url

    def _message(self, raw: dict[str, Any]) -> Message:
        attrs: dict[str, str] = raw.get("Attributes", {})
        now_ms = int(time.time() * 1000)
        receive_count = int(attrs.get("ApproximateReceiveCount", "1"))
        extra = {k: attrs[k] for k in _EXTRA_SYSTEM_ATTRIBUTES if k in attrs}
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
            event_source="aws:sqs",
            event_source_arn=self.arn,
            region=self.region,
            message_attributes=_lambda_attributes(raw.get("MessageAttributes") or {}),
            extra_attributes=extra,
            md5_of_body=raw.get("MD5OfBody"),
            **optional,
        )
        md5_attrs = raw.get("MD5OfMessageAttributes")
        if md5_attrs:
            # Lambda places it right after md5OfBody; keep that order for byte-level parity.
            record = {
                **{k: v for k, v in record.items() if k in _BEFORE_MD5_ATTRS},
                "md5OfMessageAttributes": md5_attrs,
                **{k: v for k, v in record.items() if k not in _BEFORE_MD5_ATTRS},
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
            extra={_RECEIVED_AT: now_ms / 1000},
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
        except _NETWORK_ERRORS as exc:
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
        code, text, status = _error_code(exc), _error_message(exc), _http_status(exc)
        if code in _NON_EXISTENT_CODES:
            # Retryable: the queue may yet be created (as Lambda keeps the ESM and retries).
            return SourceError(
                f"{NON_EXISTENT_QUEUE_MESSAGE} Queue: {queue} (region {self.region})",
                retryable=True,
            )
        if code in _AUTH_CODES:
            # Retryable: credentials and IAM policies change outside the mapping's config.
            return SourceError(
                f"SQS {operation} on queue {queue}: access denied ({code}: {text}); check the "
                "AWS credentials/profile and that they allow sqs:ReceiveMessage, "
                "sqs:DeleteMessage, sqs:GetQueueAttributes (and kms:Decrypt for encrypted "
                "queues)",
                retryable=True,
            )
        retryable = code not in _CONFIG_CODES and not (
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
                    if _is_stale_receipt(code, text):
                        log.info(
                            "sqs receipt no longer valid; ignored",
                            queue=self.queue_name,
                            operation=operation,
                            code=code,
                        )
                        continue
                    if "total visibilitytimeout" in text.lower():
                        # The 12 h cap is reached (our receive clock and SQS's disagree):
                        # nothing can hide it longer, and a retry would fail the same way.
                        log.warning(
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
            *(one_chunk(chunk) for chunk in _chunks(entries, MAX_BATCH_ENTRIES)),
            return_exceptions=True,
        )
        _, problems, retryable = _collect(results)
        if problems:
            raise SourceError(
                f"SQS {operation} on queue {self.queue_name}: {len(problems)} of "
                f"{len(entries)} entries failed: {_summarise(problems)}",
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
            *(one_chunk(chunk) for chunk in _size_chunks(entries)), return_exceptions=True
        )
        accepted, problems, retryable = _collect(results)
        if problems:
            raise SourceError(
                f"SQS SendMessageBatch on queue {queue}: {accepted} of {len(entries)} messages "
                f"accepted; failures: {_summarise(problems)}",
                retryable=retryable,
            )
        return accepted


# The record keys that come before md5OfMessageAttributes in a Lambda SQS record.
_BEFORE_MD5_ATTRS = frozenset(
    {"messageId", "receiptHandle", "body", "attributes", "messageAttributes", "md5OfBody"}
)


def _collect(
    results: list[tuple[int, list[str]] | BaseException],
) -> tuple[int, list[str], bool]:
    """Sum gathered chunk results: (accepted, failure descriptions, all retryable)."""
    accepted = 0
    problems: list[str] = []
    retryable = True
    for result in results:
        if isinstance(result, BaseException):
            if not isinstance(result, SourceError):
                raise result  # a bug or a cancellation, not a service failure
            problems.append(str(result))
            retryable = retryable and result.retryable
        else:
            accepted += result[0]
            problems.extend(result[1])
    return accepted, problems, retryable


def _summarise(problems: list[str], limit: int = 5) -> str:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem] = counts.get(problem, 0) + 1
    parts = [f"{p} (x{n})" if n > 1 else p for p, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
