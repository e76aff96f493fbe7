"""The Kafka source's pure parts: §7.5 records, §5.3 identifiers, §5.4 batch info, the [kafka]
config and the client options it turns into, the mapping rules of Kafka sources."""

from __future__ import annotations

import base64
import io
import json
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from poller.config import Config, ConfigError, parse_config
from poller.engine.batching import parse_batch_item_failures
from poller.engine.runners import Services
from poller.engine.stream import build_stream_runner
from poller.logs import JsonLog
from poller.mappings import MappingError, create_mapping, parse_event_source
from poller.sources.base import SourceContext, SourceError
from poller.sources.kafka import KafkaSpec
from poller.sources.kafka.client import connection_options, consumer_timings, settings_for
from poller.sources.kafka.records import RecordEncoder, batch_info, envelope, item_sequence

Raw = namedtuple("Raw", "topic partition offset timestamp timestamp_type key value headers")


def _event(shard: str, records: list[Any]) -> dict[str, Any]:
    head, tail = envelope("b1:9092,b2:9092", shard)
    encoded = RecordEncoder().encode(records)
    return json.loads(head + b",".join(r.encoded for r in encoded) + tail)


def test_records_have_lambdas_kafka_shape() -> None:
    event = _event(
        "orders-3",
        [
            Raw("orders", 3, 15, 1545084650987, 0, b"abc", b"Hello", [("h", b"hv")]),
            Raw("orders", 3, 16, 1545084650988, 1, None, None, []),
        ],
    )
    assert event == {
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": "b1:9092,b2:9092",
        "records": {
            "orders-3": [
                {
                    "topic": "orders",
                    "partition": 3,
                    "offset": 15,
                    "timestamp": 1545084650987,
                    "timestampType": "CREATE_TIME",
                    "key": base64.b64encode(b"abc").decode(),
                    "value": base64.b64encode(b"Hello").decode(),
                    "headers": [{"h": [104, 118]}],
                },
                {
                    "topic": "orders",
                    "partition": 3,
                    "offset": 16,
                    "timestamp": 1545084650988,
                    "timestampType": "LOG_APPEND_TIME",
                    "headers": [],
                },
            ]
        },
    }


def test_stream_records_carry_offset_key_and_time() -> None:
    [keyed, keyless] = RecordEncoder().encode(
        [Raw("t", 0, 7, 2000, 0, b"k", b"v", []), Raw("t", 0, 8, 3000, 0, None, b"v", [])],
    )
    assert (keyed.sequence, keyed.arrival, keyed.size) == ("7", 2.0, len(keyed.encoded))
    assert keyed.partition_key == base64.b64encode(b"k").decode()
    # Keyless records share one lane: their order in the partition holds.
    assert keyless.partition_key == ""


def test_a_topic_with_a_percent_sign_in_its_json_is_safe() -> None:
    [record] = RecordEncoder().encode([Raw("a%b", 0, 1, 1, 0, None, b"x", [])])
    assert json.loads(record.encoded)["topic"] == "a%b"


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        ({"partition": "t-0", "offset": 5}, "5"),
        ({"partition": "t-0", "offset": "5"}, "5"),
        ({"partition": "t-1", "offset": 5}, None),  # another partition than the batch's
        ({"partition": "t-0"}, None),
        ({"partition": "t-0", "offset": True}, None),
        ({"partition": "t-0", "offset": -1}, None),
        ({"partition": "t-0", "offset": 5, "extra": 1}, None),
        ("5", None),  # Kinesis's form is not Kafka's
        (None, None),
    ],
)
def test_item_identifiers(identifier: Any, expected: str | None) -> None:
    assert item_sequence("t-0", identifier) == expected


def test_partial_responses_in_kafkas_form() -> None:
    def identify(value: Any) -> str | None:
        return item_sequence("t-0", value)

    ids = {"4", "5", "6"}
    good = b'{"batchItemFailures":[{"itemIdentifier":{"partition":"t-0","offset":5}}]}'
    assert parse_batch_item_failures(good, ids, identify) == {"5"}
    missing = b'{"batchItemFailures":[{"itemIdentifier":{"partition":"t-0","offset":99}}]}'
    assert parse_batch_item_failures(missing, ids, identify) is None  # fails the whole batch
    assert parse_batch_item_failures(b"{}", ids, identify) == set()
    assert parse_batch_item_failures(b"null", ids, identify) == set()


