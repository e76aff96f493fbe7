"""The ``Mapping`` model: one event source mapping, validated on create and update, with the
cross-field rules and duplicate detection AWS applies (ESM_SEMANTICS.md §1)."""

from __future__ import annotations

import copy
import dataclasses
import re
import time
import uuid as uuid_module
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from poller.mappings.checks import FUNCTION_REF, iso, to_epoch
from poller.mappings.errors import (
    MSG_UNRECOGNIZED_SOURCE,
    MappingError,
    type_error,
    validation_error,
)
from poller.mappings.parameters import (
    KAFKA_DEFAULT_BATCHING_WINDOW_S,
    PARAMETERS,
    PARAMETERS_BY_NAME,
    Context,
    FilterValidator,
    Parameter,
    normalize,
    unsupported,
)
from poller.mappings.rules import RULES
from poller.redaction import redact
from poller.sources.base import AwsDefaults, Family, SourceKind, SourceSpec, SourceUriError
from poller.sources.kafka import KafkaSpec
from poller.sources.kinds import UnknownSourceError, parse_source

DEFAULT_REGION: Final = "us-east-1"
DEFAULT_ACCOUNT: Final = "000000000000"

STATE_ENABLED: Final = "Enabled"
STATE_DISABLED: Final = "Disabled"
STATES: Final = (STATE_ENABLED, STATE_DISABLED)

# AWS reports user changes differently per source family [VALIDATED].
REASON_USER_QUEUE: Final = "USER_INITIATED"
REASON_USER_STREAM: Final = "User action"
NO_RECORDS_PROCESSED: Final = "No records processed"


