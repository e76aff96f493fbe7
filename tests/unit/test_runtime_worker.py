"""The worker's pieces that need no process: handler loading, event decoding, error shapes."""

from __future__ import annotations

import json
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.runtime import worker
from poller.runtime.context import LambdaContext


@pytest.fixture
def code_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory on sys.path and a module name unique to this test."""
    name = f"rt_unit_{uuid.uuid4().hex[:8]}"
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _failure(spec: str) -> worker.InitFailure:
    with pytest.raises(worker.InitFailure) as info:
        worker.load_handler(spec)
    return info.value


def test_load_handler_dotted_and_slashed(code_dir: tuple[Path, str]) -> None:
    path, name = code_dir
    (path / name / "inner").mkdir(parents=True)
    (path / name / "__init__.py").write_text("")
    (path / name / "inner" / "__init__.py").write_text("")
    (path / name / "inner" / "app.py").write_text("def go(e, c):\n    return 'went'\n")
    assert worker.load_handler(f"{name}.inner.app.go")(None, None) == "went"
    assert worker.load_handler(f"{name}/inner/app.go")(None, None) == "went"


@pytest.mark.parametrize("spec", ["nodot", "", ".handler", "module."])
def test_malformed_handler_names(spec: str) -> None:
    assert _failure(spec).error_type == "Runtime.MalformedHandlerName"


def test_import_errors(code_dir: tuple[Path, str]) -> None:
    path, name = code_dir
    failure = _failure(f"{name}.handler")
    assert failure.error_type == "Runtime.ImportModuleError"
    assert failure.message == f"Unable to import module '{name}': No module named '{name}'"
    (path / f"{name}.py").write_text("def handler(event, context)\n    pass\n")
    failure = _failure(f"{name}.handler")
    assert failure.error_type == "Runtime.UserCodeSyntaxError"
    assert failure.trace and f"{name}.py" in failure.trace[0]


def test_handler_not_found_or_not_callable(code_dir: tuple[Path, str]) -> None:
    path, name = code_dir
    (path / f"{name}.py").write_text("VALUE = 1\n")
    assert _failure(f"{name}.handler").error_type == "Runtime.HandlerNotFound"
    assert _failure(f"{name}.VALUE").error_type == "Runtime.HandlerNotFound"


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b"null",
        b"[1, 2.5, true]",
        b'"text"',
        b' {"padded": 1} ',
        b'{"u": "\\u2603 \xe2\x98\x83"}',
        b"12345678901234567890123",
        b"\n[]\n",
    ],
)
def test_decode_event_matches_json_loads(raw: bytes) -> None:
    assert worker.decode_event(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"{} {}", b"nul", b"\xff", b"[1,]"])
def test_decode_event_rejects_what_json_loads_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        worker.decode_event(raw)


# What only Python's json accepts, and what neither does: msgspec refuses all of it.
ODD_JSON = [
    b'{"nan": NaN, "inf": Infinity, "minus": -Infinity}',
    b"[1e400, -1e400]",
    b'"\\ud800 lone"',
    b' {"padded": [1, 2.5e3, true, null]} ',
]
BATCH = json.dumps(
    {"Records": [{"n": i, "f": i / 7, "big": 2**70 + i, "s": "é\u2603\n"} for i in range(50)]}
).encode()


def _as_json(value: object) -> str:
    """Compared as text: NaN != NaN, but both print as NaN."""
    return json.dumps(value)


def test_events_decode_as_json_loads_before_and_after_the_switch_to_msgspec() -> None:
    events = worker.Events(switch_after_bytes=len(BATCH) * 2)
    for raw in [BATCH, *ODD_JSON]:
        assert _as_json(events.decode(raw)) == _as_json(json.loads(raw))
    assert not events.fast  # 2 x BATCH not reached yet: the odd ones are short
    assert _as_json(events.decode(BATCH)) == _as_json(json.loads(BATCH))
    assert events.fast
    for raw in [BATCH, *ODD_JSON]:
        assert _as_json(events.decode(raw)) == _as_json(json.loads(raw))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_events_after_the_switch_give_what_json_loads_gives(
    value: object, ensure_ascii: bool
) -> None:
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode()
    events = worker.Events(switch_after_bytes=0)
    assert _as_json(events.decode(raw)) == _as_json(json.loads(raw))
    assert events.fast


class _BrokenDecoder:
    def __init__(self) -> None:
        raise RuntimeError("not the msgspec we know")


class _WrongDecoder:
    def decode(self, raw: bytes) -> object:
        return {"wrong": True}


@pytest.mark.parametrize("decoder", [_BrokenDecoder, _WrongDecoder])
def test_a_msgspec_that_does_not_work_leaves_the_stdlib_decoding(
    monkeypatch: pytest.MonkeyPatch, decoder: type
) -> None:
    # What a function's own directory (first on sys.path) might hold under that name.
    fake = types.ModuleType("msgspec.json")
    fake.Decoder = decoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msgspec.json", fake)
    events = worker.Events(switch_after_bytes=1)
    assert events.decode(BATCH) == json.loads(BATCH)
    assert not events.fast
    assert events.decode(BATCH) == json.loads(BATCH)


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"{} {}", b"nul", b"\xff", b"[1,]", b'"a\nb"', b"\xef\xbb\xbf{}"]
)
def test_events_reject_after_the_switch_what_json_loads_rejects(raw: bytes) -> None:
    events = worker.Events(switch_after_bytes=1)
    events.decode(b"{}")
    assert events.fast
    with pytest.raises(ValueError):
        events.decode(raw)


def test_result_encoding_is_json_dumps_with_decimals() -> None:
    import decimal

    assert worker._encode_result({"a": [1, "é"], "d": decimal.Decimal("1.50")}) == (
        '{"a": [1, "\\u00e9"], "d": 1.5}'
    )
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        worker._encode_result({1, 2})


def test_error_body_shape() -> None:
    body = json.loads(worker.error_body("ValueError", "bad", "req-1", ["  File x\n"]))
    assert body == {
        "errorMessage": "bad",
        "errorType": "ValueError",
        "requestId": "req-1",
        "stackTrace": ["  File x\n"],
    }
    assert "requestId" not in json.loads(worker.error_body("Runtime.X", "m", None, []))


def test_user_frames_drop_the_runtimes_leading_frames() -> None:
    def users_code() -> None:
        raise KeyError("k")

    # A caller compiled as if it were in worker.py, catching like serve() does.
    source = (
        "def call(f, user_frames):\n"
        "    try:\n"
        "        f()\n"
        "    except Exception as exc:\n"
        "        return user_frames(exc.__traceback__)\n"
    )
    namespace: dict = {}
    exec(compile(source, worker.__file__, "exec"), namespace)
    frames = namespace["call"](users_code, worker.user_frames)
    assert len(frames) == 1 and "in users_code" in frames[0] and 'raise KeyError("k")' in frames[0]


def test_context_reads_its_variables_from_the_given_mapping() -> None:
    env = {
        "AWS_LAMBDA_FUNCTION_NAME": "fn",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/fn",
        "AWS_LAMBDA_LOG_STREAM_NAME": "stream",
    }
    ctx = LambdaContext("id-1", 0, "arn:x", {"client": {"app_title": "t"}}, environ=env)
    assert (ctx.function_name, ctx.memory_limit_in_mb, ctx.log_stream_name) == (
        "fn",
        "512",
        "stream",
    )
    assert ctx.get_remaining_time_in_millis() == 0  # clamped, never negative
    assert ctx.client_context is not None and ctx.client_context.client is not None
    assert ctx.client_context.client.app_title == "t"
    assert ctx.identity.cognito_identity_id is None
    assert "id-1" in repr(ctx)
