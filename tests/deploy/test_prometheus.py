"""deploy/prometheus and deploy/grafana through promtool: the alert rules load, each alert fires
in `promtool test rules` on the series of its trouble, each has a runbook in deploy/README.md,
and every PromQL expression of the dashboard and the KEDA trigger parses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from poller import metrics
from tests.deploy.tools import DEPLOY, require, run

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "poller-dashboard.json"
RUNBOOKS = DEPLOY / "README.md"
# What Grafana puts in for its variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$mapping": ".*", "$function": ".*"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def label_names() -> dict[str, set[str]]:
    """Series name -> its label names, for every metric poller/metrics.py defines."""
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                names[metric._name + suffix] = set(metric._labelnames)
    return names


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require("promtool")
    result = run(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_passes_promtool_check() -> None:
    promtool = require("promtool")
    result = run(promtool, "check", "config", DEPLOY / "prometheus" / "scrape.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_promtool_unit_tests() -> None:
    promtool = require("promtool")
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = sorted({rule["alert"] for rule in alert_rules()} - tested)
    assert not untested, f"no test in {ALERT_TESTS.name} expects these to fire: {untested}"
    result = run(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_say_what_and_where_and_link_a_runbook() -> None:
    runbooks = RUNBOOKS.read_text()
    for rule in alert_rules():
        name, notes = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert {"summary", "description", "runbook"} <= notes.keys(), name
        # An alert about a mapping names it and its function; one about a daemon, the daemon.
        if "mapping" in rule["expr"]:
            assert "$labels.mapping" in notes["description"], name
            assert "$labels.function" in notes["description"], name
        elif "by (function)" in rule["expr"]:
            assert "$labels.function" in notes["description"], name
        else:
            assert "$labels.instance" in notes["description"], name
        assert notes["runbook"] == f"deploy/README.md#{name.lower()}", name
        section = re.search(rf"^### {name}\n(.*?)(?=^##)", runbooks + "\n##", re.M | re.S)
        assert section, f"deploy/README.md has no '### {name}' runbook"
        for part in ("What it means", "What to check", "What to do"):
            assert f"**{part}**" in section[1], f"runbook {name} lacks '{part}'"


def test_dashboard_has_the_variables_and_filters_by_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["mapping"]["type"] == variables["function"]["type"] == "query"
    labels = label_names()
    for title, expr in dashboard_expressions():
        for name, selector in re.findall(r"\b(poller_[a-z_]+)(\{[^}]*\})?", expr):
            has = labels[name]
            if "mapping" in has:
                assert 'mapping=~"$mapping"' in selector, f"{title}: {name} ignores $mapping"
            if "function" in has:
                assert 'function=~"$function"' in selector, f"{title}: {name} ignores $function"


def test_dashboard_covers_what_operators_watch() -> None:
    used = {
        name
        for _, expr in dashboard_expressions()
        for name in re.findall(r"\bpoller_[a-z_]+", expr)
    }
    wanted = {
        "poller_queue_visible_messages",
        "poller_kafka_offset_lag_sum",
        "poller_iterator_age_max_seconds",
        "poller_invocations_total",
        "poller_invoke_duration_seconds_bucket",
        "poller_concurrent_executions",
        "poller_mapping_concurrency_target",
        "poller_throttles_total",
        "poller_dead_lettered_events_total",
        "poller_dropped_events_total",
        "poller_cold_starts_total",
        "poller_init_duration_seconds_bucket",
        "poller_environments",
        "poller_memory_reserved_megabytes",
    }
    assert wanted <= used, sorted(wanted - used)
    dashboard = json.loads(DASHBOARD.read_text())
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool has no PromQL-only check: each query becomes a recording rule, which
    `promtool check rules` parses."""
    promtool = require("promtool")
    queries = [f"dashboard panel {title!r}" for title, _ in dashboard_expressions()]
    expressions = [expr for _, expr in dashboard_expressions()]
    scaled = yaml.safe_load((DEPLOY / "kubernetes" / "scaledobject.yaml").read_text())
    for trigger in scaled["spec"]["triggers"]:
        queries.append(f"ScaledObject trigger {trigger['type']}")
        expressions.append(trigger["metadata"]["query"])
    rules = []
    for index, expr in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{queries[index]}: a variable the test does not know: {expr}"
        rules.append({"record": f"poller_deploy_check:query_{index}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    failed = [queries[int(i)] for i in re.findall(r"query_(\d+)", result.stdout + result.stderr)]
    assert result.returncode == 0, f"{failed}:\n{result.stdout}{result.stderr}"