def parse_event_source(uri: Any, defaults: AwsDefaults | None = None) -> SourceSpec:
    """The spec of an event source URI or ARN; a MappingError (EventSourceArn) if it is not one
    this version knows."""
    try:
        return parse_source(uri, defaults)
    except UnknownSourceError as exc:
        raise MappingError(
            MSG_UNRECOGNIZED_SOURCE, detail=str(exc), parameter="EventSourceArn"
        ) from None
    except SourceUriError as exc:
        raise MappingError(str(exc), parameter="EventSourceArn") from None


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, repr=False)
class Mapping:
    """One event source mapping. Immutable: ``update_mapping`` returns a new one.

    Parameters that do not apply to the source's family are None. Build with
    ``create_mapping`` (validates) or ``from_dict`` (trusts stored data).
    """

    uuid: str
    function_name: str
    event_source_arn: str
    batch_size: int = 10
    maximum_batching_window_in_seconds: int | None = None
    function_response_types: list[str] = field(default_factory=list)
    filter_criteria: dict[str, Any] | None = None
    scaling_config: dict[str, int] | None = None
    destination_config: dict[str, Any] | None = None
    starting_position: str | None = None
    starting_position_timestamp: float | None = None
    parallelization_factor: int | None = None
    bisect_batch_on_function_error: bool | None = None
    maximum_retry_attempts: int | None = None
    maximum_record_age_in_seconds: int | None = None
    tumbling_window_in_seconds: int | None = None
    topics: list[str] | None = None
    consumer_group_id: str | None = None
    state: str = STATE_ENABLED
    state_transition_reason: str = REASON_USER_QUEUE
    last_modified: float = 0.0
    last_processing_result: str = NO_RECORDS_PROCESSED
    name: str | None = None

    def __repr__(self) -> str:
        # A repr ends up in logs, and the raw source URI may hold a Redis password.
        shown = ", ".join(
            f"{f.name}={redact(self.event_source_arn)!r}"
            if f.name == "event_source_arn"
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"Mapping({shown})"

    @cached_property
    def source(self) -> SourceSpec:
        # Frozen, so the parse can be cached (cached_property writes __dict__ directly).
        return parse_event_source(self.event_source_arn)

    @property
    def kind(self) -> SourceKind:
        return self.source.kind

    @property
    def enabled(self) -> bool:
        return self.state == STATE_ENABLED

    @property
    def maximum_concurrency(self) -> int | None:
        return self.scaling_config["MaximumConcurrency"] if self.scaling_config else None

    @property
    def report_batch_item_failures(self) -> bool:
        return "ReportBatchItemFailures" in self.function_response_types

    @property
    def batching_window_s(self) -> float:
        """The effective batching window in seconds (Kafka's unset default is 0.5)."""
        if self.maximum_batching_window_in_seconds is None:
            return KAFKA_DEFAULT_BATCHING_WINDOW_S if self.kind.family is Family.KAFKA else 0.0
        return float(self.maximum_batching_window_in_seconds)

    @property
    def on_failure_destination(self) -> str | None:
        if not self.destination_config:
            return None
        return self.destination_config.get("OnFailure", {}).get("Destination") or None

    def function_arn(self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT) -> str:
        """The function's ARN. A bare name lives in the daemon's region/account (as in
        ``FunctionConfig.arn``), not the source's: AWS allows cross-account queues."""
        m = FUNCTION_REF.match(self.function_name)
        if m is None or m["partition"]:  # a full ARN (or unvalidated stored data)
            return self.function_name
        account = m["partial_account"] or account
        qualifier = f":{m['qualifier']}" if m["qualifier"] else ""
        return f"arn:aws:lambda:{region}:{account}:function:{m['name']}{qualifier}"

    def arn(self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT) -> str:
        """``EventSourceMappingArn``: the mapping lives where the daemon's functions live."""
        return f"arn:aws:lambda:{region}:{account}:event-source-mapping:{self.uuid}"

    def to_aws(
        self, *, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT
    ) -> dict[str, Any]:
        """The AWS response shape (``EventSourceMappingConfiguration``).

        Only fields that apply to the source's family appear, as with AWS (no stream fields
        for SQS). ``EventSourceArn`` is the source's ``display_uri``: the queue ARN for SQS
        whatever form was given, never a password.
        """
        family = self.kind.family
        out: dict[str, Any] = {"UUID": self.uuid}
        for p in PARAMETERS:
            if not p.in_aws or family not in p.families:
                continue
            value = getattr(self, p.snake_name)
            if p.snake_name == "event_source_arn":
                value = self.source.display_uri
            elif p.snake_name == "destination_config" and value is None:
                value = {"OnFailure": {}}  # what AWS shows for a stream without a destination
            elif p.snake_name == "starting_position_timestamp" and value is not None:
                value = iso(value)
            if value is None:
                continue
            value = copy.deepcopy(value)
            if p.aws_container:
                out.setdefault(p.aws_container, {})[p.aws_name] = value
            else:
                out[p.aws_name] = value
        if isinstance(self.source, KafkaSpec):
            out["SelfManagedEventSource"] = {
                "Endpoints": {"KAFKA_BOOTSTRAP_SERVERS": list(self.source.bootstrap_servers)}
            }
        out["FunctionArn"] = self.function_arn(region=region, account=account)
        out["LastModified"] = iso(self.last_modified)
        out["LastProcessingResult"] = self.last_processing_result
        out["State"] = self.state
        out["StateTransitionReason"] = self.state_transition_reason
        out["EventSourceMappingArn"] = self.arn(region=region, account=account)
        return out

    def to_params(self) -> dict[str, Any]:
        """The snake_case parameters that would recreate this mapping (enabled included)."""
        params = {
            p.snake_name: copy.deepcopy(getattr(self, p.snake_name))
            for p in PARAMETERS
            if p.snake_name != "enabled"
        }
        params["enabled"] = self.enabled
        return params

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serializable, for the registry; ``from_dict`` reverses it.

        Holds the raw source URI, credentials included (the runner needs them):
        show ``to_aws()`` to people, never this.
        """
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mapping:
        """Rebuild a stored mapping. Not re-validated: rules may tighten after it was stored,
        and a registry must still load. Unknown keys mean corruption or a newer writer."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MappingError(
                f"Stored mapping has unknown field(s) {sorted(unknown)!r}; "
                f"known: {', '.join(sorted(names))}."
            )
        missing = [n for n in ("uuid", "function_name", "event_source_arn") if n not in data]
        if missing:
            raise MappingError(f"Stored mapping lacks required field(s) {missing!r}.")
        state = data.get("state", STATE_ENABLED)
        if state not in STATES:
            raise MappingError(
                f"Stored mapping has invalid state {state!r} (valid: {', '.join(STATES)})."
            )
        values = copy.deepcopy(data)
        if values.get("last_modified") is not None:
            values["last_modified"] = float(values["last_modified"])
        return cls(**values)

    def with_last_processing_result(self, result: str) -> Mapping:
        """A copy showing the runner's latest result (the registry merges it in)."""
        return dataclasses.replace(self, last_processing_result=result)


# --------------------------------------------------------------------------- create / update


def _user_reason(source: SourceSpec) -> str:
    return REASON_USER_QUEUE if source.kind.family is Family.QUEUE else REASON_USER_STREAM


def _check_keys(params: dict[str, Any]) -> None:
    if not isinstance(params, dict):
        raise MappingError(
            f"Mapping parameters must be a mapping of names to values; got {params!r}."
        )
    for key in params:
        if key not in PARAMETERS_BY_NAME:
            raise MappingError(
                f"Unknown mapping parameter {key!r}; valid parameters: "
                f"{', '.join(PARAMETERS_BY_NAME)}.",
                parameter=key,
            )


