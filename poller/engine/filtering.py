"""Lambda event filtering: the Lambda subset of the EventBridge pattern syntax.

Pure logic, no I/O. ``filter_compiler.compile_filter_criteria`` validates a
``FilterCriteria`` object once (at mapping create/update) and returns a
``RecordFilter`` (here) whose matchers are plain objects with pre-built sets and
tuples, because matching runs for every polled record.

Semantics (see ESM_SEMANTICS.md §11):

* Filters are ORed; the keys of one pattern are ANDed; ``$or`` (at least two
  sub-patterns) ORs groups of keys at the level where it appears.
* A nested object in a pattern descends into the nested object of the record.
  When the record holds an array there, the sub-pattern must match one element
  as a whole (EventBridge "array consistency").
* A leaf (an array of values/operators) matches if any leaf value of the record
  field matches any entry. Record arrays are flattened; objects inside them are
  not leaves.
* ``exists`` only sees leaf values: an object value counts as absent.
  ``exists: false`` (and nothing else) matches an absent key.
* Exact number matching follows the JSON type: ``300`` and ``300.0`` differ.
  After decoding, ``300.0`` and ``3.0e2`` are the same float, so they cannot be
  told apart (AWS would treat them as different). ``numeric`` compares values,
  and so does a numeric ``anything-but`` (as in EventBridge).
* ``anything-but`` requires the key to be present with a leaf value; values of
  another type (null, booleans, numbers for a string list) pass it.
* Booleans in a pattern (``[true]``) match JSON booleans, as in EventBridge.

Data keys (§11.3/§11.4) are handled by ``RecordFilter.matches_decoded``: the
top-level data key (``body``, ``data``, ``value``) is decoded lazily, at most
once per record, and only when a pattern names it. A text counts as JSON when
it decodes to an object or an array; scalar JSON texts (``123``, ``"x"``,
``true``) are treated as plain strings, which is what a plain-string pattern
expects to see.
"""

from __future__ import annotations

import base64
import binascii
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from operator import call
from typing import Any, Final, Literal

import msgspec

__all__ = [
    "ERROR_MESSAGE",
    "Decoded",
    "Decoder",
    "FilterError",
    "RecordFilter",
    "decode_base64_json",
    "decode_json_text",
]

ERROR_MESSAGE: Final = "Invalid filter pattern definition."

# (is_json, value): the decoded JSON value, or the plain text. None means the
# data could not be decoded at all (bad base64, not UTF-8).
Decoded = tuple[bool, Any] | None
Decoder = Callable[[Any], Decoded]

OR_KEY: Final = "$or"
_MISSING: Final = object()
json_decode = msgspec.json.Decoder().decode

# Tri-state results of scanning a record array.
_HIT: Final = 2
_SEEN: Final = 1
_NONE: Final = 0

_STRUCTURED_STARTS: Final = frozenset({"{", "[", b"{", b"["})


class FilterError(ValueError):
    """An invalid ``FilterCriteria``; ``str()`` is the AWS message plus a detail."""

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail
        super().__init__(f"{ERROR_MESSAGE} {detail}" if detail else ERROR_MESSAGE)


def is_number(value: Any) -> bool:
    # bool is an int subclass, but JSON true is not a number; msgspec turns
    # 1e999 into inf, which no record number can be compared against usefully.
    t = type(value)
    return t is int or (t is float and math.isfinite(value))


def describe_path(path: tuple[str, ...]) -> str:
    return f'at key "{".".join(path)}"' if path else "at the top level"


def _range_test(low: float, low_open: bool, high: float, high_open: bool) -> Callable[[Any], bool]:
    # A single numeric condition is the usual numeric leaf; a closure over C
    # comparison functions beats the general loop over range tuples.
    above = operator.lt if low_open else operator.le
    below = operator.lt if high_open else operator.le

    def in_range(value: Any) -> bool:
        t = type(value)
        return (t is int or t is float) and above(low, value) and below(value, high)

    return in_range


