"""What reporting a mapping's status line costs per batch, against an older version of it.

The engine calls ``SourceHealth.set_status("OK")`` after every settled batch; since the status
line carries the error behind a PROBLEM (``why``), that call compares one more value. This
times the call on the checkout and on ``poller/engine/health.py`` of a baseline commit (read
with ``git show``), alternating them round by round in one process, and prints the median,
the spread and the per-round ratio.

    .venv/bin/python bench/status_line.py --baseline 35645a1 --rounds 11
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

from poller import metrics
from poller.engine import health
from poller.logs import JsonLog

CALLS = 1_000_000


def _baseline(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:poller/engine/health.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    path = Path(tempfile.mkdtemp()) / "health_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("health_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _health(module: ModuleType, uuid: str) -> Any:
    tracker = module.SourceHealth(
        JsonLog(io.BytesIO()), metrics.MappingMetrics(uuid, "fn"), {}, lambda status: None
    )
    tracker.set_status("OK")
    return tracker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="commit whose health.py is compared")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    trackers = {
        "baseline": _health(_baseline(args.baseline), "bench-baseline"),
        "checkout": _health(health, "bench-checkout"),
    }
    times: dict[str, list[float]] = {name: [] for name in trackers}
    for round_ in range(args.rounds):
        order = list(trackers) if round_ % 2 == 0 else list(reversed(trackers))
        for name in order:
            call = trackers[name].set_status
            seconds = timeit.timeit(lambda call=call: call("OK"), number=CALLS)
            times[name].append(seconds / CALLS * 1e9)
    for name, values in times.items():
        print(
            f"{name:9} median {statistics.median(values):6.1f} ns/call "
            f"(min {min(values):.1f}, max {max(values):.1f})"
        )
    ratios = [c / b for c, b in zip(times["checkout"], times["baseline"], strict=True)]
    print(
        f"checkout/baseline per round: median {statistics.median(ratios):.2f} "
        f"({', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