def _resolve(
    params: dict[str, Any],
    *,
    uuid: str,
    now: float,
    validate_filters: FilterValidator | None,
) -> tuple[dict[str, Any], SourceSpec]:
    """Validate snake_case params and return every parameter's value with defaults applied."""
    _check_keys(params)
    source_uri = params.get("event_source_arn")
    if source_uri is None:
        raise validation_error("eventSourceArn", None, "Member must not be null.", "EventSourceArn")
    if not isinstance(source_uri, str):
        raise type_error("EventSourceArn", "a string", source_uri)
    source = parse_event_source(source_uri)
    family = source.kind.family
    ctx = Context(source=source, now=now, uuid=uuid, validate_filters=validate_filters)
    values: dict[str, Any] = {"event_source_arn": source_uri}
    for p in PARAMETERS:
        if p.snake_name == "event_source_arn":
            continue
        raw = params.get(p.snake_name)
        value = None
        if raw is not None:
            if not p.applies_to(source.kind):
                raise unsupported(p, raw, source)
            value = normalize(p, raw, ctx)
        if value is None:
            value = p.default_for(family)
        if value is None and family in p.required:
            raise validation_error(p.member, None, "Member must not be null.", p.aws_name)
        values[p.snake_name] = value
    for families, rule in RULES:
        if family in families:
            rule(values, ctx)
    return values, source


def _build(
    values: dict[str, Any],
    *,
    uuid: str,
    now: float,
    state: str,
    reason: str,
    last_processing_result: str,
) -> Mapping:
    fields = {k: v for k, v in values.items() if k != "enabled"}
    return Mapping(
        uuid=uuid,
        state=state,
        state_transition_reason=reason,
        last_modified=now,
        last_processing_result=last_processing_result,
        **fields,
    )


_UUID = re.compile(r"^[0-9a-fA-F-]{36}$")


def create_mapping(
    params: dict[str, Any],
    *,
    uuid: str | None = None,
    now: float | None = None,
    validate_filters: FilterValidator | None = None,
) -> Mapping:
    """Validate snake_case ``params`` (the config-file form) and build a new mapping.

    A key set to None counts as not given. ``validate_filters`` is called with the
    FilterCriteria dict for deep pattern checks; a ``ValueError`` it raises becomes
    ``Invalid filter pattern definition.``.
    """
    if uuid is None:
        uuid = str(uuid_module.uuid4())
    elif not _UUID.match(uuid):
        raise MappingError(f"UUID must be 36 characters of hex digits and '-'; got {uuid!r}.")
    now = time.time() if now is None else now
    values, source = _resolve(params, uuid=uuid, now=now, validate_filters=validate_filters)
    return _build(
        values,
        uuid=uuid,
        now=now,
        state=STATE_ENABLED if values["enabled"] else STATE_DISABLED,
        reason=_user_reason(source),
        last_processing_result=NO_RECORDS_PROCESSED,
    )


def update_mapping(
    m: Mapping,
    changes: dict[str, Any],
    *,
    now: float | None = None,
    validate_filters: FilterValidator | None = None,
) -> Mapping:
    """Apply ``changes`` (snake_case) to ``m`` and validate the merged result.

    A key set to None resets that parameter to its default for the source; ``{}`` removes a
    ScalingConfig/FilterCriteria/DestinationConfig. Create-only parameters may be repeated with
    their current value (so a whole config block can be re-applied) but not changed.
    ``enabled`` moves the state to Enabled/Disabled; otherwise the state is kept.
    """
    _check_keys(changes)
    current = m.to_params()
    for key, value in changes.items():
        p = PARAMETERS_BY_NAME[key]
        if (
            p.create_only
            and value != current[key]
            and not (
                key == "starting_position_timestamp" and _same_timestamp(p, value, current[key])
            )
        ):
            raise MappingError(
                f"{p.aws_name} can only be set when the mapping is created (current: "
                f"{redact(str(current[key])) if current[key] is not None else 'unset'}, "
                f"requested: {redact(str(value))}); delete and recreate the mapping to change "
                "it.",
                parameter=p.aws_name,
            )
    merged = {**current, **changes}
    now = time.time() if now is None else now
    values, source = _resolve(merged, uuid=m.uuid, now=now, validate_filters=validate_filters)
    state, reason = m.state, m.state_transition_reason
    if changes.get("enabled") is not None:
        state = STATE_ENABLED if values["enabled"] else STATE_DISABLED
        reason = _user_reason(source)
    return _build(
        values,
        uuid=m.uuid,
        now=now,
        state=state,
        reason=reason,
        last_processing_result=m.last_processing_result,
    )


def _same_timestamp(p: Parameter, value: Any, current: float | None) -> bool:
    if value is None or current is None:
        return value is current
    try:
        return to_epoch(p, value) == current
    except MappingError:
        return False
