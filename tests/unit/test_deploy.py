"""The deploy/ files stay in step with the code: every metric a dashboard or alert names exists.
(tests/deploy runs the operators' tools on the same files and checks drain times and probes.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from poller import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\bpoller_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every series name the registry exposes (families with labels show up before use)."""
    text = generate_latest(metrics.REGISTRY).decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(
            family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count", "_created")
        )
    return names


def test_every_metric_named_in_deploy_files_exists() -> None:
    exported = exported_names()
    texts = {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file()}
    used = {(p.name, n) for p, t in texts.items() for n in NAME.findall(t)}
    assert used, "no metrics referenced at all?"
    unknown = sorted((file, name) for file, name in used if name not in exported)
    assert not unknown


def test_grafana_dashboard_is_valid_json_with_panels() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "poller-dashboard.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
