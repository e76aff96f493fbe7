"""Unit tests for poller.engine.filtering (ESM_SEMANTICS.md §11, §1.7)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from poller.engine.filter_compiler import compile_filter_criteria
from poller.engine.filtering import (
    ERROR_MESSAGE,
    FilterError,
    RecordFilter,
    decode_base64_json,
    decode_json_text,
)


def compile_patterns(*patterns: Any, **kwargs: Any) -> RecordFilter:
    sources = [p if isinstance(p, str) else msgspec.json.encode(p).decode() for p in patterns]
    result = compile_filter_criteria({"Filters": [{"Pattern": s} for s in sources]}, **kwargs)
    assert result is not None
    return result


def matches(pattern: Any, record: dict[str, Any]) -> bool:
    return compile_patterns(pattern).matches(record)


def sqs_record(body: str, **attributes: str) -> dict[str, Any]:
    return {
        "messageId": "059f36b4-87a3-44ab-83d2-661975830a7d",
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1", **attributes},
        "messageAttributes": {},
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue",
        "awsRegion": "us-east-2",
    }


def assert_invalid(criteria: Any, detail_contains: str = "", **kwargs: Any) -> FilterError:
    with pytest.raises(FilterError) as info:
        compile_filter_criteria(criteria, **kwargs)
    message = str(info.value)
    assert message == ERROR_MESSAGE or message.startswith(ERROR_MESSAGE + " ")
    assert detail_contains in message
    assert isinstance(info.value, ValueError)
    return info.value


def criteria_of(*sources: Any) -> dict[str, Any]:
    return {"Filters": [{"Pattern": s} for s in sources]}


# --- compile_filter_criteria: empty input ------------------------------------------


@pytest.mark.parametrize("criteria", [None, {}, {"Filters": []}, {"Filters": None}])
def test_no_criteria_means_no_filter(criteria: Any) -> None:
    assert compile_filter_criteria(criteria) is None


def test_compiled_filter_keeps_sources_and_count() -> None:
    f = compile_patterns({"a": ["x"]}, {"b": ["y"]})
    assert len(f) == 2
    assert f.sources == ('{"a":["x"]}', '{"b":["y"]}')


# --- validation (§1.7) --------------------------------------------------------------


def test_error_message_is_exact_without_detail() -> None:
    assert str(FilterError()) == "Invalid filter pattern definition."
    assert str(FilterError("d")) == "Invalid filter pattern definition. d"
    assert FilterError("d").detail == "d"


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        ("null", "Pattern 1: the pattern must be a JSON object"),
        ('"aws:sqs"', "Pattern 1: the pattern must be a JSON object"),
        ('{"eventSource":"aws:sqs"}', 'at key "eventSource"'),
        ('{"eventSource":[]}', 'empty arrays are not allowed at key "eventSource"'),
        ('{"body":{"a":[]}}', 'at key "body.a"'),
        ('{"eventSource":5}', "object or a non-empty array"),
        ('{"eventSource":null}', "object or a non-empty array"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "empty objects"),
        ('{"a":{}}', 'empty objects are not allowed at key "a"'),
        ("not json", "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_invalid_patterns_from_spec(pattern: str, detail: str) -> None:
    assert_invalid(criteria_of(pattern), detail)


def test_error_names_the_failing_pattern_number() -> None:
    err = assert_invalid(criteria_of('{"a":["x"]}', '{"price":[{"numeric":[">"]}]}'))
    assert str(err) == (
        'Invalid filter pattern definition. Pattern 2: "numeric" needs an operator '
        'and a number at key "price"'
    )


def test_pattern_must_be_a_string() -> None:
    assert_invalid({"Filters": [{"Pattern": None}]}, "Pattern 1: must be a JSON string")
    assert_invalid({"Filters": [{"Pattern": {"a": ["x"]}}]}, "must be a JSON string")
    assert_invalid({"Filters": [{}]}, "must be a JSON string")


@pytest.mark.parametrize(
    "criteria",
    [
        "nope",
        {"Filters": "x"},
        {"Filters": {"Pattern": "{}"}},
        {"filters": [{"Pattern": '{"a":["x"]}'}]},
        {"Filters": ['{"a":["x"]}']},
        {"Filters": [{"Pattern": '{"a":["x"]}', "Extra": 1}]},
    ],
)
def test_malformed_criteria(criteria: Any) -> None:
    assert_invalid(criteria)


def test_five_filter_limit() -> None:
    five = criteria_of(*[f'{{"k":["{i}"]}}' for i in range(5)])
    f = compile_filter_criteria(five)
    assert f is not None and len(f) == 5
    six = criteria_of(*[f'{{"k":["{i}"]}}' for i in range(6)])
    assert_invalid(six, "at most 5 filters")
    # A raised quota allows up to 10.
    raised = compile_filter_criteria(six, max_filters=10)
    assert raised is not None and len(raised) == 6


def test_4096_character_limit() -> None:
    prefix = '{"k":["'
    suffix = '"]}'
    exactly = prefix + "x" * (4096 - len(prefix) - len(suffix)) + suffix
    assert len(exactly) == 4096
    assert compile_filter_criteria(criteria_of(exactly)) is not None
    too_long = prefix + "x" * (4097 - len(prefix) - len(suffix)) + suffix
    assert_invalid(criteria_of(too_long), "longer than 4096")


@pytest.mark.parametrize(
    ("leaf", "detail"),
    [
        ([{"wildcard": "a*b"}], 'unsupported operator "wildcard"'),
        ([{"cidr": "10.0.0.0/24"}], 'unsupported operator "cidr"'),
        ([{"anything-but": {"prefix": "x"}}], '"anything-but" with "prefix"'),
        ([{"anything-but": {"suffix": "x"}}], '"anything-but" with "suffix"'),
        ([{"anything-but": {"equals-ignore-case": "x"}}], '"anything-but" with "equals'),
        ([{"prefix": {"equals-ignore-case": "x"}}], '"prefix" with "equals-ignore-case"'),
        ([{"frobnicate": 1}], 'unknown operator "frobnicate"'),
        ([{"prefix": "a", "suffix": "b"}], "exactly one key"),
        ([{}], "exactly one key"),
        ([["nested"]], "match values must be"),
        ([{"prefix": 5}], '"prefix" needs a string'),
        ([{"suffix": None}], '"suffix" needs a string'),
        ([{"equals-ignore-case": 1}], '"equals-ignore-case" needs a string'),
        ([{"exists": "true"}], '"exists" must be true or false'),
        ([{"exists": 1}], '"exists" must be true or false'),
        ([{"anything-but": []}], "non-empty"),
        ([{"anything-but": ["a", 1]}], "not both"),
        ([{"anything-but": [None]}], "strings or numbers"),
        ([{"anything-but": True}], "strings or numbers"),
        ([{"numeric": 5}], '"numeric" needs an operator and a number'),
        ([{"numeric": [">"]}], '"numeric" needs an operator and a number'),
        ([{"numeric": [">", "5"]}], '"numeric" needs an operator and a number'),
        ([{"numeric": [">", True]}], '"numeric" needs an operator and a number'),
        ([{"numeric": ["!=", 5]}], 'unknown "numeric" operator "!="'),
        ([{"numeric": ["=", 5, "<", 6]}], '"=" takes a single number'),
        ([{"numeric": ["<", 5, ">", 1]}], 'start with ">" or ">="'),
        ([{"numeric": [">", 5, ">", 9]}], "upper bound needs"),
        ([{"numeric": [">", 5, "<", "9"]}], "upper bound needs"),
        ([{"numeric": [">", 5, ["<"], 9]}], "upper bound needs"),
        ([{"numeric": [">", 9, "<", 5]}], "lower bound must be below"),
        ([{"numeric": [">", 1, "<", 2, "<", 3]}], '"numeric" needs an operator'),
        ([{"numeric": [">", 1e999]}], '"numeric" needs an operator and a number'),
    ],
)
def test_invalid_operators(leaf: list[Any], detail: str) -> None:
    pattern = msgspec.json.encode({"detail": {"field": leaf}}).decode()
    err = assert_invalid(criteria_of(pattern), detail)
    assert 'at key "detail.field"' in str(err)
    assert str(err).startswith(ERROR_MESSAGE + " Pattern 1: ")


@pytest.mark.parametrize(
    ("or_value", "detail"),
    [
        ([{"a": ["x"]}], "at least 2 objects"),
        ([], "at least 2 objects"),
        ({"a": ["x"]}, "at least 2 objects"),
        ([{"a": ["x"]}, ["b"]], "only objects"),
        ([{"a": ["x"]}, {}], "empty objects"),
        ([{"a": ["x"]}, {"b": "y"}], 'at key "b"'),
    ],
)
def test_invalid_or(or_value: Any, detail: str) -> None:
    assert_invalid(criteria_of(msgspec.json.encode({"$or": or_value}).decode()), detail)


def test_json_data_key_rejects_plain_pattern() -> None:
    assert_invalid(
        criteria_of('{"data":["plain"]}'),
        '"data" must be a JSON object pattern',
        json_data_key="data",
    )
    assert_invalid(
        criteria_of('{"$or":[{"data":["plain"]},{"partitionKey":["1"]}]}'),
        '"data"',
        json_data_key="data",
    )
    assert compile_filter_criteria(criteria_of('{"data":{"a":["1"]}}'), json_data_key="data")


# --- operators --------------------------------------------------------------------


def test_equals_strings() -> None:
    p = {"Name": ["Alice"]}
    assert matches(p, {"Name": "Alice"})
    assert not matches(p, {"Name": "alice"})
    assert not matches(p, {"Name": "Alice "})
    assert not matches(p, {"Other": "Alice"})


def test_null_and_empty() -> None:
    assert matches({"UserID": [None]}, {"UserID": None})
    assert not matches({"UserID": [None]}, {"UserID": ""})
    assert not matches({"UserID": [None]}, {})
    assert matches({"LastName": [""]}, {"LastName": ""})
    assert not matches({"LastName": [""]}, {"LastName": None})
    assert not matches({"LastName": [""]}, {})


def test_or_values() -> None:
    p = {"PaymentType": ["Credit", "Debit"]}
    assert matches(p, {"PaymentType": "Credit"})
    assert matches(p, {"PaymentType": "Debit"})
    assert not matches(p, {"PaymentType": "Cash"})


def test_and_fields() -> None:
    p = {"Location": ["New York"], "Day": ["Monday"]}
    assert matches(p, {"Location": "New York", "Day": "Monday"})
    assert not matches(p, {"Location": "New York", "Day": "Tuesday"})
    assert not matches(p, {"Location": "New York"})


def test_equals_ignore_case() -> None:
    p = {"Name": [{"equals-ignore-case": "alice"}]}
    assert matches(p, {"Name": "ALICE"})
    assert matches(p, {"Name": "aLiCe"})
    assert not matches(p, {"Name": "alicia"})
    assert not matches(p, {"Name": 1})


def test_numbers_compare_by_representation() -> None:
    assert matches({"n": [300]}, {"n": 300})
    assert not matches({"n": [300]}, {"n": 300.0})
    assert not matches({"n": [300.0]}, {"n": 300})
    assert matches({"n": [300.0]}, {"n": 300.0})
    assert not matches({"n": [300]}, {"n": "300"})
    assert not matches({"n": ["300"]}, {"n": 300})
    # Python's True == 1 must not leak into matching.
    assert not matches({"n": [1]}, {"n": True})
    assert not matches({"n": [True]}, {"n": 1})
    assert matches({"n": [True]}, {"n": True})
    assert not matches({"n": [False]}, {"n": True})


def test_numbers_by_representation_through_json_decoding() -> None:
    f = compile_patterns('{"body":{"price":[300]}}')
    assert f.matches_sqs(sqs_record('{"price": 300}'))
    assert not f.matches_sqs(sqs_record('{"price": 300.0}'))
    assert not f.matches_sqs(sqs_record('{"price": 3.0e2}'))


def test_anything_but_strings() -> None:
    p = {"Weather": [{"anything-but": ["Raining", "Snowing"]}]}
    assert matches(p, {"Weather": "Sunny"})
    assert not matches(p, {"Weather": "Raining"})
    assert not matches(p, {"Weather": "Snowing"})
    # The key must be present.
    assert not matches(p, {})
    # Other types are "anything but" these strings.
    assert matches(p, {"Weather": 5})
    assert matches(p, {"Weather": None})


def test_anything_but_single_value() -> None:
    assert not matches({"s": [{"anything-but": "x"}]}, {"s": "x"})
    assert matches({"s": [{"anything-but": "x"}]}, {"s": "y"})
    assert not matches({"n": [{"anything-but": 5}]}, {"n": 5})
    assert matches({"n": [{"anything-but": 5}]}, {"n": 6})


def test_anything_but_numbers_compare_numerically() -> None:
    p = {"n": [{"anything-but": [100, 200]}]}
    assert not matches(p, {"n": 100})
    assert not matches(p, {"n": 100.0})
    assert matches(p, {"n": 150})
    assert matches(p, {"n": "100"})
    assert matches({"n": [{"anything-but": [1]}]}, {"n": True})


def test_anything_but_array_needs_one_other_element() -> None:
    p = {"tags": [{"anything-but": ["a"]}]}
    assert matches(p, {"tags": ["a", "b"]})
    assert not matches(p, {"tags": ["a", "a"]})
    assert not matches(p, {"tags": []})


def test_numeric_equals() -> None:
    p = {"Price": [{"numeric": ["=", 100]}]}
    assert matches(p, {"Price": 100})
    assert matches(p, {"Price": 100.0})
    assert not matches(p, {"Price": 100.5})
    assert not matches(p, {"Price": "100"})
    assert not matches(p, {"Price": True})


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        ([">", 10], [10.001, 11, 1e9], [10, 9, -1]),
        ([">=", 10], [10, 10.0, 11], [9.999, -10]),
        (["<", 10], [9, 9.99, -1e9], [10, 11]),
        (["<=", 10], [10, 9, -5], [10.01, 11]),
        ([">", 10, "<=", 20], [10.5, 15, 20], [10, 20.5, 25, 0]),
        ([">=", 10, "<", 20], [10, 19.99], [9, 20]),
        ([">", -1.5, "<", 0], [-1, -0.5], [-1.5, 0, 1]),
    ],
)
def test_numeric_ranges(spec: list[Any], inside: list[float], outside: list[float]) -> None:
    f = compile_patterns({"Price": [{"numeric": spec}]})
    for value in inside:
        assert f.matches({"Price": value}), value
    for value in outside:
        assert not f.matches({"Price": value}), value
    assert not f.matches({"Price": str(inside[0])})
    assert not f.matches({})


def test_numeric_or_within_one_field() -> None:
    p = {"n": [{"numeric": ["<", 0]}, {"numeric": [">", 100]}, 50]}
    assert matches(p, {"n": -1})
    assert matches(p, {"n": 101})
    assert matches(p, {"n": 50})
    assert not matches(p, {"n": 51})


def test_exists_true() -> None:
    p = {"ProductName": [{"exists": True}]}
    assert matches(p, {"ProductName": "x"})
    assert matches(p, {"ProductName": ""})
    assert matches(p, {"ProductName": None})
    assert matches(p, {"ProductName": 0})
    assert matches(p, {"ProductName": ["x"]})
    assert not matches(p, {})
    assert not matches(p, {"ProductName": []})


def test_exists_false() -> None:
    p = {"ProductName": [{"exists": False}]}
    assert matches(p, {})
    assert matches(p, {"Other": 1})
    assert not matches(p, {"ProductName": "x"})
    assert not matches(p, {"ProductName": None})
    assert not matches(p, {"ProductName": ["x"]})
    assert matches(p, {"ProductName": []})


def test_exists_only_on_leaf_nodes() -> None:
    record = {"person": {"address": {"street": "Main St"}}}
    assert not matches({"person": {"address": [{"exists": True}]}}, record)
    assert matches({"person": {"address": [{"exists": False}]}}, record)
    assert matches({"person": {"address": {"street": [{"exists": True}]}}}, record)
    # An array of objects holds no leaf either.
    objects = {"person": {"address": [{"street": "Main St"}]}}
    assert not matches({"person": {"address": [{"exists": True}]}}, objects)


def test_exists_false_under_missing_parent() -> None:
    p = {"a": {"b": [{"exists": False}]}}
    assert matches(p, {})
    assert matches(p, {"a": "scalar"})
    assert matches(p, {"a": {"c": 1}})
    assert not matches(p, {"a": {"b": 1}})
    assert not matches(p, {"a": [{"b": 1}]})


def test_prefix_and_suffix() -> None:
    assert matches({"Region": [{"prefix": "us-"}]}, {"Region": "us-east-1"})
    assert not matches({"Region": [{"prefix": "us-"}]}, {"Region": "eu-west-1"})
    assert not matches({"Region": [{"prefix": "us-"}]}, {"Region": "US-east-1"})
    assert not matches({"Region": [{"prefix": "1"}]}, {"Region": 123})
    assert matches({"FileName": [{"suffix": ".png"}]}, {"FileName": "cat.png"})
    assert not matches({"FileName": [{"suffix": ".png"}]}, {"FileName": "cat.png.jpg"})
    several = {"f": [{"prefix": "a"}, {"prefix": "b"}, {"suffix": "z"}]}
    assert matches(several, {"f": "bx"})
    assert matches(several, {"f": "xz"})
    assert not matches(several, {"f": "cx"})


def test_mixed_values_and_operators_in_one_leaf() -> None:
    p = {"s": ["exact", {"prefix": "pre"}, {"equals-ignore-case": "CaSe"}, None]}
    assert matches(p, {"s": "exact"})
    assert matches(p, {"s": "prefixed"})
    assert matches(p, {"s": "CASE"})
    assert matches(p, {"s": None})
    assert not matches(p, {"s": "other"})


# --- structure: nesting, arrays, OR --------------------------------------------------


def test_nested_objects_descend() -> None:
    p = {"detail": {"state": ["running"], "meta": {"zone": [{"prefix": "us-"}]}}}
    assert matches(p, {"detail": {"state": "running", "meta": {"zone": "us-1"}}})
    assert not matches(p, {"detail": {"state": "running", "meta": {"zone": "eu-1"}}})
    assert not matches(p, {"detail": {"state": "running"}})
    assert not matches(p, {"detail": "running"})
    assert not matches(p, {"state": "running", "meta": {"zone": "us-1"}})


def test_record_arrays_match_any_element() -> None:
    p = {"colors": ["red"]}
    assert matches(p, {"colors": ["blue", "red"]})
    assert not matches(p, {"colors": ["blue", "green"]})
    assert not matches(p, {"colors": []})
    assert matches(p, {"colors": [["blue"], ["red"]]})
    assert matches({"n": [{"numeric": [">", 5]}]}, {"n": [1, 2, 9]})


def test_array_of_objects_matches_one_element_as_a_whole() -> None:
    p = {"items": {"sku": ["A"], "qty": [{"numeric": [">", 1]}]}}
    assert matches(p, {"items": [{"sku": "B", "qty": 5}, {"sku": "A", "qty": 2}]})
    # sku from one element and qty from another is not a match.
    assert not matches(p, {"items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 5}]})
    assert not matches(p, {"items": []})


def test_filters_are_ored() -> None:
    f = compile_patterns({"a": ["1"]}, {"b": ["2"]})
    assert f.matches({"a": "1"})
    assert f.matches({"b": "2"})
    assert f.matches({"a": "1", "b": "2"})
    assert not f.matches({"a": "2", "b": "1"})


def test_dollar_or_top_level() -> None:
    p = {"$or": [{"Location": ["New York"]}, {"Day": ["Monday"]}]}
    assert matches(p, {"Location": "New York", "Day": "Sunday"})
    assert matches(p, {"Location": "Paris", "Day": "Monday"})
    assert not matches(p, {"Location": "Paris", "Day": "Sunday"})


def test_dollar_or_anded_with_siblings_and_nested() -> None:
    p = {
        "source": ["aws.cloudwatch"],
        "detail": {
            "$or": [
                {"c-count": [{"numeric": [">", 0, "<=", 5]}]},
                {"d-count": [{"numeric": ["<", 10]}]},
                {"metricType": ["MetricType"], "namespace": ["AWS/EC2"]},
            ]
        },
    }
    ok = {"source": "aws.cloudwatch", "detail": {"c-count": 3}}
    assert matches(p, ok)
    assert matches(p, {"source": "aws.cloudwatch", "detail": {"d-count": 1}})
    both = {"metricType": "MetricType", "namespace": "AWS/EC2"}
    assert matches(p, {"source": "aws.cloudwatch", "detail": both})
    assert not matches(p, {"source": "aws.cloudwatch", "detail": {"metricType": "MetricType"}})
    assert not matches(p, {"source": "other", "detail": {"c-count": 3}})
    assert not matches(p, {"source": "aws.cloudwatch", "detail": {"c-count": 6}})


def test_nested_dollar_or_inside_or() -> None:
    p = {"$or": [{"a": ["1"]}, {"$or": [{"b": ["2"]}, {"c": ["3"]}]}]}
    assert matches(p, {"c": "3"})
    assert matches(p, {"a": "1"})
    assert not matches(p, {"d": "4"})


def test_duplicate_keys_last_wins() -> None:
    f = compile_patterns('{"a":["first"],"a":["second"]}')
    assert f.matches({"a": "second"})
    assert not f.matches({"a": "first"})


# --- SQS body (§11.4) ---------------------------------------------------------------

JSON_BODY = '{"RequestCode": "BBBB", "Data": {"Kind": "order"}}'
PLAIN_BODY = "RequestCode BBBB"


@pytest.mark.parametrize(
    ("body", "pattern", "expected"),
    [
        # plain string body, plain string pattern: filter
        (PLAIN_BODY, {"body": ["RequestCode BBBB"]}, True),
        (PLAIN_BODY, {"body": ["other"]}, False),
        (PLAIN_BODY, {"body": [{"prefix": "RequestCode"}]}, True),
        # plain string body, no body pattern: metadata only
        (PLAIN_BODY, {"attributes": {"ApproximateReceiveCount": ["1"]}}, True),
        (PLAIN_BODY, {"attributes": {"ApproximateReceiveCount": ["2"]}}, False),
        # plain string body, JSON pattern: drop
        (PLAIN_BODY, {"body": {"RequestCode": ["BBBB"]}}, False),
        (PLAIN_BODY, {"body": {"RequestCode": [{"exists": False}]}}, False),
        # JSON body, plain string pattern: drop (even if the text would match)
        (JSON_BODY, {"body": [JSON_BODY]}, False),
        (JSON_BODY, {"body": [{"prefix": "{"}]}, False),
        (JSON_BODY, {"body": [{"exists": True}]}, False),
        # JSON body, no body pattern: metadata only
        (JSON_BODY, {"eventSource": ["aws:sqs"]}, True),
        (JSON_BODY, {"eventSource": ["aws:kinesis"]}, False),
        # JSON body, JSON pattern: filter
        (JSON_BODY, {"body": {"RequestCode": ["BBBB"]}}, True),
        (JSON_BODY, {"body": {"RequestCode": ["AAAA"]}}, False),
        (JSON_BODY, {"body": {"Data": {"Kind": ["order"]}}}, True),
        (JSON_BODY, {"body": {"Missing": [{"exists": False}]}}, True),
    ],
)
def test_sqs_body_rules(body: str, pattern: dict[str, Any], expected: bool) -> None:
    assert compile_patterns(pattern).matches_sqs(sqs_record(body)) is expected


def test_sqs_body_and_metadata_are_anded() -> None:
    f = compile_patterns(
        {"body": {"RequestCode": ["BBBB"]}, "attributes": {"ApproximateReceiveCount": ["1"]}}
    )
    assert f.matches_sqs(sqs_record(JSON_BODY))
    assert not f.matches_sqs(sqs_record(JSON_BODY, ApproximateReceiveCount="2"))
    record = sqs_record(JSON_BODY)
    record["attributes"]["ApproximateReceiveCount"] = "2"
    assert not f.matches_sqs(record)


def test_sqs_json_and_plain_filters_side_by_side() -> None:
    f = compile_patterns({"body": {"RequestCode": ["BBBB"]}}, {"body": [PLAIN_BODY]})
    assert f.matches_sqs(sqs_record(JSON_BODY))
    assert f.matches_sqs(sqs_record(PLAIN_BODY))
    assert not f.matches_sqs(sqs_record("something else"))


def test_sqs_body_in_top_level_or() -> None:
    f = compile_patterns({"$or": [{"body": {"RequestCode": ["BBBB"]}}, {"body": ["ping"]}]})
    assert f.matches_sqs(sqs_record(JSON_BODY))
    assert f.matches_sqs(sqs_record("ping"))
    assert not f.matches_sqs(sqs_record("pong"))


@pytest.mark.parametrize(
    ("body", "pattern", "expected"),
    [
        # Invalid JSON that looks like JSON is a plain string.
        ("{not json", {"body": ["{not json"]}, True),
        ("{not json", {"body": {"a": [{"exists": False}]}}, False),
        # Scalar JSON texts are plain strings.
        ("123", {"body": ["123"]}, True),
        ("true", {"body": ["true"]}, True),
        ('"quoted"', {"body": ['"quoted"']}, True),
        # A JSON array body matches an object pattern element by element.
        ('[{"a": 1}, {"a": 2}]', {"body": {"a": [2]}}, True),
        ('[{"a": 1}, {"a": 2}]', {"body": {"a": [3]}}, False),
        ('  \n{"a": "x"}', {"body": {"a": ["x"]}}, True),
        ("", {"body": [""]}, True),
    ],
)
def test_sqs_body_edge_cases(body: str, pattern: dict[str, Any], expected: bool) -> None:
    assert compile_patterns(pattern).matches_sqs(sqs_record(body)) is expected


def test_sqs_body_decoded_once_and_only_when_referenced() -> None:
    calls: list[Any] = []

    def counting_decoder(raw: Any) -> Any:
        calls.append(raw)
        return decode_json_text(raw)

    record = sqs_record(JSON_BODY)
    metadata_only = compile_patterns({"eventSource": ["aws:sqs"]}, {"awsRegion": ["x"]})
    assert metadata_only.matches_decoded(record, "body", counting_decoder)
    assert calls == []

    several = compile_patterns(
        {"body": {"RequestCode": ["no"]}},
        {"body": {"RequestCode": ["nope"]}},
        {"$or": [{"body": {"Data": {"Kind": ["x"]}}}, {"body": {"RequestCode": ["BBBB"]}}]},
    )
    assert several.matches_decoded(record, "body", counting_decoder)
    assert calls == [JSON_BODY]


def test_metadata_checked_before_body_is_decoded() -> None:
    calls: list[Any] = []

    def counting_decoder(raw: Any) -> Any:
        calls.append(raw)
        return decode_json_text(raw)

    f = compile_patterns({"body": {"RequestCode": ["BBBB"]}, "eventSource": ["aws:kinesis"]})
    assert not f.matches_decoded(sqs_record(JSON_BODY), "body", counting_decoder)
    assert calls == []


def test_matches_without_decoding_sees_raw_body() -> None:
    f = compile_patterns({"body": {"RequestCode": ["BBBB"]}})
    assert not f.matches(sqs_record(JSON_BODY))
    assert f.matches({"body": {"RequestCode": "BBBB"}})


def test_references() -> None:
    f = compile_patterns({"$or": [{"body": {"a": ["1"]}}, {"x": ["1"]}]})
    assert f.references("body")
    assert f.references("x")
    assert not f.references("a")


# --- generic data keys (Kinesis, Kafka) ---------------------------------------------


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def test_decoders() -> None:
    assert decode_json_text('{"a": 1}') == (True, {"a": 1})
    assert decode_json_text("[1]") == (True, [1])
    assert decode_json_text("plain") == (False, "plain")
    assert decode_json_text("42") == (False, "42")
    assert decode_json_text(None) is None
    assert decode_base64_json(b64('{"a": 1}')) == (True, {"a": 1})
    assert decode_base64_json(b64("hello")) == (False, "hello")
    assert decode_base64_json(b64(b"\xff\xfe")) is None
    assert decode_base64_json("not base64!") is None
    assert decode_base64_json(5) is None


def test_kinesis_data_json_drop_on_mismatch() -> None:
    f = compile_filter_criteria(
        criteria_of('{"data":{"temp":[{"numeric":[">",30]}]},"partitionKey":["p1"]}'),
        json_data_key="data",
    )
    assert f is not None
    hot = {"partitionKey": "p1", "data": b64('{"temp": 35}')}
    cold = {"partitionKey": "p1", "data": b64('{"temp": 20}')}
    plain = {"partitionKey": "p1", "data": b64("temp=35")}
    other_key = {"partitionKey": "p2", "data": b64('{"temp": 35}')}
    assert f.matches_decoded(hot, "data", decode_base64_json)
    assert not f.matches_decoded(cold, "data", decode_base64_json)
    assert not f.matches_decoded(plain, "data", decode_base64_json)
    assert not f.matches_decoded(other_key, "data", decode_base64_json)


def test_kafka_value_mismatch_means_metadata_only() -> None:
    f = compile_patterns({"value": {"level": ["error"]}, "topic": ["logs"]})
    json_error = {"topic": "logs", "value": b64('{"level": "error"}')}
    json_info = {"topic": "logs", "value": b64('{"level": "info"}')}
    plain = {"topic": "logs", "value": b64("level=info")}
    binary = {"topic": "logs", "value": b64(b"\xff\x00")}
    wrong_topic = {"topic": "other", "value": b64("level=info")}
    kw: dict[str, Any] = {"on_mismatch": "ignore"}
    assert f.matches_decoded(json_error, "value", decode_base64_json, **kw)
    assert not f.matches_decoded(json_info, "value", decode_base64_json, **kw)
    assert f.matches_decoded(plain, "value", decode_base64_json, **kw)
    assert f.matches_decoded(binary, "value", decode_base64_json, **kw)
    assert not f.matches_decoded(wrong_topic, "value", decode_base64_json, **kw)
    # The same records under "drop" lose the mismatches.
    assert not f.matches_decoded(plain, "value", decode_base64_json)
    assert not f.matches_decoded(binary, "value", decode_base64_json)


def test_kafka_plain_string_value() -> None:
    f = compile_patterns({"value": [{"anything-but": ["error"]}]})
    ok = {"value": b64("all good")}
    bad = {"value": b64("error")}
    assert f.matches_decoded(ok, "value", decode_base64_json, on_mismatch="ignore")
    assert not f.matches_decoded(bad, "value", decode_base64_json, on_mismatch="ignore")


def test_missing_data_key_behaves_like_missing_field() -> None:
    f = compile_patterns({"value": [{"exists": False}]}, {"value": {"a": [{"exists": False}]}})
    assert f.matches_decoded({}, "value", decode_base64_json)
    g = compile_patterns({"value": {"a": ["1"]}})
    assert not g.matches_decoded({}, "value", decode_base64_json)
