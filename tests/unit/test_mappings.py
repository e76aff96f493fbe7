"""Unit tests for poller.mappings: source URIs, parameter defaults, validation, the AWS shape.

Exact AWS messages are written out literally here (not imported from the module)
so a change to one of them fails a test.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from poller.mappings import (
    PARAMETERS,
    PARAMETERS_BY_AWS_NAME,
    PARAMETERS_BY_NAME,
    Mapping,
    MappingError,
    create_mapping,
    duplicate_error,
    parse_event_source,
    update_mapping,
)
from poller.sources.base import SourceSpec

NOW = 1_700_000_000.0
UUID_A = "11111111-1111-1111-1111-111111111111"
UUID_B = "22222222-2222-2222-2222-222222222222"

SQS_ARN = "arn:aws:sqs:eu-west-1:123456789012:orders"
SQS_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
FIFO_ARN = "arn:aws:sqs:eu-west-1:123456789012:orders.fifo"
KINESIS_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/clicks"
DDB_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-01-01T00:00:00.000"
KAFKA_URI = "kafka://broker1:9092,broker2:9093/payments"
REDIS_URI = "redis-queue://alice:s3cret@redis.local:6380/2/jobs"

# One representative source per kind, with what a stream kind must be given.
SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "local": ("local://jobs", {}),
    "sqs": (SQS_ARN, {}),
    "redis-queue": ("redis-queue://localhost/jobs", {}),
    "kinesis": (KINESIS_ARN, {"starting_position": "LATEST"}),
    "dynamodb": (DDB_ARN, {"starting_position": "TRIM_HORIZON"}),
    "kafka": (KAFKA_URI, {"starting_position": "LATEST"}),
}
QUEUES = ("local", "sqs", "redis-queue")
ORDERED = ("kinesis", "dynamodb", "kafka")


def make(kind: str = "sqs", uuid: str = UUID_A, **params: Any) -> Mapping:
    uri, required = SOURCES[kind]
    base: dict[str, Any] = {"function_name": "fn", "event_source_arn": uri, **required}
    base.update(params)
    return create_mapping(base, uuid=uuid, now=NOW)


def error_of(kind: str = "sqs", **params: Any) -> MappingError:
    with pytest.raises(MappingError) as info:
        make(kind, **params)
    return info.value


def parse_error(uri: str) -> MappingError:
    with pytest.raises(MappingError) as info:
        parse_event_source(uri)
    return info.value


def test_mapping_repr_hides_password() -> None:
    m = create_mapping({"function_name": "fn", "event_source_arn": REDIS_URI}, now=NOW)
    assert "s3cret" not in repr(m)
    assert "redis.local:6380/2/jobs" in repr(m)
    assert "s3cret" in json.dumps(m.to_dict())  # storage keeps it: the runner needs it


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("kind", list(SOURCES))
def test_defaults_per_kind(kind: str) -> None:
    m = make(kind)
    queue = kind in QUEUES
    assert m.batch_size == (10 if queue else 100)
    assert m.maximum_batching_window_in_seconds == (None if kind == "kafka" else 0)
    assert m.function_response_types == []
    assert m.filter_criteria is None and m.scaling_config is None and m.destination_config is None
    assert m.state == "Enabled" and m.enabled
    assert m.state_transition_reason == ("USER_INITIATED" if queue else "User action")
    assert m.last_processing_result == "No records processed"
    assert m.last_modified == NOW
    assert m.uuid == UUID_A
    assert m.name is None
    if queue:
        for attr in (
            "starting_position",
            "parallelization_factor",
            "bisect_batch_on_function_error",
            "maximum_retry_attempts",
            "maximum_record_age_in_seconds",
            "tumbling_window_in_seconds",
            "topics",
            "consumer_group_id",
        ):
            assert getattr(m, attr) is None, attr
    else:
        assert m.bisect_batch_on_function_error is False
        assert m.maximum_retry_attempts == -1
        assert m.maximum_record_age_in_seconds == -1
    if kind in ("kinesis", "dynamodb"):
        assert m.parallelization_factor == 1
        assert m.tumbling_window_in_seconds == 0
        assert m.topics is None and m.consumer_group_id is None
    if kind == "kafka":
        # ParallelizationFactor is poller's extension for Kafka (lanes per partition by key).
        assert m.parallelization_factor == 1 and m.tumbling_window_in_seconds is None


def test_kafka_defaults() -> None:
    m = make("kafka")
    assert m.batching_window_s == 0.5
    assert m.topics == ["payments"]
    assert m.consumer_group_id == UUID_A  # a unique value, as AWS does
    assert make("kafka", maximum_batching_window_in_seconds=2).batching_window_s == 2.0
    assert make("sqs").batching_window_s == 0.0


def test_disabled_on_create() -> None:
    m = make("sqs", enabled=False)
    assert m.state == "Disabled"
    assert not m.enabled


def test_generated_uuid_and_clock() -> None:
    m = create_mapping({"function_name": "fn", "event_source_arn": "local://q"})
    assert len(m.uuid) == 36
    assert m.last_modified > NOW


def test_none_means_not_given() -> None:
    m = make("sqs", batch_size=None, scaling_config=None, parallelization_factor=None)
    assert m.batch_size == 10
    assert m.parallelization_factor is None


def test_helpers() -> None:
    m = make(
        "sqs",
        scaling_config={"MaximumConcurrency": 7},
        function_response_types=["ReportBatchItemFailures"],
    )
    assert m.maximum_concurrency == 7
    assert m.report_batch_item_failures is True
    assert make("sqs").maximum_concurrency is None
    assert make("sqs").report_batch_item_failures is False
    assert m.source.kind.name == "sqs" and m.kind.name == "sqs"
    assert m.source is m.source  # parsed once


def test_enabled_by_state() -> None:
    assert make("sqs").enabled
    assert not make("sqs", enabled=False).enabled
    stored = make("sqs").to_dict()
    stored["state"] = "Running"
    with pytest.raises(MappingError):
        Mapping.from_dict(stored)


# --------------------------------------------------------------------------- validation


def test_missing_function_name() -> None:
    with pytest.raises(MappingError) as info:
        create_mapping({"event_source_arn": SQS_ARN})
    assert info.value.message == (
        "1 validation error detected: Value null at 'functionName' failed to satisfy "
        "constraint: Member must not be null."
    )


def test_missing_event_source() -> None:
    with pytest.raises(MappingError) as info:
        create_mapping({"function_name": "fn"})
    assert "'eventSourceArn'" in info.value.message


def test_unrecognized_source_on_create() -> None:
    with pytest.raises(MappingError) as info:
        create_mapping({"function_name": "fn", "event_source_arn": "arn:aws:sns:us-east-1:1:t"})
    assert info.value.message == "Unrecognized event source."


@pytest.mark.parametrize(
    "name",
    [
        "fn",
        "fn:prod",
        "fn:$LATEST",
        "123456789012:function:fn",
        "arn:aws:lambda:us-east-1:123456789012:function:fn:3",
    ],
)
def test_function_name_forms(name: str) -> None:
    assert make("sqs", function_name=name).function_name == name


@pytest.mark.parametrize("name", ["has space", "x" * 65, "fn:", "arn:aws:s3:::bucket"])
def test_function_name_invalid(name: str) -> None:
    err = error_of("sqs", function_name=name)
    assert err.parameter == "FunctionName"


def test_unknown_parameter_names_key_and_valid_ones() -> None:
    err = error_of("sqs", batchsize=5)
    assert "'batchsize'" in err.message
    assert "batch_size" in err.message and "maximum_batching_window_in_seconds" in err.message


def test_destination_config_on_sqs() -> None:
    for kind in QUEUES:
        err = error_of(kind, destination_config={"OnFailure": {"Destination": SQS_ARN}})
        assert err.message == (
            "Unsupported DestinationConfig parameter for given event source mapping type."
        )
        assert err.code == "InvalidParameterValueException"
        assert "DestinationConfig" in str(err) and kind in str(err)


def test_on_success_rejected() -> None:
    err = error_of("kinesis", destination_config={"OnSuccess": {"Destination": SQS_ARN}})
    assert (
        err.message
        == "Unsupported DestinationConfig parameter for given event source mapping type."
    )
    assert "OnSuccess" in str(err)


@pytest.mark.parametrize(
    ("kind", "param", "value"),
    [
        ("kinesis", "scaling_config", {"MaximumConcurrency": 5}),
        ("kafka", "scaling_config", {"MaximumConcurrency": 5}),
        ("sqs", "parallelization_factor", 2),
        ("sqs", "starting_position", "LATEST"),
        ("local", "bisect_batch_on_function_error", True),
        ("redis-queue", "maximum_retry_attempts", 3),
        ("sqs", "maximum_record_age_in_seconds", 60),
        ("kafka", "tumbling_window_in_seconds", 30),
        ("sqs", "topics", ["t"]),
        ("kinesis", "consumer_group_id", "g"),
        ("dynamodb", "starting_position_timestamp", NOW - 10),
    ],
)
def test_not_applicable_parameter(kind: str, param: str, value: Any) -> None:
    err = error_of(kind, **{param: value})
    aws_name = PARAMETERS_BY_NAME[param].aws_name
    assert aws_name in str(err)
    assert repr(value) in str(err)
    assert kind in str(err)
    assert err.parameter == aws_name


@pytest.mark.parametrize("kind", ORDERED)
def test_starting_position_required(kind: str) -> None:
    uri = SOURCES[kind][0]
    with pytest.raises(MappingError) as info:
        create_mapping({"function_name": "fn", "event_source_arn": uri})
    assert info.value.message == (
        "1 validation error detected: Value null at 'startingPosition' failed to satisfy "
        "constraint: Member must not be null."
    )


def test_starting_position_bad_enum() -> None:
    err = error_of("kinesis", starting_position="EARLIEST")
    assert err.message == (
        "1 validation error detected: Value 'EARLIEST' at 'startingPosition' failed to satisfy "
        "constraint: Member must satisfy enum value set: [LATEST, AT_TIMESTAMP, TRIM_HORIZON]"
    )


def test_at_timestamp_on_dynamodb() -> None:
    err = error_of("dynamodb", starting_position="AT_TIMESTAMP")
    assert err.message == f"Unsupported starting position for arn type: {DDB_ARN}"


def test_at_timestamp_kinesis() -> None:
    m = make("kinesis", starting_position="AT_TIMESTAMP", starting_position_timestamp=NOW - 60)
    assert m.starting_position_timestamp == NOW - 60
    iso = make(
        "kafka",
        starting_position="AT_TIMESTAMP",
        starting_position_timestamp="2023-11-14T00:00:00Z",
    )
    assert iso.starting_position_timestamp == 1_699_920_000.0
    naive = make(
        "kinesis",
        starting_position="AT_TIMESTAMP",
        starting_position_timestamp="2023-11-14T00:00:00",
    )
    assert naive.starting_position_timestamp == 1_699_920_000.0  # no zone means UTC


def test_at_timestamp_needs_timestamp() -> None:
    err = error_of("kinesis", starting_position="AT_TIMESTAMP")
    assert "StartingPositionTimestamp" in err.message


def test_timestamp_in_future() -> None:
    err = error_of("kinesis", starting_position="AT_TIMESTAMP", starting_position_timestamp=NOW + 5)
    assert "cannot be in the future" in err.message


def test_timestamp_without_at_timestamp() -> None:
    err = error_of("kinesis", starting_position="LATEST", starting_position_timestamp=NOW - 5)
    assert "AT_TIMESTAMP" in err.message


def test_timestamp_bad_type() -> None:
    err = error_of("kinesis", starting_position="AT_TIMESTAMP", starting_position_timestamp="soon")
    assert "StartingPositionTimestamp" in err.message and "'soon'" in err.message


@pytest.mark.parametrize("age", [0, 1, 30, 59])
def test_record_age_below_60_rejected(age: int) -> None:
    err = error_of("kinesis", maximum_record_age_in_seconds=age)
    assert "MaximumRecordAgeInSeconds" in err.message and str(age) in err.message


@pytest.mark.parametrize("age", [-1, 60, 604800])
def test_record_age_valid(age: int) -> None:
    assert make("kinesis", maximum_record_age_in_seconds=age).maximum_record_age_in_seconds == age


@pytest.mark.parametrize("age", [-2, 604801])
def test_record_age_out_of_range(age: int) -> None:
    err = error_of("dynamodb", maximum_record_age_in_seconds=age)
    assert f"Value '{age}' at 'maximumRecordAgeInSeconds'" in err.message


@pytest.mark.parametrize("kind", QUEUES)
def test_queue_batch_over_10_needs_window(kind: str) -> None:
    err = error_of(kind, batch_size=11)
    assert err.message == (
        "Maximum batch window in seconds must be greater than 0 if maximum batch size is "
        "greater than 10"
    )
    assert "BatchSize=11" in str(err) and "MaximumBatchingWindowInSeconds=0" in str(err)
    assert make(kind, batch_size=10000, maximum_batching_window_in_seconds=1).batch_size == 10000


def test_stream_batch_over_10_without_window_is_fine() -> None:
    assert make("kinesis", batch_size=500).batch_size == 500


@pytest.mark.parametrize("uri", [FIFO_ARN, "local://jobs.fifo"])
def test_fifo_batch_max_10(uri: str) -> None:
    base = {"function_name": "fn", "event_source_arn": uri}
    with pytest.raises(MappingError) as info:
        create_mapping({**base, "batch_size": 11, "maximum_batching_window_in_seconds": 5})
    assert "FIFO" in info.value.message and "11" in info.value.message
    assert create_mapping({**base, "batch_size": 10}).batch_size == 10


def test_fifo_rejects_batching_window() -> None:
    with pytest.raises(MappingError) as info:
        create_mapping(
            {
                "function_name": "fn",
                "event_source_arn": FIFO_ARN,
                "maximum_batching_window_in_seconds": 5,
            }
        )
    assert info.value.message == "Batching window is not supported for FIFO queues."
    assert "MaximumBatchingWindowInSeconds=5" in str(info.value)


@pytest.mark.parametrize(
    ("param", "member", "value", "constraint"),
    [
        ("batch_size", "batchSize", 0, "greater than or equal to 1"),
        ("batch_size", "batchSize", 10001, "less than or equal to 10000"),
        ("maximum_batching_window_in_seconds", "maximumBatchingWindowInSeconds", -1, "greater"),
        ("maximum_batching_window_in_seconds", "maximumBatchingWindowInSeconds", 301, "less"),
        ("parallelization_factor", "parallelizationFactor", 0, "greater"),
        ("parallelization_factor", "parallelizationFactor", 11, "less"),
        ("maximum_retry_attempts", "maximumRetryAttempts", -2, "greater"),
        ("maximum_retry_attempts", "maximumRetryAttempts", 10001, "less"),
        ("tumbling_window_in_seconds", "tumblingWindowInSeconds", 901, "less"),
    ],
)
def test_ranges(param: str, member: str, value: int, constraint: str) -> None:
    err = error_of("kinesis", **{param: value})
    assert err.message.startswith(
        f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy constraint: "
        "Member must have value "
    )
    assert constraint in err.message


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("batch_size", "10"),
        ("batch_size", True),
        ("batch_size", 10.5),
        ("enabled", "yes"),
        ("bisect_batch_on_function_error", 1),
        ("function_response_types", "ReportBatchItemFailures"),
        ("filter_criteria", "[]"),
        ("function_name", 5),
    ],
)
def test_types(param: str, value: Any) -> None:
    err = error_of("kinesis", **{param: value})
    assert PARAMETERS_BY_NAME[param].aws_name in err.message
    assert repr(value) in err.message


def test_range_edges_accepted() -> None:
    m = make(
        "kinesis",
        batch_size=10000,
        maximum_batching_window_in_seconds=300,
        parallelization_factor=10,
        maximum_retry_attempts=10000,
        tumbling_window_in_seconds=900,
    )
    assert (m.batch_size, m.parallelization_factor, m.tumbling_window_in_seconds) == (
        10000,
        10,
        900,
    )
    assert make("sqs", batch_size=1).batch_size == 1


@pytest.mark.parametrize("concurrency", [1, 1001])
def test_maximum_concurrency_range(concurrency: int) -> None:
    err = error_of("sqs", scaling_config={"MaximumConcurrency": concurrency})
    assert f"Value '{concurrency}' at 'scalingConfig.maximumConcurrency'" in err.message


@pytest.mark.parametrize("concurrency", [2, 1000])
def test_maximum_concurrency_edges(concurrency: int) -> None:
    m = make("redis-queue", scaling_config={"MaximumConcurrency": concurrency})
    assert m.scaling_config == {"MaximumConcurrency": concurrency}


def test_scaling_config_bad_shape() -> None:
    assert "'Max'" in error_of("sqs", scaling_config={"Max": 3}).message
    assert "'5'" in error_of("sqs", scaling_config={"MaximumConcurrency": "5"}).message


def test_empty_scaling_config_is_unset() -> None:
    assert make("sqs", scaling_config={}).scaling_config is None


def test_function_response_types() -> None:
    err = error_of("sqs", function_response_types=["Everything"])
    assert err.message == (
        "1 validation error detected: Value '[Everything]' at 'functionResponseTypes' failed to "
        "satisfy constraint: Member must satisfy enum value set: [ReportBatchItemFailures]"
    )
    two = error_of(
        "sqs", function_response_types=["ReportBatchItemFailures", "ReportBatchItemFailures"]
    )
    assert "functionResponseTypes" in two.message
    for kind in SOURCES:
        m = make(kind, function_response_types=("ReportBatchItemFailures",))
        assert m.function_response_types == ["ReportBatchItemFailures"]


GOOD_FILTER = {"Filters": [{"Pattern": '{"body": {"kind": ["a"]}}'}]}


def test_filter_criteria_stored_for_every_kind() -> None:
    for kind in SOURCES:
        assert make(kind, filter_criteria=GOOD_FILTER).filter_criteria == GOOD_FILTER


@pytest.mark.parametrize("empty", [{}, {"Filters": []}])
def test_filter_criteria_empty_is_unset(empty: dict[str, Any]) -> None:
    assert make("sqs", filter_criteria=empty).filter_criteria is None


@pytest.mark.parametrize(
    "criteria",
    [
        {"Filters": "x"},
        {"Filters": [{"Pattern": 5}]},
        {"Filters": [{"Pattern": ""}]},
        {"Filters": [{"Pattern": "not json"}]},
        {"Filters": [{"Pattern": "null"}]},
        {"Filters": [{"Pattern": '"a string"'}]},
        {"Filters": [{"Pattern": "[1]"}]},
        {"Filters": [{"Pattern": "{}", "Extra": 1}]},
        {"Filters": ["{}"]},
        {"Filters": [{"Pattern": "{}"}], "Other": 1},
        {"Filters": [{"Pattern": '{"a": [' + '"x",' * 1100 + '"x"]}'}]},  # > 4096 chars
    ],
)
def test_filter_criteria_bad_shape(criteria: dict[str, Any], **_: Any) -> None:
    err = error_of("sqs", filter_criteria=criteria)
    assert err.message == "Invalid filter pattern definition."
    assert err.parameter == "FilterCriteria"
    assert "FilterCriteria" in str(err)


def test_filter_hook_called_and_errors_translated() -> None:
    seen: list[dict[str, Any]] = []

    def ok(criteria: dict[str, Any], **_: Any) -> None:
        seen.append(criteria)

    base = {"function_name": "fn", "event_source_arn": SQS_ARN, "filter_criteria": GOOD_FILTER}
    create_mapping(base, validate_filters=ok)
    assert seen == [GOOD_FILTER]

    class DeepError(ValueError):
        detail = "numeric operators are not supported here"

    def bad(criteria: dict[str, Any], **_: Any) -> None:
        raise DeepError("Invalid filter pattern definition. whatever")

    with pytest.raises(MappingError) as info:
        create_mapping(base, validate_filters=bad)
    assert info.value.message == "Invalid filter pattern definition."
    assert "numeric operators are not supported here" in str(info.value)

    def conflict(criteria: dict[str, Any], **_: Any) -> None:
        raise MappingError("custom", code="ResourceConflictException")

    with pytest.raises(MappingError) as info:
        create_mapping(base, validate_filters=conflict)
    assert info.value.code == "ResourceConflictException"


def test_filter_hook_not_called_without_filters() -> None:
    def boom(criteria: dict[str, Any], **_: Any) -> None:
        raise AssertionError("called")

    create_mapping({"function_name": "fn", "event_source_arn": SQS_ARN}, validate_filters=boom)


@pytest.mark.parametrize(
    "destination",
    [
        "arn:aws:sqs:us-east-1:123456789012:dlq",
        "https://sqs.us-east-1.amazonaws.com/123456789012/dlq",
        "sqs://dlq",
        "redis-queue://localhost:6379/0/failures",
        "local://failures",
        "file:///var/lib/poller/failures.jsonl",
    ],
)
def test_destination_accepted(destination: str) -> None:
    config = {"OnFailure": {"Destination": destination}}
    m = make("kinesis", destination_config=config)
    assert m.destination_config == config
    assert m.on_failure_destination == destination


@pytest.mark.parametrize("empty", [{"OnFailure": {"Destination": ""}}, {}, {"OnFailure": {}}])
def test_empty_destination_is_unset(empty: dict[str, Any]) -> None:
    m = make("dynamodb", destination_config=empty)
    assert m.destination_config is None
    assert m.on_failure_destination is None


@pytest.mark.parametrize(
    ("kind", "destination", "needle"),
    [
        ("kinesis", "https://example.com/hook", "Invalid DestinationConfig"),
        ("kinesis", "arn:aws:sns:us-east-1:123456789012:alerts", "SNS destinations are not"),
        ("kinesis", "arn:aws:s3:::failed-records", "S3 destinations are not"),
        ("kinesis", KINESIS_ARN, "not a destination"),
        ("kinesis", "file://", "needs a path"),
        ("kinesis", "redis-queue://u:hunter2@h/0/k?bogus=1", "Invalid DestinationConfig"),
        ("kinesis", "kafka://errors", "Kafka event source"),
        ("kafka", "kafka://payments", "must differ"),
        ("dynamodb", "arn:aws:sqs:us-east-1:123456789012:dlq.fifo", "standard"),
        ("kinesis", "arn:aws:sqs:us-east-1:123456789012:" + "q" * 400, "350"),
    ],
)
def test_destination_rejected(kind: str, destination: str, needle: str) -> None:
    err = error_of(kind, destination_config={"OnFailure": {"Destination": destination}})
    assert needle in err.message
    assert "hunter2" not in str(err)
    assert err.parameter == "DestinationConfig"


def test_kafka_destination_topic() -> None:
    m = make("kafka", destination_config={"OnFailure": {"Destination": "kafka://payments-dlq"}})
    assert m.on_failure_destination == "kafka://payments-dlq"


def test_kafka_topics() -> None:
    no_topic = "kafka://b1:9092"
    base = {"function_name": "fn", "event_source_arn": no_topic, "starting_position": "LATEST"}
    assert create_mapping({**base, "topics": ["t1"]}).topics == ["t1"]
    for topics in ([], ["a", "b"]):
        with pytest.raises(MappingError) as info:
            create_mapping({**base, "topics": topics})
        assert "exactly 1" in info.value.message
    with pytest.raises(MappingError) as info:
        create_mapping(base)
    assert "Topics is required" in info.value.message
    # The URI's topic and topics must agree.
    assert make("kafka", topics=["payments"]).topics == ["payments"]
    assert "does not match" in error_of("kafka", topics=["other"]).message
    # The on-failure topic may not be the source topic given through topics either.
    with pytest.raises(MappingError) as info:
        create_mapping(
            {
                **base,
                "topics": ["t1"],
                "destination_config": {"OnFailure": {"Destination": "kafka://t1"}},
            }
        )
    assert "must differ" in info.value.message


def test_kafka_consumer_group() -> None:
    assert make("kafka", consumer_group_id="billing").consumer_group_id == "billing"
    assert error_of("kafka", consumer_group_id="has space").parameter == "ConsumerGroupId"


def test_name() -> None:
    assert make("sqs", name="orders-worker").name == "orders-worker"
    assert error_of("sqs", name="-bad").parameter == "Name"
    assert error_of("sqs", name="").parameter == "Name"


def test_bad_uuid() -> None:
    with pytest.raises(MappingError):
        create_mapping({"function_name": "fn", "event_source_arn": SQS_ARN}, uuid="short")


def test_error_to_aws_shape() -> None:
    err = error_of("sqs", batch_size=11)
    assert err.http_status == 400
    assert err.to_aws()["__type"] == "InvalidParameterValueException"
    assert err.to_aws()["message"] == str(err)


# --------------------------------------------------------------------------- update


def test_update_changes_value_and_timestamp() -> None:
    m = make("sqs")
    u = update_mapping(m, {"batch_size": 5}, now=NOW + 10)
    assert u.batch_size == 5
    assert u.last_modified == NOW + 10
    assert (u.uuid, u.state, u.function_name) == (m.uuid, m.state, m.function_name)
    assert m.batch_size == 10  # the original is untouched


def test_update_validates_merged_result() -> None:
    m = make("sqs")
    with pytest.raises(MappingError) as info:
        update_mapping(m, {"batch_size": 50})
    assert info.value.message.startswith("Maximum batch window in seconds must be greater than 0")
    u = update_mapping(m, {"batch_size": 50, "maximum_batching_window_in_seconds": 2}, now=NOW)
    assert (u.batch_size, u.maximum_batching_window_in_seconds) == (50, 2)
    # ...and the window cannot now drop back to 0 while the batch is large.
    with pytest.raises(MappingError):
        update_mapping(u, {"maximum_batching_window_in_seconds": 0})


def test_update_applies_applicability() -> None:
    with pytest.raises(MappingError) as info:
        update_mapping(make("sqs"), {"destination_config": {"OnFailure": {"Destination": SQS_ARN}}})
    assert info.value.message == (
        "Unsupported DestinationConfig parameter for given event source mapping type."
    )


def test_update_enabled_toggles_state() -> None:
    m = make("kinesis")
    off = update_mapping(m, {"enabled": False}, now=NOW)
    assert off.state == "Disabled" and not off.enabled
    assert off.state_transition_reason == "User action"
    on = update_mapping(off, {"enabled": True}, now=NOW)
    assert on.state == "Enabled" and on.enabled
    # Without "enabled" the state stays what it was.
    assert update_mapping(off, {"batch_size": 5}, now=NOW).state == "Disabled"


def test_update_function_name() -> None:
    assert update_mapping(make("sqs"), {"function_name": "other"}).function_name == "other"


@pytest.mark.parametrize(
    ("kind", "param", "value"),
    [
        ("sqs", "event_source_arn", "arn:aws:sqs:eu-west-1:123456789012:other"),
        ("kinesis", "starting_position", "TRIM_HORIZON"),
        ("kinesis", "starting_position_timestamp", NOW - 1),
        ("kafka", "topics", ["other"]),
        ("kafka", "consumer_group_id", "other"),
    ],
)
def test_update_create_only_rejected(kind: str, param: str, value: Any) -> None:
    with pytest.raises(MappingError) as info:
        update_mapping(make(kind), {param: value})
    aws_name = PARAMETERS_BY_NAME[param].aws_name
    assert info.value.message.startswith(f"{aws_name} can only be set when the mapping is created")
    assert info.value.parameter == aws_name


def test_update_create_only_same_value_allowed() -> None:
    m = make("kafka")
    same = {
        "event_source_arn": KAFKA_URI,
        "starting_position": "LATEST",
        "topics": ["payments"],
        "consumer_group_id": UUID_A,
        "batch_size": 7,
    }
    assert update_mapping(m, same).batch_size == 7
    k = make("kinesis", starting_position="AT_TIMESTAMP", starting_position_timestamp=NOW - 60)
    iso = "2023-11-14T22:12:20+00:00"  # NOW - 60 as ISO
    assert (
        update_mapping(k, {"starting_position_timestamp": iso}).starting_position_timestamp
        == NOW - 60
    )


def test_update_create_only_error_hides_password() -> None:
    m = make("redis-queue")
    with pytest.raises(MappingError) as info:
        update_mapping(m, {"event_source_arn": "redis-queue://u:hunter2@other/jobs"})
    assert "hunter2" not in str(info.value)


def test_update_none_resets_to_default() -> None:
    m = make("kinesis", batch_size=500, parallelization_factor=4)
    u = update_mapping(m, {"batch_size": None, "parallelization_factor": None})
    assert (u.batch_size, u.parallelization_factor) == (100, 1)


def test_update_removes_nested_configs() -> None:
    sqs = make("sqs", scaling_config={"MaximumConcurrency": 5}, filter_criteria=GOOD_FILTER)
    u = update_mapping(sqs, {"scaling_config": {}, "filter_criteria": {}})
    assert u.scaling_config is None and u.filter_criteria is None
    k = make("kinesis", destination_config={"OnFailure": {"Destination": SQS_ARN}})
    assert (
        update_mapping(
            k, {"destination_config": {"OnFailure": {"Destination": ""}}}
        ).destination_config
        is None
    )


def test_update_keeps_processing_result_and_reason() -> None:
    m = dataclasses.replace(make("sqs"), last_processing_result="OK")
    assert update_mapping(m, {"batch_size": 3}).last_processing_result == "OK"


def test_update_unknown_key() -> None:
    with pytest.raises(MappingError) as info:
        update_mapping(make("sqs"), {"size": 3})
    assert "'size'" in info.value.message


def test_update_runs_filter_hook() -> None:
    def bad(criteria: dict[str, Any], **_: Any) -> None:
        raise ValueError("nope")

    with pytest.raises(MappingError) as info:
        update_mapping(make("sqs"), {"filter_criteria": GOOD_FILTER}, validate_filters=bad)
    assert info.value.message == "Invalid filter pattern definition."


# --------------------------------------------------------------------------- to_aws

SQS_AWS_KEYS = {
    "UUID",
    "FunctionName",
    "FunctionArn",
    "EventSourceArn",
    "BatchSize",
    "MaximumBatchingWindowInSeconds",
    "FunctionResponseTypes",
    "LastModified",
    "LastProcessingResult",
    "State",
    "StateTransitionReason",
    "EventSourceMappingArn",
}
STREAM_ONLY_KEYS = {
    "StartingPosition",
    "ParallelizationFactor",
    "BisectBatchOnFunctionError",
    "MaximumRetryAttempts",
    "MaximumRecordAgeInSeconds",
    "TumblingWindowInSeconds",
    "DestinationConfig",
}


def test_to_aws_sqs() -> None:
    m = create_mapping(
        {"function_name": "fn", "event_source_arn": SQS_URL, "batch_size": 5}, uuid=UUID_A, now=NOW
    )
    out = m.to_aws()
    assert set(out) == SQS_AWS_KEYS
    assert not STREAM_ONLY_KEYS & set(out)
    assert out["UUID"] == UUID_A
    assert out["EventSourceArn"] == SQS_ARN  # the ARN, whatever form was given
    assert out["BatchSize"] == 5
    assert out["MaximumBatchingWindowInSeconds"] == 0
    assert out["FunctionResponseTypes"] == []
    assert out["State"] == "Enabled"
    assert out["StateTransitionReason"] == "USER_INITIATED"
    assert out["LastProcessingResult"] == "No records processed"
    assert out["LastModified"] == "2023-11-14T22:13:20+00:00"
    assert out["FunctionName"] == "fn"
    assert out["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:fn"
    assert out["EventSourceMappingArn"] == (
        f"arn:aws:lambda:us-east-1:000000000000:event-source-mapping:{UUID_A}"
    )
    json.dumps(out)


def test_to_aws_optional_fields_when_set() -> None:
    m = make(
        "sqs",
        name="worker",
        scaling_config={"MaximumConcurrency": 4},
        filter_criteria=GOOD_FILTER,
    )
    out = m.to_aws(region="eu-west-1", account="123456789012")
    assert out["Name"] == "worker"
    assert out["ScalingConfig"] == {"MaximumConcurrency": 4}
    assert out["FilterCriteria"] == GOOD_FILTER
    assert out["EventSourceMappingArn"] == (
        f"arn:aws:lambda:eu-west-1:123456789012:event-source-mapping:{UUID_A}"
    )
    assert out["FunctionArn"] == "arn:aws:lambda:eu-west-1:123456789012:function:fn"
    # The response is a copy: editing it must not edit the mapping.
    out["ScalingConfig"]["MaximumConcurrency"] = 99
    assert m.maximum_concurrency == 4


def test_to_aws_kinesis() -> None:
    out = make("kinesis", starting_position="TRIM_HORIZON").to_aws()
    assert set(out) == SQS_AWS_KEYS | STREAM_ONLY_KEYS
    assert out["EventSourceArn"] == KINESIS_ARN
    assert out["StartingPosition"] == "TRIM_HORIZON"
    assert out["BatchSize"] == 100
    assert out["ParallelizationFactor"] == 1
    assert out["BisectBatchOnFunctionError"] is False
    assert out["MaximumRetryAttempts"] == -1
    assert out["MaximumRecordAgeInSeconds"] == -1
    assert out["TumblingWindowInSeconds"] == 0
    assert out["DestinationConfig"] == {"OnFailure": {}}  # what AWS shows when unset
    assert out["StateTransitionReason"] == "User action"


def test_to_aws_kinesis_timestamp_and_destination() -> None:
    out = make(
        "kinesis",
        starting_position="AT_TIMESTAMP",
        starting_position_timestamp=NOW - 60,
        destination_config={"OnFailure": {"Destination": SQS_ARN}},
    ).to_aws()
    assert out["StartingPositionTimestamp"] == "2023-11-14T22:12:20+00:00"
    assert out["DestinationConfig"] == {"OnFailure": {"Destination": SQS_ARN}}


def test_to_aws_kafka() -> None:
    out = make("kafka").to_aws()
    assert out["Topics"] == ["payments"]
    assert out["SelfManagedEventSource"] == {
        "Endpoints": {"KAFKA_BOOTSTRAP_SERVERS": ["broker1:9092", "broker2:9093"]}
    }
    assert out["SelfManagedKafkaEventSourceConfig"] == {"ConsumerGroupId": UUID_A}
    assert "MaximumBatchingWindowInSeconds" not in out  # the 500 ms default has no int form
    assert out["ParallelizationFactor"] == 1 and "TumblingWindowInSeconds" not in out


def test_to_aws_redis_hides_password() -> None:
    m = create_mapping({"function_name": "fn", "event_source_arn": REDIS_URI}, now=NOW)
    out = m.to_aws()
    assert out["EventSourceArn"] == "redis-queue://redis.local:6380/2/jobs"
    assert "s3cret" not in json.dumps(out)


def test_function_arn_forms() -> None:
    assert make("sqs", function_name="fn:live").function_arn() == (
        "arn:aws:lambda:us-east-1:000000000000:function:fn:live"
    )
    assert make("sqs", function_name="123456789012:function:fn").function_arn() == (
        "arn:aws:lambda:us-east-1:123456789012:function:fn"
    )
    full = "arn:aws:lambda:eu-west-1:123456789012:function:fn"
    assert make("sqs", function_name=full).function_arn() == full


# --------------------------------------------------------------------------- storage


def full_mappings() -> list[Mapping]:
    return [
        make(
            "sqs",
            name="orders",
            batch_size=100,
            maximum_batching_window_in_seconds=5,
            scaling_config={"MaximumConcurrency": 3},
            filter_criteria=GOOD_FILTER,
            function_response_types=["ReportBatchItemFailures"],
            enabled=False,
        ),
        make(
            "kinesis",
            starting_position="AT_TIMESTAMP",
            starting_position_timestamp=NOW - 0.25,
            destination_config={"OnFailure": {"Destination": SQS_ARN}},
            bisect_batch_on_function_error=True,
            maximum_record_age_in_seconds=3600,
            tumbling_window_in_seconds=60,
        ),
        make("kafka", consumer_group_id="grp"),
        create_mapping({"function_name": "fn", "event_source_arn": REDIS_URI}, now=NOW + 0.5),
    ]


@pytest.mark.parametrize("m", full_mappings(), ids=lambda m: m.kind)
def test_to_dict_round_trip(m: Mapping) -> None:
    stored = json.loads(json.dumps(m.to_dict()))
    back = Mapping.from_dict(stored)
    assert back == m
    assert back.to_dict() == m.to_dict()
    assert back.source == m.source
    assert back.to_aws() == m.to_aws()


def test_to_dict_keys_are_the_fields() -> None:
    d = make("sqs").to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(Mapping)}
    assert d["state"] == "Enabled" and d["last_modified"] == NOW


def test_to_dict_is_a_copy() -> None:
    m = make("sqs", scaling_config={"MaximumConcurrency": 3})
    d = m.to_dict()
    d["scaling_config"]["MaximumConcurrency"] = 50
    assert m.maximum_concurrency == 3


def test_from_dict_rejects_bad_data() -> None:
    d = make("sqs").to_dict()
    with pytest.raises(MappingError, match="unknown field"):
        Mapping.from_dict({**d, "colour": "red"})
    without = dict(d)
    del without["function_name"]
    with pytest.raises(MappingError, match="function_name"):
        Mapping.from_dict(without)
    with pytest.raises(MappingError, match="state"):
        Mapping.from_dict({**d, "state": "Running"})


def test_to_params_recreates_mapping() -> None:
    for m in full_mappings():
        again = create_mapping(m.to_params(), uuid=m.uuid, now=m.last_modified)
        assert again == m


# --------------------------------------------------------------------------- duplicates


def test_duplicate_sqs() -> None:
    existing = make("sqs", uuid=UUID_A)
    new = create_mapping({"function_name": "fn", "event_source_arn": SQS_URL}, uuid=UUID_B)
    err = duplicate_error(existing, new)
    assert err is not None
    assert err.code == "ResourceConflictException"
    assert err.http_status == 409
    assert err.message == (
        f'An event source mapping with SQS arn (" {SQS_ARN} ") and function (" fn ") already '
        f"exists. Please update or delete the existing mapping with UUID {UUID_A}"
    )


def test_duplicate_local_and_redis_use_queue_message() -> None:
    for kind in ("local", "redis-queue"):
        err = duplicate_error(make(kind, uuid=UUID_A), make(kind, uuid=UUID_B))
        assert err is not None
        assert err.message.startswith(f"An event source mapping with {kind} arn (")
        assert err.message.endswith(f"existing mapping with UUID {UUID_A}")


def test_duplicate_function_name_vs_arn() -> None:
    existing = make("sqs", uuid=UUID_A)
    new = make(
        "sqs", uuid=UUID_B, function_name="arn:aws:lambda:us-east-1:000000000000:function:fn"
    )
    assert duplicate_error(existing, new) is not None
    # Another qualifier is another function version: allowed.
    assert duplicate_error(existing, make("sqs", uuid=UUID_B, function_name="fn:v2")) is None


def test_not_duplicates() -> None:
    existing = make("sqs", uuid=UUID_A)
    assert duplicate_error(existing, existing) is None  # the same mapping
    assert duplicate_error(existing, make("sqs", uuid=UUID_B, function_name="other")) is None
    other_queue = create_mapping(
        {"function_name": "fn", "event_source_arn": SQS_ARN + "2"}, uuid=UUID_B
    )
    assert duplicate_error(existing, other_queue) is None
    assert duplicate_error(existing, make("local", uuid=UUID_B)) is None
    # Two consumer groups on one Redis stream are two independent queues.
    a = create_mapping(
        {"function_name": "fn", "event_source_arn": "redis-queue://h/jobs?group=a"}, uuid=UUID_A
    )
    b = create_mapping(
        {"function_name": "fn", "event_source_arn": "redis-queue://h/jobs?group=b"}, uuid=UUID_B
    )
    assert duplicate_error(a, b) is None


def test_duplicate_stream() -> None:
    err = duplicate_error(make("kinesis", uuid=UUID_A), make("kinesis", uuid=UUID_B))
    assert err is not None and err.code == "ResourceConflictException"
    assert err.message == (
        f'The event source arn (" {KINESIS_ARN} ") and function (" fn ") provided mapping already '
        f"exists. Please update or delete the existing mapping with UUID {UUID_A}"
    )
    consumer = create_mapping(
        {
            "function_name": "fn",
            "event_source_arn": KINESIS_ARN + "/consumer/c:1",
            "starting_position": "LATEST",
        },
        uuid=UUID_B,
    )
    assert duplicate_error(make("kinesis", uuid=UUID_A), consumer) is None


def test_duplicate_kafka() -> None:
    existing = make("kafka", uuid=UUID_A)
    overlapping = create_mapping(
        {
            "function_name": "fn",
            "event_source_arn": "kafka://broker2:9093/payments",
            "starting_position": "TRIM_HORIZON",
        },
        uuid=UUID_B,
    )
    err = duplicate_error(existing, overlapping)
    assert err is not None and err.code == "ResourceConflictException"
    assert err.message == (
        'An event source mapping with event source ("broker2:9093"), function '
        '("arn:aws:lambda:us-east-1:000000000000:function:fn"), topics ("payments") already '
        f"exists. Please update or delete the existing mapping with UUID {UUID_A}"
    )
    other_topic = create_mapping(
        {
            "function_name": "fn",
            "event_source_arn": "kafka://broker1:9092/refunds",
            "starting_position": "LATEST",
        },
        uuid=UUID_B,
    )
    assert duplicate_error(existing, other_topic) is None


def test_duplicate_name() -> None:
    a = make("sqs", uuid=UUID_A, name="orders")
    b = make("kinesis", uuid=UUID_B, name="orders", function_name="other")
    err = duplicate_error(a, b)
    assert err is not None and err.code == "ResourceConflictException"
    assert "'orders'" in err.message and UUID_A in err.message


# --------------------------------------------------------------------------- the table


def test_parameter_table_covers_the_model() -> None:
    snake = {p.snake_name for p in PARAMETERS}
    assert len(snake) == len(PARAMETERS)
    assert len({p.aws_name for p in PARAMETERS}) == len(PARAMETERS)
    model = {f.name for f in dataclasses.fields(Mapping)}
    status = {"uuid", "state", "state_transition_reason", "last_modified", "last_processing_result"}
    # Every parameter but "enabled" (derived from state) is a Mapping field, and vice versa.
    assert snake - {"enabled"} == model - status
    assert PARAMETERS_BY_AWS_NAME["BatchSize"] is PARAMETERS_BY_NAME["batch_size"]


def test_parameter_table_defaults_and_kinds() -> None:
    batch = PARAMETERS_BY_NAME["batch_size"]
    assert [batch.default_for(f) for f in ("queue", "stream", "kafka")] == [10, 100, 100]
    assert (batch.minimum, batch.maximum, batch.range_text()) == (1, 10000, "1..10000")
    assert batch.member == "batchSize" and batch.cli_name == "--batch-size"
    window = PARAMETERS_BY_NAME["maximum_batching_window_in_seconds"]
    assert window.default_for("kafka") is None and window.default_for("stream") == 0
    assert PARAMETERS_BY_NAME["scaling_config"].families == {"queue"}
    assert PARAMETERS_BY_NAME["parallelization_factor"].families == {"stream", "kafka"}
    assert PARAMETERS_BY_NAME["destination_config"].families == {"stream", "kafka"}
    assert PARAMETERS_BY_NAME["topics"].create_only
    position = PARAMETERS_BY_NAME["starting_position"]
    assert position.range_text() == "LATEST | AT_TIMESTAMP | TRIM_HORIZON"
    assert position.required == {"stream", "kafka"}
    assert all(p.help for p in PARAMETERS)


def test_parameter_defaults_are_not_shared() -> None:
    a, b = make("sqs"), make("sqs", uuid=UUID_B)
    a.function_response_types.append("x")
    assert b.function_response_types == []
    assert PARAMETERS_BY_NAME["function_response_types"].default_for("queue") == []


def test_event_source_is_hashable() -> None:
    assert isinstance(hash(parse_event_source(REDIS_URI)), int)
    assert isinstance(parse_event_source("local://q"), SourceSpec)