class Leaf:
    """Matches one record field against an array of values and operators."""

    __slots__ = (
        "anything_but_numbers",
        "anything_but_strings",
        "bools",
        "exists_false",
        "exists_true",
        "floats",
        "ignore_case",
        "ints",
        "null",
        "prefixes",
        "ranges",
        "scalar",
        "strings",
        "suffixes",
    )

    def __init__(self) -> None:
        self.strings: frozenset[str] = frozenset()
        self.ints: frozenset[int] = frozenset()
        self.floats: frozenset[float] = frozenset()
        self.bools: frozenset[bool] = frozenset()
        self.null = False
        self.exists_true = False
        self.exists_false = False
        # str.startswith/endswith accept a tuple, testing all of them in C.
        self.prefixes: tuple[str, ...] = ()
        self.suffixes: tuple[str, ...] = ()
        self.ignore_case: frozenset[str] = frozenset()
        # (low, low_open, high, high_open)
        self.ranges: tuple[tuple[float, bool, float, bool], ...] = ()
        self.anything_but_strings: tuple[frozenset[str], ...] = ()
        self.anything_but_numbers: tuple[frozenset[float], ...] = ()
        self.scalar: Callable[[Any], bool] = self.match_scalar

    def finish(self) -> None:
        """Pick the scalar test once the leaf is fully built."""
        others = (
            self.ints
            or self.floats
            or self.bools
            or self.exists_true
            or self.prefixes
            or self.suffixes
            or self.ignore_case
            or self.anything_but_strings
            or self.anything_but_numbers
        )
        if not others and len(self.ranges) == 1 and not (self.strings or self.null):
            self.scalar = _range_test(*self.ranges[0])
        elif not others and not self.ranges:
            # The most common leaf (["a", "b"], [null]) becomes one C-level set
            # lookup: no int/float/bool ever equals a str or None, so one set
            # serves every scalar type.
            exact: frozenset[Any] = self.strings | ({None} if self.null else set())
            self.scalar = exact.__contains__
        else:
            self.scalar = self.match_scalar

    def match(self, value: Any) -> bool:
        t = type(value)
        if t is list:
            found = self._scan(value)
            return found == _HIT or (found == _NONE and self.exists_false)
        if t is dict or value is _MISSING:
            return self.exists_false
        return self.scalar(value)

    def _scan(self, items: list[Any]) -> int:
        seen = False
        for item in items:
            t = type(item)
            if t is dict:
                continue
            if t is list:
                found = self._scan(item)
                if found == _HIT:
                    return _HIT
                seen = seen or found == _SEEN
                continue
            seen = True
            if self.scalar(item):
                return _HIT
        return _SEEN if seen else _NONE

    def match_scalar(self, value: Any) -> bool:
        if self.exists_true:
            return True
        t = type(value)
        if t is str:
            if value in self.strings:
                return True
            if self.prefixes and value.startswith(self.prefixes):
                return True
            if self.suffixes and value.endswith(self.suffixes):
                return True
            if self.ignore_case and value.casefold() in self.ignore_case:
                return True
            if self.anything_but_numbers:
                return True
            if not self.anything_but_strings:
                return False
            return any(value not in excluded for excluded in self.anything_but_strings)
        if t is int or t is float:
            # Separate sets per type: 300 == 300.0 in Python but not in Lambda.
            if value in (self.ints if t is int else self.floats):
                return True
            for low, low_open, high, high_open in self.ranges:
                if (value > low if low_open else value >= low) and (
                    value < high if high_open else value <= high
                ):
                    return True
            if self.anything_but_strings:
                return True
            if not self.anything_but_numbers:
                return False
            return any(value not in excluded for excluded in self.anything_but_numbers)
        if value is None:
            if self.null:
                return True
        elif t is bool:
            if value in self.bools:
                return True
        else:
            return False
        return bool(self.anything_but_strings or self.anything_but_numbers)


class ObjectMatcher:
    """Matches a record object against a pattern object (fields ANDed, plus $or groups)."""

    __slots__ = ("checks", "empty_ok", "fields", "keys", "ors")

    def __init__(
        self,
        fields: tuple[tuple[str, Leaf | ObjectMatcher], ...],
        ors: tuple[tuple[ObjectMatcher, ...], ...],
    ) -> None:
        self.fields = fields
        # Bound methods saved up front: one attribute lookup less per field per record.
        self.checks = tuple((key, matcher.match) for key, matcher in fields)
        self.ors = ors
        self.keys = frozenset(key for key, _ in fields)
        # A missing key or a scalar at an object position has no sub-fields;
        # only patterns made of exists:false can match it.
        self.empty_ok = self.match_dict({})

    def match(self, value: Any) -> bool:
        t = type(value)
        if t is dict:
            return self.match_dict(value)
        if t is list:
            found = self._scan(value)
            return found == _HIT or (found == _NONE and self.empty_ok)
        return self.empty_ok

    def _scan(self, items: list[Any]) -> int:
        seen = False
        for item in items:
            t = type(item)
            if t is dict:
                seen = True
                if self.match_dict(item):
                    return _HIT
            elif t is list:
                found = self._scan(item)
                if found == _HIT:
                    return _HIT
                seen = seen or found == _SEEN
        return _SEEN if seen else _NONE

    def match_dict(self, record: Mapping[str, Any]) -> bool:
        get = record.get
        for key, check in self.checks:
            if not check(get(key, _MISSING)):
                return False
        for group in self.ors:
            for alternative in group:
                if alternative.match_dict(record):
                    break
            else:
                return False
        return True

    def top_level_keys(self) -> frozenset[str]:
        """Keys of the record itself that this pattern reads, through top-level $or too."""
        keys = set(self.keys)
        for group in self.ors:
            for alternative in group:
                keys |= alternative.top_level_keys()
        return frozenset(keys)


