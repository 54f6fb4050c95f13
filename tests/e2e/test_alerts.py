"""The monitoring configuration: Prometheus' config and alert rules load, every alert has a unit test that
promtool passes, the autoscaler's prometheus-adapter query computes queue wait per pod, and every metric the
rules, the Grafana dashboard and the adapter name is one the server exports, with labels it has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import Metrics
from tests.support.servers import ROOT

PROMTOOL = shutil.which("promtool")
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "config.yaml"
# Skipped without promtool here; in CI (CI=true), where .ci/run installs it, a missing one fails the tests.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool missing (.ci/run installs Debian's prometheus)",
)

# Labels Prometheus or the histogram add to every series: not the server's to export.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "le"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def adapter_rule() -> dict[str, Any]:
    config = yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])
    (rule,) = config["rules"]
    return dict(rule)


def exported() -> dict[str, set[str]]:
    """Every series name the server's registry exposes, with the label names each has."""
    names: dict[str, set[str]] = {}
    for collector in Metrics().registry._collector_to_names:  # the metric objects themselves: labels before use
        kind, name, labels = collector._type, collector._name, set(collector._labelnames)  # type: ignore[attr-defined]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
        for suffix in suffixes:
            names[name + suffix] = labels
    return names


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query the deployment runs against the server's metrics."""
    found = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            found += [(f"{path.name}: {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
    rule = adapter_rule()
    found += [("prometheus-adapter seriesQuery", rule["seriesQuery"]), ("prometheus-adapter", rule["metricsQuery"])]
    return found


@needs_promtool
def test_the_prometheus_configuration_and_its_rules_load():
    checked = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_every_alert_fires_in_its_unit_test_and_stays_quiet_before_its_for_period():
    run = promtool("test", "rules", *[p.name for p in RULE_TESTS], cwd=PROMETHEUS / "tests")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(RULE_TESTS)
    fired, quiet = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names >= {
        "TTAHighErrorRate",
        "TTAHighLatencyP99",
        "TTAQueueSaturated",
        "TTARateLimited",
        "TTAAdaptationOverloaded",
        "TTAConfidenceDrift",
        "TTAEntropyDrift",
        "TTAAbstentionRising",
        "TTAEstimatedAccuracyDrop",
    }
    assert fired == names, f"alerts without a test where they fire: {sorted(names - fired)}"
    assert quiet == names, f"alerts without a test where they do not: {sorted(names - quiet)}"


def test_every_metric_and_label_the_rules_dashboard_and_autoscaler_query_is_exported():
    names = exported()
    checked = 0
    for where, expr in queries():
        used = set(re.findall(r"\btta_[a-z_]+\b", expr))
        assert used, f"{where}: names no metric: {expr}"
        unknown = sorted(used - names.keys())
        assert not unknown, f"{where}: the server exports no {unknown}"
        labels = set().union(*(names[n] for n in used)) | TARGET_LABELS
        for metric, matchers in re.findall(r"\b(tta_[a-z_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in names[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label}"
                checked += 1
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in re.findall(r"[a-z_]+", group.replace("<<.GroupBy>>", "")):
                assert label in labels, f"{where}: groups by {label}, which none of {sorted(used)} has"
    assert checked > 10


def series(kind: str, stage: str, namespace: str, pod: str, values: str) -> dict[str, str]:
    labels = f'stage="{stage}",namespace="{namespace}",pod="{pod}"'
    return {"series": f"tta_stage_duration_seconds_{kind}{{{labels}}}", "values": values}


@needs_promtool
def test_the_autoscaler_metric_is_the_mean_queue_wait_of_each_pod(tmp_path):
    rule = adapter_rule()
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'namespace="prod"')
    (tmp_path / "adapter.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": rule["name"]["as"], "expr": query}]}]})
    )
    (tmp_path / "adapter_test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["adapter.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        # Pod a: 60 requests a minute waiting 0.5 s each; pod b idle; another namespace busy.
                        "input_series": [
                            series("sum", "queue", "prod", "a", "0+30x10"),
                            series("count", "queue", "prod", "a", "0+60x10"),
                            series("sum", "encode", "prod", "a", "0+600x10"),
                            series("count", "encode", "prod", "a", "0+60x10"),
                            series("sum", "queue", "prod", "b", "0x10"),
                            series("count", "queue", "prod", "b", "0x10"),
                            series("sum", "queue", "dev", "c", "0+60x10"),
                            series("count", "queue", "dev", "c", "0+60x10"),
                        ],
                        "promql_expr_test": [
                            {
                                "expr": rule["name"]["as"],
                                "eval_time": "5m",
                                "exp_samples": [
                                    {"labels": f'{rule["name"]["as"]}{{pod="a"}}', "value": 0.5},
                                    {"labels": f'{rule["name"]["as"]}{{pod="b"}}', "value": 0},
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    run = promtool("test", "rules", "adapter_test.yml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
