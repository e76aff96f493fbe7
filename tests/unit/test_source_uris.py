"""Source URIs and ARNs: each source module parses its own forms into its own spec."""

from __future__ import annotations

import pytest

from poller.mappings import MappingError, parse_event_source
from poller.sources.base import AwsDefaults
from poller.sources.kinds import accepted_forms, all_kinds
from poller.sources.redis_queue import OPTIONS as REDIS_QUEUE_OPTIONS

SQS_ARN = "arn:aws:sqs:eu-west-1:123456789012:orders"
SQS_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
FIFO_ARN = "arn:aws:sqs:eu-west-1:123456789012:orders.fifo"
KINESIS_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/clicks"
DDB_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-01-01T00:00:00.000"
KAFKA_URI = "kafka://broker1:9092,broker2:9093/payments"


def parse_error(uri: str) -> MappingError:
    with pytest.raises(MappingError) as info:
        parse_event_source(uri)
    return info.value


# --------------------------------------------------------------------------- local://


def test_local_queue() -> None:
    src = parse_event_source("local://my-queue_1.v2")
    assert (src.kind.name, src.queue_name, src.fifo) == ("local", "my-queue_1.v2", False)
    assert src.display_uri == "local://my-queue_1.v2"
    assert src.name == "my-queue_1.v2"
    assert src.kind.family == "queue"


def test_local_fifo_suffix() -> None:
    src = parse_event_source("local://orders.fifo")
    assert src.fifo is True


@pytest.mark.parametrize(
    "uri", ["local://", "local://has space", "local://a/b", "local://" + "x" * 81]
)
def test_local_bad_name(uri: str) -> None:
    err = parse_error(uri)
    assert "Invalid local queue name" in err.message
    assert err.code == "InvalidParameterValueException"
    assert err.parameter == "EventSourceArn"


# --------------------------------------------------------------------------- SQS


def test_sqs_arn() -> None:
    src = parse_event_source(SQS_ARN)
    assert src.kind.name == "sqs"
    assert (src.region, src.account, src.queue_name) == ("eu-west-1", "123456789012", "orders")
    assert src.arn == SQS_ARN and src.display_uri == SQS_ARN
    assert src.queue_url is None
    assert src.fifo is False


def test_sqs_fifo_arn() -> None:
    assert parse_event_source(FIFO_ARN).fifo is True


def test_sqs_aws_queue_url_gives_region_and_arn() -> None:
    src = parse_event_source(SQS_URL)
    assert src.kind.name == "sqs"
    assert src.queue_url == SQS_URL
    assert (src.region, src.account, src.queue_name) == ("eu-west-1", "123456789012", "orders")
    assert src.arn == SQS_ARN


def test_sqs_legacy_queue_url() -> None:
    src = parse_event_source("https://ap-southeast-2.queue.amazonaws.com/123456789012/q")
    assert src.region == "ap-southeast-2"


def test_sqs_moto_endpoint_url_uses_default_region() -> None:
    url = "http://localhost:5000/123456789012/work-q"
    src = parse_event_source(url, AwsDefaults(region="eu-central-1"))
    assert src.queue_url == url
    assert src.region == "eu-central-1"
    assert src.arn == "arn:aws:sqs:eu-central-1:123456789012:work-q"


def test_sqs_localstack_url_carries_region() -> None:
    src = parse_event_source("http://sqs.eu-west-2.localhost.localstack.cloud:4566/000000000000/q")
    assert src.region == "eu-west-2"
    assert src.arn == "arn:aws:sqs:eu-west-2:000000000000:q"


def test_sqs_scheme_uses_defaults() -> None:
    src = parse_event_source("sqs://jobs.fifo", AwsDefaults("us-west-2", "999999999999"))
    assert src.arn == "arn:aws:sqs:us-west-2:999999999999:jobs.fifo"
    assert src.fifo is True
    assert src.queue_url is None
    assert parse_event_source("sqs://jobs").arn == "arn:aws:sqs:us-east-1:000000000000:jobs"


