"""Compiling Lambda filter criteria: validate a ``FilterCriteria`` once (at mapping create and
update) and build the ``RecordFilter`` that matches records (filtering.py). Invalid patterns are
rejected with AWS's message and a detail naming the pattern and key (ESM_SEMANTICS.md §11)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from poller.engine.filtering import (
    OR_KEY,
    FilterError,
    Leaf,
    ObjectMatcher,
    RecordFilter,
    describe_path,
    is_number,
    json_decode,
)

DEFAULT_MAX_FILTERS: Final = 5
MAX_PATTERN_LENGTH: Final = 4096
_UNSUPPORTED_OPERATORS: Final = frozenset({"wildcard", "cidr", "exact"})
_RANGE_LOWER: Final = {">": True, ">=": False}  # operator -> bound is open
_RANGE_UPPER: Final = {"<": True, "<=": False}


class _Compiler:
    """Validates one parsed pattern and builds its matcher tree."""

    def __init__(self, index: int) -> None:
        self.index = index

    def fail(self, detail: str) -> FilterError:
        return FilterError(f"Pattern {self.index}: {detail}")

    def compile_object(self, pattern: dict[str, Any], path: tuple[str, ...]) -> ObjectMatcher:
        if not pattern:
            raise self.fail(f"empty objects are not allowed {describe_path(path)}")
        fields: list[tuple[str, Leaf | ObjectMatcher]] = []
        ors: list[tuple[ObjectMatcher, ...]] = []
        for key, value in pattern.items():
            if key == OR_KEY:
                ors.append(self.compile_or(value, path))
            elif type(value) is dict:
                fields.append((key, self.compile_object(value, (*path, key))))
            elif type(value) is list:
                fields.append((key, self.compile_leaf(value, (*path, key))))
            else:
                where = describe_path((*path, key))
                raise self.fail(f"the value must be an object or a non-empty array {where}")
        # Leaves first: they are cheaper than descending, and at the top level
        # this checks metadata before an object pattern forces a data decode.
        fields.sort(key=lambda field: type(field[1]) is ObjectMatcher)
        return ObjectMatcher(tuple(fields), tuple(ors))

    def compile_or(self, value: Any, path: tuple[str, ...]) -> tuple[ObjectMatcher, ...]:
        where = describe_path((*path, OR_KEY))
        if type(value) is not list or len(value) < 2:
            raise self.fail(f'"$or" needs an array of at least 2 objects {where}')
        if any(type(item) is not dict for item in value):
            raise self.fail(f'"$or" accepts only objects {where}')
        return tuple(self.compile_object(item, path) for item in value)

    def compile_leaf(self, values: list[Any], path: tuple[str, ...]) -> Leaf:
        where = describe_path(path)
        if not values:
            raise self.fail(f"empty arrays are not allowed {where}")
        strings: set[str] = set()
        ints: set[int] = set()
        floats: set[float] = set()
        bools: set[bool] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        ignore_case: set[str] = set()
        ranges: list[tuple[float, bool, float, bool]] = []
        but_strings: list[frozenset[str]] = []
        but_numbers: list[frozenset[float]] = []
        leaf = Leaf()
        for value in values:
            t = type(value)
            if t is str:
                strings.add(value)
            elif t is int:
                ints.add(value)
            elif t is float:
                floats.add(value)
            elif t is bool:
                bools.add(value)
            elif value is None:
                leaf.null = True
            elif t is dict:
                if len(value) != 1:
                    raise self.fail(f"an operator object needs exactly one key {where}")
                ((op, arg),) = value.items()
                if op == "equals-ignore-case":
                    ignore_case.add(self.string_arg(op, arg, where).casefold())
                elif op == "prefix":
                    prefixes.append(self.string_arg(op, arg, where))
                elif op == "suffix":
                    suffixes.append(self.string_arg(op, arg, where))
                elif op == "exists":
                    if type(arg) is not bool:
                        raise self.fail(f'"exists" must be true or false {where}')
                    if arg:
                        leaf.exists_true = True
                    else:
                        leaf.exists_false = True
                elif op == "numeric":
                    ranges.append(self.numeric(arg, where))
                elif op == "anything-but":
                    strs, nums = self.anything_but(arg, where)
                    if strs:
                        but_strings.append(strs)
                    else:
                        but_numbers.append(nums)
                else:
                    kind = "unsupported" if op in _UNSUPPORTED_OPERATORS else "unknown"
                    raise self.fail(f'{kind} operator "{op}" {where}')
            else:
                raise self.fail(
                    "match values must be strings, numbers, true, false, null "
                    f"or operator objects {where}"
                )
        leaf.strings = frozenset(strings)
        leaf.ints = frozenset(ints)
        leaf.floats = frozenset(floats)
        leaf.bools = frozenset(bools)
        leaf.prefixes = tuple(prefixes)
        leaf.suffixes = tuple(suffixes)
        leaf.ignore_case = frozenset(ignore_case)
        leaf.ranges = tuple(ranges)
        leaf.anything_but_strings = tuple(but_strings)
        leaf.anything_but_numbers = tuple(but_numbers)
        leaf.finish()
        return leaf

    def string_arg(self, op: str, arg: Any, where: str) -> str:
        if type(arg) is not str:
            if type(arg) is dict and arg:
                raise self.fail(f'unsupported operator "{op}" with "{next(iter(arg))}" {where}')
            raise self.fail(f'"{op}" needs a string {where}')
        return arg

    def numeric(self, arg: Any, where: str) -> tuple[float, bool, float, bool]:
        usage = f'"numeric" needs an operator and a number {where}'
        if type(arg) is not list or len(arg) not in (2, 4):
            raise self.fail(usage)
        op, number = arg[0], arg[1]
        if type(op) is not str or not is_number(number):
            raise self.fail(usage)
        if op == "=":
            if len(arg) != 2:
                raise self.fail(f'"numeric" "=" takes a single number {where}')
            return (number, False, number, False)
        if op in _RANGE_UPPER:
            if len(arg) != 2:
                raise self.fail(f'"numeric" ranges start with ">" or ">=" {where}')
            return (-math.inf, False, number, _RANGE_UPPER[op])
        if op not in _RANGE_LOWER:
            raise self.fail(f'unknown "numeric" operator "{op}" {where}')
        if len(arg) == 2:
            return (number, _RANGE_LOWER[op], math.inf, False)
        upper_op, upper = arg[2], arg[3]
        if type(upper_op) is not str or upper_op not in _RANGE_UPPER or not is_number(upper):
            raise self.fail(f'"numeric" range upper bound needs "<" or "<=" and a number {where}')
        if number >= upper:
            raise self.fail(f'"numeric" range lower bound must be below the upper bound {where}')
        return (number, _RANGE_LOWER[op], upper, _RANGE_UPPER[upper_op])

    def anything_but(self, arg: Any, where: str) -> tuple[frozenset[str], frozenset[float]]:
        if type(arg) is dict:
            op = next(iter(arg), "")
            raise self.fail(f'unsupported operator "anything-but" with "{op}" {where}')
        items = arg if type(arg) is list else [arg]
        if not items:
            raise self.fail(f'"anything-but" needs a non-empty list {where}')
        if all(type(item) is str for item in items):
            return frozenset(items), frozenset()
        if all(is_number(item) for item in items):
            return frozenset(), frozenset(items)
        raise self.fail(
            f'"anything-but" takes strings or numbers, not both and nothing else {where}'
        )


def _compile_pattern(index: int, pattern: Any, json_data_key: str | None) -> ObjectMatcher:
    compiler = _Compiler(index)
    if not isinstance(pattern, str):
        raise compiler.fail("must be a JSON string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise compiler.fail(f"longer than {MAX_PATTERN_LENGTH} characters")
    try:
        parsed = json_decode(pattern)
    except msgspec.DecodeError as exc:
        raise compiler.fail(f"not valid JSON ({exc})") from None
    if type(parsed) is not dict:
        raise compiler.fail("the pattern must be a JSON object")
    matcher = compiler.compile_object(parsed, ())
    if json_data_key is not None:
        _require_object_at(compiler, matcher, json_data_key)
    return matcher


def _require_object_at(compiler: _Compiler, pattern: ObjectMatcher, key: str) -> None:
    for name, matcher in pattern.fields:
        if name == key and type(matcher) is not ObjectMatcher:
            raise compiler.fail(f'"{key}" must be a JSON object pattern for this event source')
    for group in pattern.ors:
        for alternative in group:
            _require_object_at(compiler, alternative, key)


def compile_filter_criteria(
    criteria: Mapping[str, Any] | None,
    *,
    max_filters: int = DEFAULT_MAX_FILTERS,
    json_data_key: str | None = None,
) -> RecordFilter | None:
    """Validate and compile ``{"Filters": [{"Pattern": "<json>"}, ...]}``.

    Returns None when there is nothing to filter (None, ``{}``, no Filters).
    ``max_filters`` is the per-mapping quota (5 by default, 10 after a raise).
    ``json_data_key`` names a data key that only accepts object patterns
    (Kinesis ``data``, DynamoDB ``dynamodb``: a plain pattern there is
    rejected at create/update). Raises ``FilterError`` on any invalid input.
    """
    if criteria is None:
        return None
    if not isinstance(criteria, Mapping):
        raise FilterError("FilterCriteria must be an object")
    unknown = set(criteria) - {"Filters"}
    if unknown:
        raise FilterError(f"unknown FilterCriteria key {sorted(unknown)[0]!r}")
    filters = criteria.get("Filters")
    if not filters:
        if filters is None or type(filters) is list:
            return None
        raise FilterError("Filters must be an array")
    if type(filters) is not list:
        raise FilterError("Filters must be an array")
    if len(filters) > max_filters:
        raise FilterError(f"at most {max_filters} filters are allowed, got {len(filters)}")
    patterns: list[ObjectMatcher] = []
    sources: list[str] = []
    for index, entry in enumerate(filters, start=1):
        if not isinstance(entry, Mapping) or set(entry) - {"Pattern"}:
            raise FilterError(f'Pattern {index}: a filter must be {{"Pattern": "<json>"}}')
        source = entry.get("Pattern")
        patterns.append(_compile_pattern(index, source, json_data_key))
        sources.append(source)
    return RecordFilter(patterns, sources)
