"""The Dockerfile: hadolint finds nothing, and its build stage's COPY lines bring everything
poller needs to install (no Docker engine here, so the install itself runs on a copy of just
those files)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

from tests.deploy.tools import ROOT, require, run

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_finds_nothing() -> None:
    hadolint = require("hadolint")
    result = run(hadolint, "--failure-threshold", "style", "--format", "json", DOCKERFILE)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, (
        "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
        or result.stderr
    )


def test_runtime_stage_runs_poller_as_a_user() -> None:
    build, runtime = stages()
    assert build[0][1].endswith(" AS build")
    last = dict(runtime)
    assert re.fullmatch(r"\d+:\d+", last["USER"]) and not last["USER"].startswith("0:")
    assert json.loads(last["ENTRYPOINT"])[-2:] == ["poller", "run"]
    assert any(args.startswith("--from=build ") for word, args in runtime if word == "COPY")


def test_build_stage_copies_what_the_package_needs(tmp_path: Path) -> None:
    build, _ = stages()
    context = tmp_path / "src"
    for word, args in build:
        if word == "COPY":
            *sources, _destination = args.split()
            for source in sources:
                origin = ROOT / source
                target = context / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
    result = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--wheel-dir",
        tmp_path / "wheels",
        context,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("poller-*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "poller").rglob("*.py")}
    assert modules <= packaged, sorted(modules - packaged)