@pytest.mark.parametrize(
    "uri",
    [
        "arn:aws:sqs:us-east-1:123:q",  # account must be 12 digits
        "arn:aws:sqs:us-east-1:123456789012:",
        "sqs://bad.name",  # dots only in the .fifo suffix
        "sqs://" + "q" * 81,
        "http://localhost:5000/q",  # no account segment
        "http://localhost:5000/123456789012/q/extra",
        "http://localhost:notaport/123456789012/q",
        "http://localhost:5000/123456789012/q?x=1",
    ],
)
def test_sqs_malformed(uri: str) -> None:
    err = parse_error(uri)
    # A known form with a bad part gets a specific message, not "Unrecognized".
    assert err.message != "Unrecognized event source."
    assert "SQS" in err.message


def test_queue_url_and_arn_are_the_same_queue() -> None:
    assert parse_event_source(SQS_URL).identity == parse_event_source(SQS_ARN).identity


# --------------------------------------------------------------------------- redis-queue://


def test_redis_queue_full_uri() -> None:
    uri = (
        "redis-queue://alice:p%40ss@redis.local:6380/3/orders:in"
        "?group=workers&visibility_timeout=90&max_receive_count=5&dead_letter=orders:dlq"
        "&tls=true&start=$&delete_on_ack=true"
    )
    src = parse_event_source(uri)
    assert src.kind.name == "redis-queue"
    assert (src.address.host, src.address.port, src.address.db) == ("redis.local", 6380, 3)
    assert (src.address.username, src.address.password) == ("alice", "p@ss")
    assert src.stream_key == "orders:in"
    assert src.options == {
        "group": "workers",
        "visibility_timeout": 90,
        "max_receive_count": 5,
        "dead_letter": "orders:dlq",
        "tls": True,
        "start": "$",
        "delete_on_ack": True,
    }
    assert src.options["tls"] is True
    assert src.uri == uri


def test_redis_queue_defaults() -> None:
    src = parse_event_source("redis-queue://localhost/jobs")
    assert (src.address.host, src.address.port, src.address.db, src.stream_key) == (
        "localhost",
        6379,
        0,
        "jobs",
    )
    assert src.address.username is None and src.address.password is None
    assert src.options == {name: o.default for name, o in REDIS_QUEUE_OPTIONS.items()}
    assert src.options["group"] is None  # the source uses the mapping UUID
    assert src.options["visibility_timeout"] == 30
    assert src.options["start"] == "$"  # LATEST
    assert src.options["tls"] is False


def test_redis_queue_display_uri_strips_credentials() -> None:
    src = parse_event_source("redis-queue://alice:s3cret@redis.local:6380/2/jobs?group=g")
    assert src.display_uri == "redis-queue://redis.local:6380/2/jobs?group=g"
    assert "s3cret" not in src.display_uri and "alice" not in src.display_uri
    # The password must not leak through logging the dataclass either.
    assert "s3cret" not in repr(src)


@pytest.mark.parametrize(
    "uri",
    [
        "redis-queue://u:pa/hunter2@h/k",
        "redis-queue://u:hunter2@h:notaport/k",
        "redis-queue://u:x@hunter2@h:bad/k",
    ],
)
def test_redis_queue_bad_authority_never_shows_password(uri: str) -> None:
    err = parse_error(uri)
    assert "hunter2" not in str(err)


def test_redis_queue_password_only() -> None:
    src = parse_event_source("redis-queue://:topsecret@h/k")
    assert src.address.username is None
    assert src.address.password == "topsecret"
    assert src.display_uri == "redis-queue://h/k"


@pytest.mark.parametrize(
    ("path", "db", "key"),
    [
        ("/jobs", 0, "jobs"),
        ("/5/jobs", 5, "jobs"),
        ("/5", 0, "5"),  # a lone number is the key, not a DB
        ("/a/b", 0, "a/b"),  # keys may contain '/'
        ("/1/a/b", 1, "a/b"),
        ("/q%20x", 0, "q x"),
    ],
)
def test_redis_queue_db_and_key(path: str, db: int, key: str) -> None:
    src = parse_event_source(f"redis-queue://h{path}")
    assert (src.address.db, src.stream_key) == (db, key)


