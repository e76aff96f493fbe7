"""SQS's wire details: error codes, attribute shapes, batch limits and chunking."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import aiohttp
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from poller.sources.base import SourceError

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
RECEIVED_AT = "sqs_received_at"
# Slack for clock skew between us and SQS when computing what is left of the 12 h.
VISIBILITY_MARGIN_S = 5

# Both spellings: query protocol (and the x-amzn-query-error header botocore maps for the
# JSON protocol) use the long code, the JSON protocol's modeled shape name is the short one.
NON_EXISTENT_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
AUTH_CODES = frozenset(
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
CONFIG_CODES = frozenset(
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
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
    aiohttp.ClientError,
    OSError,  # includes TimeoutError
)
# System attributes Lambda forwards in a record besides the four sqs_record always sets.
EXTRA_SYSTEM_ATTRIBUTES = (
    "SequenceNumber",
    "MessageGroupId",
    "MessageDeduplicationId",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "") or "")


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_stale_receipt(code: str, message: str) -> bool:
    if code in _STALE_RECEIPT_CODES:
        return True
    # Real SQS reports an expired handle as InvalidParameterValue naming the ReceiptHandle.
    return code == "InvalidParameterValue" and "receipthandle" in message.lower().replace(" ", "")


def lambda_attributes(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
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


def size_chunks(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
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


def parse_arn(arn: str) -> tuple[str, str, str]:
    """(region, account, name) from arn:aws:sqs:region:account:name."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs":
        raise SourceError(f"not an SQS queue ARN: {arn!r}", retryable=False)
    return parts[3], parts[4], parts[5]


# The record keys that come before md5OfMessageAttributes in a Lambda SQS record.
BEFORE_MD5_ATTRS = frozenset(
    {"messageId", "receiptHandle", "body", "attributes", "messageAttributes", "md5OfBody"}
)


def collect(
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


def summarise(problems: list[str], limit: int = 5) -> str:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem] = counts.get(problem, 0) + 1
    parts = [f"{p} (x{n})" if n > 1 else p for p, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
