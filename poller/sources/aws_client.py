"""One aiobotocore client for an AWS service that an ordered source reads (Kinesis, DynamoDB
Streams, DynamoDB), with every failure turned into a SourceError a person can act on.

Responses keep blobs as their base64 text and timestamps as the epoch numbers the service
sent: records go into Lambda's events in exactly that form (Kinesis ``data``, DynamoDB ``B``
attribute values, arrival times in epoch seconds), so decoding them only to encode them again
would be wasted work on the hot path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import xform_name
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

from poller.sources.base import SourceError

# The service's answer to going faster than its limits allow (per shard, per account).
THROTTLE_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
AUTH_CODES: Final = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "KMSAccessDeniedException",
    }
)
NETWORK_ERRORS: Final = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    OSError,
)


class AwsCallError(SourceError):
    """A call the service answered with an error; ``code`` is AWS's error code, for the callers
    that handle some of them (an expired shard iterator, trimmed data)."""

    def __init__(self, message: str, code: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.code = code


def _keep(value: Any) -> Any:
    return value


class AwsService:
    """A client for one service, as a source needs it: started, called, closed."""

    def __init__(
        self,
        service: str,
        *,
        region: str,
        endpoint_url: str | None,
        profile: str | None,
        what: str,
        permissions: str,
    ) -> None:
        self.service = service
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        # How messages name the resource ("Kinesis stream orders") and the IAM actions the
        # access-denied message lists.
        self.what = what
        self.permissions = permissions
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._methods: dict[str, Any] = {}

    async def start(self) -> None:
        await self.close()
        session = get_session()
        if self.profile:
            session.set_config_variable("profile", self.profile)
        session.get_component("response_parser_factory").set_parser_defaults(
            blob_parser=_keep, timestamp_parser=_keep
        )
        config = AioConfig(
            # One quick retry smooths a blip; anything longer is the engine's to back off from.
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
            # Every shard of a mapping reads through this one client at once.
            max_pool_connections=64,
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    self.service,
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=config,
                )
            )
        except ProfileNotFound as exc:
            await stack.aclose()
            raise SourceError(
                f"{self.what}: AWS profile {self.profile!r} not found ({exc}); fix aws.profile "
                "in the config or your ~/.aws files",
                retryable=False,
            ) from None
        except ValueError as exc:
            await stack.aclose()
            raise SourceError(
                f"{self.what}: bad aws.endpoint_url {self.endpoint_url!r}: {exc}",
                retryable=False,
            ) from None
        self._stack = stack
        self._methods = {}

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One API call (``operation`` as AWS names it: "GetRecords"); raises SourceError."""
        method = self._methods.get(operation)
        if method is None:
            if self._client is None:
                raise RuntimeError(f"{self.what}: {operation} called before start()")
            method = self._methods[operation] = getattr(self._client, xform_name(operation))
        try:
            response: dict[str, Any] = await method(**params)
            return response
        except ClientError as exc:
            raise self._client_error(operation, exc) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise SourceError(
                f"{self.what}: {operation}: no usable AWS credentials ({exc}); set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws.profile, or an instance role",
            ) from None
        except NETWORK_ERRORS as exc:
            where = self.endpoint_url or f"the {self.service} endpoint of {self.region}"
            raise SourceError(f"{self.what}: {operation}: cannot reach {where}: {exc}") from None
        except BotoCoreError as exc:
            raise SourceError(f"{self.what}: {operation} failed: {exc}") from None

    def _client_error(self, operation: str, exc: ClientError) -> AwsCallError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        text = str(error.get("Message", "")) or str(exc)
        if code in THROTTLE_CODES:
            return AwsCallError(
                f"{self.what}: {operation} throttled by the service ({code}: {text})",
                code,
                throttled=True,
            )
        if code in AUTH_CODES:
            # Retryable: credentials and policies change outside the mapping's config.
            return AwsCallError(
                f"{self.what}: {operation}: access denied ({code}: {text}); check the AWS "
                f"credentials or aws.profile and that they allow {self.permissions}",
                code,
            )
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        kind = "server error" if status >= 500 else "error"
        return AwsCallError(f"{self.what}: {operation}: {kind} {code or status}: {text}", code)