def test_redis_queue_ipv6_host() -> None:
    src = parse_event_source("redis-queue://[::1]:7000/k")
    assert (src.address.host, src.address.port) == ("::1", 7000)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("bogus=1", "'bogus'"),
        ("visibility_timeout=abc", "visibility_timeout"),
        ("visibility_timeout=-1", "visibility_timeout"),
        ("visibility_timeout=43201", "visibility_timeout"),
        ("max_receive_count=0&dead_letter=d", "max_receive_count"),
        ("tls=maybe", "tls"),
        ("start=5", "start"),
        ("group=", "group"),
        ("group=a&group=b", "given twice"),
        ("dead_letter=dlq", "max_receive_count"),
        ("max_receive_count=3&dead_letter=jobs", "differ"),
    ],
)
def test_redis_queue_bad_options(query: str, needle: str) -> None:
    err = parse_error(f"redis-queue://u:hunter2@h/jobs?{query}")
    assert needle in err.message
    assert "hunter2" not in str(err)


def test_redis_queue_max_receive_count_alone_uses_default_dead_letter() -> None:
    src = parse_event_source("redis-queue://h/jobs?max_receive_count=3")
    assert src.options["max_receive_count"] == 3
    assert src.options["dead_letter"] is None  # the source derives STREAM_KEY:dlq


def test_local_queue_options() -> None:
    src = parse_event_source("local://orders")
    assert src.options == {"visibility_timeout": 30, "max_receive_count": 5, "dead_letter": None}
    src = parse_event_source(
        "local://orders?visibility_timeout=2&max_receive_count=0&dead_letter=local://bin"
    )
    assert src.queue_name == "orders"
    assert src.display_uri == "local://orders"
    assert src.options == {"visibility_timeout": 2, "max_receive_count": 0, "dead_letter": "bin"}
    for bad, needle in [
        ("colour=red", "colour"),
        ("visibility_timeout=x", "visibility_timeout"),
        ("dead_letter=orders", "dead_letter"),
        ("max_receive_count=1001", "max_receive_count"),
    ]:
        assert needle in parse_error(f"local://orders?{bad}").message


def test_redis_queue_unknown_option_lists_valid_ones() -> None:
    err = parse_error("redis-queue://h/k?colour=red")
    assert "'colour'" in err.message
    for name in REDIS_QUEUE_OPTIONS:
        assert name in err.message


@pytest.mark.parametrize(
    "uri",
    ["redis-queue://h", "redis-queue://h/", "redis-queue:///k", "redis-queue://h:99999/k"],
)
def test_redis_queue_malformed(uri: str) -> None:
    err = parse_error(uri)
    assert err.message != "Unrecognized event source."


# --------------------------------------------------------------------------- Kinesis / DynamoDB


def test_kinesis_stream() -> None:
    src = parse_event_source(KINESIS_ARN)
    assert src.kind.name == "kinesis"
    assert (src.region, src.account, src.stream_name) == ("us-east-1", "123456789012", "clicks")
    assert src.uri == src.stream_arn == src.display_uri == KINESIS_ARN
    assert src.consumer_name is None
    assert src.kind.family == "stream"


def test_kinesis_consumer() -> None:
    arn = KINESIS_ARN + "/consumer/fanout:1525898737"
    src = parse_event_source(arn)
    assert src.uri == arn
    assert src.stream_arn == KINESIS_ARN
    assert (src.stream_name, src.consumer_name) == ("clicks", "fanout")


def test_dynamodb_stream() -> None:
    src = parse_event_source(DDB_ARN)
    assert src.kind.name == "dynamodb"
    assert (src.table_name, src.stream_label) == ("Orders", "2024-01-01T00:00:00.000")
    assert (src.region, src.account) == ("us-east-1", "123456789012")
    assert src.display_uri == DDB_ARN