class _DataSlot:
    """Per-record lazy decode of the data key, shared by all filters."""

    __slots__ = ("decoded", "decoder", "done", "mismatch_passes", "raw")

    def __init__(self, raw: Any, decoder: Decoder, mismatch_passes: bool) -> None:
        self.raw = raw
        self.decoder = decoder
        self.mismatch_passes = mismatch_passes
        self.done = False
        self.decoded: Decoded = None

    def match(self, matcher: Leaf | ObjectMatcher) -> bool:
        if self.raw is _MISSING:
            return matcher.match(_MISSING)
        if not self.done:
            self.decoded = self.decoder(self.raw)
            self.done = True
        decoded = self.decoded
        if decoded is None:
            return self.mismatch_passes
        is_json, value = decoded
        # An object pattern needs JSON data; a leaf pattern needs plain text.
        if is_json is (type(matcher) is ObjectMatcher):
            return matcher.match(value)
        return self.mismatch_passes


def _match_top(
    pattern: ObjectMatcher, record: Mapping[str, Any], data_key: str, slot: _DataSlot
) -> bool:
    get = record.get
    for key, matcher in pattern.fields:
        if key == data_key:
            if not slot.match(matcher):
                return False
        elif not matcher.match(get(key, _MISSING)):
            return False
    for group in pattern.ors:
        if not any(_match_top(alt, record, data_key, slot) for alt in group):
            return False
    return True


class RecordFilter:
    """Compiled ``FilterCriteria``: a record passes if it matches any pattern."""

    __slots__ = ("_match_any", "_patterns", "_top_keys", "sources")

    def __init__(self, patterns: Iterable[ObjectMatcher], sources: Iterable[str]) -> None:
        self._patterns: tuple[ObjectMatcher, ...] = tuple(patterns)
        self.sources: tuple[str, ...] = tuple(sources)
        keys: set[str] = set()
        for pattern in self._patterns:
            keys |= pattern.top_level_keys()
        self._top_keys = frozenset(keys)
        # any() over a generator adds a Python frame per call; map() keeps the loop in C.
        checks = tuple(pattern.match_dict for pattern in self._patterns)
        if len(checks) == 1:
            self._match_any: Callable[[Mapping[str, Any]], bool] = checks[0]
        else:
            self._match_any = lambda record: any(map(call, checks, repeat(record)))

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        return f"RecordFilter({list(self.sources)!r})"

    def references(self, key: str) -> bool:
        """Whether any pattern reads ``key`` at the top level of the record."""
        return key in self._top_keys

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Match a record as-is (DynamoDB, or any already-decoded record)."""
        return self._match_any(record)

    def matches_decoded(
        self,
        record: Mapping[str, Any],
        data_key: str,
        decoder: Decoder,
        *,
        on_mismatch: Literal["drop", "ignore"] = "drop",
    ) -> bool:
        """Match a record whose ``data_key`` holds encoded data.

        ``decoder(record[data_key])`` returns ``(True, json_value)``,
        ``(False, plain_text)`` or ``None`` (undecodable). An object pattern at
        ``data_key`` needs JSON data and a value-list pattern needs plain text.
        On a mismatch (or undecodable data) that condition fails with
        ``"drop"`` (SQS, Kinesis) or is skipped with ``"ignore"`` (Kafka, MQ:
        metadata filters only). Other top-level keys match the record directly.
        """
        if data_key not in self._top_keys:
            return self._match_any(record)
        slot = _DataSlot(record.get(data_key, _MISSING), decoder, on_mismatch == "ignore")
        patterns = self._patterns
        if len(patterns) == 1:
            return _match_top(patterns[0], record, data_key, slot)
        return any(map(_match_top, patterns, repeat(record), repeat(data_key), repeat(slot)))

    def matches_sqs(self, record: Mapping[str, Any]) -> bool:
        """Match an SQS record; ``body`` follows the §11.4 JSON/plain-string table."""
        return self.matches_decoded(record, "body", decode_json_text)


def _looks_structured(text: str | bytes) -> bool:
    # Cheap pre-check so plain strings never pay for a failed JSON parse; the
    # lstrip copy is only made when the text really starts with whitespace.
    first = text[:1]
    if first in _STRUCTURED_STARTS:
        return True
    if not first.isspace():
        return False
    return text.lstrip()[:1] in _STRUCTURED_STARTS


def decode_json_text(text: Any) -> Decoded:
    """Decoder for SQS ``body``: JSON object/array, else the plain string."""
    if not isinstance(text, str):
        return None
    if _looks_structured(text):
        try:
            return True, json_decode(text)
        except msgspec.DecodeError:
            pass
    return False, text


def decode_base64_json(data: Any) -> Decoded:
    """Decoder for Kinesis ``data`` / Kafka ``value``: base64, then UTF-8 JSON or text."""
    if not isinstance(data, str | bytes):
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _looks_structured(raw):
        try:
            return True, json_decode(raw)
        except msgspec.DecodeError:
            pass
    try:
        return False, raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
