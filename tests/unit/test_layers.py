"""The layers depend one way (DESIGN.md): state does not import the engine, the model does not
import any engine or runtime, and a source module is one module plus one line in the table."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from poller import sources
from poller.sources.base import SourceKind
from poller.sources.kinds import all_kinds, runnable_kinds


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("poller.registry", "poller.engine"),
        ("poller.mappings", "poller.engine"),
        ("poller.mappings", "poller.runtime"),
        # Parsing a URI loads no client library: `poller mappings` stays quick.
        ("poller.mappings", "aiobotocore"),
        ("poller.mappings", "redis"),
        ("poller.mappings", "kafka"),
    ],
)
def test_layering(module: str, must_not_load: str) -> None:
    loaded = _loaded_after(module)
    assert not any(m == must_not_load or m.startswith(must_not_load + ".") for m in loaded)


def test_every_entry_of_the_table_is_a_source_module() -> None:
    for module in {*sources.SCHEMES.values(), *sources.ARN_SERVICES.values()}:
        kind = importlib.import_module(module).SOURCE
        assert isinstance(kind, SourceKind)
        assert kind.forms and kind.label
    names = [k.name for k in all_kinds()]
    assert len(names) == len(set(names))


def test_readme_lists_exactly_the_sources_that_run() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Event sources", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [row.split("|")[2].strip() for row in rows]
    assert sorted(listed) == sorted(k.label for k in runnable_kinds())