def test_kinesis_by_name_takes_region_and_account_from_the_config() -> None:
    src = parse_event_source("kinesis://clicks", AwsDefaults("eu-west-1", "123456789012"))
    assert (src.kind.name, src.stream_name, src.by_name) == ("kinesis", "clicks", True)
    assert (
        src.display_uri == src.stream_arn == "arn:aws:kinesis:eu-west-1:123456789012:stream/clicks"
    )
    assert src.identity == parse_event_source(src.stream_arn).identity
    assert src.unsupported is None


def test_a_kinesis_consumer_is_a_source_of_its_own_and_not_supported_yet() -> None:
    consumer = parse_event_source(KINESIS_ARN + "/consumer/fanout:1525898737")
    assert consumer.identity != parse_event_source(KINESIS_ARN).identity
    assert consumer.unsupported is not None and "not supported yet" in consumer.unsupported


def test_dynamodb_table() -> None:
    src = parse_event_source("dynamodb://Orders", AwsDefaults("eu-west-1", "123456789012"))
    assert (src.kind.name, src.table_name, src.stream_label) == ("dynamodb", "Orders", None)
    assert src.display_uri == "dynamodb://Orders" and src.stream_arn is None
    # The table's current stream is the same source as its ARN.
    same = parse_event_source(DDB_ARN.replace("us-east-1", "eu-west-1"))
    assert src.identity == same.identity and same.stream_arn == same.uri


@pytest.mark.parametrize(
    "uri",
    [
        "kinesis://",
        "kinesis://has space",
        "kinesis://a/b",
        "dynamodb://ab",  # table names are 3-255 characters
        "dynamodb://a/b",
    ],
)
def test_stream_names_malformed(uri: str) -> None:
    err = parse_error(uri)
    assert err.message.startswith("Invalid ")


@pytest.mark.parametrize(
    "uri",
    [
        "arn:aws:kinesis:us-east-1:123456789012:stream/",
        "arn:aws:kinesis:us-east-1:123456789012:table/x",
        "arn:aws:dynamodb:us-east-1:123456789012:table/Orders",  # a table, not its stream
    ],
)
def test_stream_arn_malformed(uri: str) -> None:
    err = parse_error(uri)
    assert err.message.startswith("Invalid ")


# --------------------------------------------------------------------------- Kafka


def test_kafka_uri() -> None:
    src = parse_event_source(KAFKA_URI)
    assert src.kind.name == "kafka"
    assert src.bootstrap_servers == ("broker1:9092", "broker2:9093")
    assert src.topic == "payments"
    assert src.display_uri == KAFKA_URI


def test_kafka_default_port_ipv6_and_no_topic() -> None:
    src = parse_event_source("kafka://b1,[::1]:9094")
    assert src.bootstrap_servers == ("b1:9092", "[::1]:9094")
    assert src.topic is None


@pytest.mark.parametrize(
    "uri", ["kafka:///t", "kafka://b1:0/t", "kafka://b1:9092/bad topic", "kafka://b:1/t?x=1"]
)
def test_kafka_malformed(uri: str) -> None:
    assert parse_error(uri).message != "Unrecognized event source."


# --------------------------------------------------------------------------- unrecognized


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "queue",
        "arn:aws:sns:us-east-1:123456789012:topic",
        "ftp://h/123456789012/q",
        "redis://h/k",
    ],
)
def test_unrecognized_source(uri: str) -> None:
    err = parse_error(uri)
    assert err.message == "Unrecognized event source."
    assert err.code == "InvalidParameterValueException"
    assert str(err).startswith("Unrecognized event source. ")
    # The hint lists exactly the forms this version can run.
    assert str(err).endswith(f"accepted forms: {'; '.join(accepted_forms())}.")
    for form in ("local://NAME", "arn:aws:sqs:", "redis-queue://"):
        assert form in str(err)
    for kind in all_kinds():
        if not kind.runnable:
            assert kind.forms[0] not in str(err)


def test_unrecognized_source_hides_password() -> None:
    err = parse_error("redis://bob:hunter2@h/k")
    assert "hunter2" not in str(err)
    assert "redis://bob:***@h/k" in str(err)