def test_batch_info_of_an_on_failure_record() -> None:
    records = RecordEncoder().encode(
        [Raw("t", 0, 3, 1000, 0, None, b"a", []), Raw("t", 0, 4, 2500, 0, None, b"b", [])]
    )
    info = batch_info("b:9092", "kafka://b:9092/t", "t-0", records, 50)
    assert info == {
        "batchSize": 2,
        "eventSourceArn": "kafka://b:9092/t",
        "bootstrapServers": "b:9092",
        "payloadSize": 50 + records[0].size + records[1].size + 1,
        "recordsInfo": {
            "t-0": {
                "firstRecordOffset": "3",
                "lastRecordOffset": "4",
                "firstRecordTimestamp": "1970-01-01T00:00:01.000Z",
                "lastRecordTimestamp": "1970-01-01T00:00:02.500Z",
            }
        },
    }


# -- [kafka] ------------------------------------------------------------------------------


def _config(kafka: dict[str, Any], path: str = "/etc/poller/config.toml") -> Config:
    return parse_config({"kafka": kafka}, path)


def _error(kafka: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        _config(kafka)
    return str(info.value)


def test_kafka_config_checks_name_the_key() -> None:
    assert "kafka.security_protocol" in _error({"security_protocol": "TLS"})
    assert "kafka.sasl_mechanism" in _error(
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}
    )
    assert "needs sasl_username and sasl_password_env" in _error(
        {"security_protocol": "SASL_PLAINTEXT"}
    )
    assert "need security_protocol SASL_PLAINTEXT or SASL_SSL" in _error({"sasl_username": "u"})
    assert "ssl_* files need security_protocol SSL" in _error({"ssl_ca_file": "ca.pem"})
    assert "both ssl_cert_file and ssl_key_file" in _error(
        {"security_protocol": "SSL", "ssl_cert_file": "c.pem"}
    )
    assert "kafka.mappings.orders" in _error(
        {"mappings": {"orders": {"security_protocol": "SASL_SSL"}}}
    )
    assert "unknown key 'kafka.password'" in _error({"password": "x"})


def test_per_mapping_settings_override_the_defaults_and_files_are_resolved() -> None:
    config = _config(
        {
            "security_protocol": "SSL",
            "ssl_ca_file": "certs/ca.pem",
            "session_timeout_ms": 6000,
            "mappings": {
                "orders": {
                    "security_protocol": "SASL_SSL",
                    "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_username": "svc",
                    "sasl_password_env": "ORDERS_KAFKA_PASSWORD",
                }
            },
        }
    )
    assert config.kafka.ssl_ca_file == "/etc/poller/certs/ca.pem"
    orders = config.kafka.for_mapping("orders", "some-uuid")
    assert (orders.security_protocol, orders.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert orders.ssl_ca_file == "/etc/poller/certs/ca.pem" and orders.session_timeout_ms == 6000
    by_uuid = config.kafka.for_mapping(None, "orders")
    assert by_uuid.sasl_username == "svc"
    assert config.kafka.for_mapping("other").security_protocol == "SSL"


def test_client_options_read_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "svc",
            "sasl_password_env": "POLLER_TEST_KAFKA_PASSWORD",
            "ssl_ca_file": "/ca.pem",
        }
    )
    monkeypatch.delenv("POLLER_TEST_KAFKA_PASSWORD", raising=False)
    with pytest.raises(SourceError) as info:
        connection_options(config.kafka, ["b:9092"], "kafka://b:9092/t")
    assert "POLLER_TEST_KAFKA_PASSWORD" in str(info.value) and not info.value.retryable
    monkeypatch.setenv("POLLER_TEST_KAFKA_PASSWORD", "pw-123")
    options = connection_options(config.kafka, ["b:9092"], "kafka://b:9092/t")
    assert options == {
        "bootstrap_servers": ["b:9092"],
        "security_protocol": "SASL_SSL",
        "client_id": "poller",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw-123",
        "ssl_cafile": "/ca.pem",
        "ssl_certfile": None,
        "ssl_keyfile": None,
    }
    plain = connection_options(_config({}).kafka, ["b:9092"], "kafka://b:9092/t")
    assert plain["security_protocol"] == "PLAINTEXT" and "sasl_plain_password" not in plain
    assert consumer_timings(_config({}).kafka) == {
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
    }
    assert (
        consumer_timings(_config({"session_timeout_ms": 6000}).kafka)["heartbeat_interval_ms"]
        == 2000
    )


def test_settings_are_found_by_mapping_name() -> None:
    config = _config({"mappings": {"orders": {"client_id": "orders-consumer"}}})
    mapping = create_mapping(
        {
            "function_name": "f",
            "event_source_arn": "kafka://b:9092/t",
            "starting_position": "LATEST",
            "name": "orders",
        }
    )
    context = SourceContext(
        config=config, store=None, log=JsonLog(io.BytesIO()), mapping_uuid=mapping.uuid,
        mapping=mapping,
    )  # fmt: skip
    assert settings_for(context).client_id == "orders-consumer"


# -- mappings --------------------------------------------------------------------------------


def _kafka(**params: Any) -> Any:
    return create_mapping(
        {
            "function_name": "f",
            "event_source_arn": "kafka://b1:9092,b2:9092/orders",
            "starting_position": "TRIM_HORIZON",
            **params,
        }
    )


def test_msk_cluster_arns_are_refused_with_what_to_do() -> None:
    with pytest.raises(MappingError) as info:
        parse_event_source("arn:aws:kafka:us-east-1:123456789012:cluster/demo/abc")
    assert "bootstrap brokers as kafka://HOST:PORT" in str(info.value)


def test_several_topics_in_the_uri() -> None:
    spec = parse_event_source("kafka://b:9092/a,b")
    assert isinstance(spec, KafkaSpec) and spec.topics == ("a", "b") and spec.topic is None
    assert _kafka(event_source_arn="kafka://b:9092/a,b").topics == ["a", "b"]
    with pytest.raises(MappingError):
        parse_event_source("kafka://b:9092/a,a")


def test_destinations_of_kafka_mappings() -> None:
    on_cluster = {"OnFailure": {"Destination": "kafka://b9:9092/orders-dlq"}}
    assert _kafka(destination_config=on_cluster).on_failure_destination.endswith("orders-dlq")
    same = {"OnFailure": {"Destination": "kafka://b2:9092/orders"}}
    with pytest.raises(MappingError, match="must differ from the source topic"):
        _kafka(destination_config=same)
    other_cluster = {"OnFailure": {"Destination": "kafka://elsewhere:9092/orders"}}
    assert _kafka(destination_config=other_cluster).on_failure_destination
    two = {"OnFailure": {"Destination": "kafka://b9:9092/x,y"}}
    with pytest.raises(MappingError, match="exactly one topic"):
        _kafka(destination_config=two)


def test_parallelization_factor_applies_to_kafka() -> None:
    assert _kafka(parallelization_factor=4).parallelization_factor == 4
    with pytest.raises(MappingError, match="less than or equal to 10"):
        _kafka(parallelization_factor=11)


@pytest.mark.parametrize(
    ("retries", "destination", "expected"),
    [(-1, "file:///tmp/failures.jsonl", 10), (-1, None, -1), (3, "file:///tmp/f.jsonl", 3)],
)
def test_infinite_retries_with_a_destination_mean_ten(
    tmp_path: Path, retries: int, destination: str | None, expected: int
) -> None:
    """Lambda's rule for Kafka mappings (ESM_SEMANTICS.md §1.7, §5.3)."""
    params: dict[str, Any] = {"maximum_retry_attempts": retries}
    if destination:
        params["destination_config"] = {"OnFailure": {"Destination": destination}}
    mapping = _kafka(**params)
    services = Services(config=Config(), store=None, runtime=None, log=JsonLog(io.BytesIO()))  # type: ignore[arg-type]
    runner = build_stream_runner(mapping, mapping.source, None, services, lambda _: None)  # type: ignore[arg-type]
    assert runner.settings.max_retries == expected
    assert type(runner.ownership).__name__ == "KafkaOwnership"
