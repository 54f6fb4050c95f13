"""A real Prometheus scraping a real server: it sees the requests sent, loads deploy/prometheus/alerts.yml as it
is, and an error-rate alert of that file fires on errors injected into the server.

Prometheus scrapes and evaluates every second. The alert rules are loaded twice: the file as it is (each
rule must evaluate without error), and a copy of its rules on ``tta_requests_total`` errors with
``for: 0s`` (label ``copy: for-0s``), the exact ``expr`` kept, so the alert fires within seconds rather
than after the production rule's ``for:``. The errors are real 500s: the server's store loses its
label-set table under it, so every request naming a label set fails (``outcome="error"``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import pytest
import yaml

from server.storage import DATABASE_FILE
from tests.support.images import b64, png_bytes
from tests.support.prometheus import Prometheus, running_prometheus
from tests.support.servers import ROOT, running

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
FAST_LABEL = {"copy": "for-0s"}
IMAGE = b64(png_bytes())
SUCCESSES = 5


def error_rate_rules() -> list[dict[str, Any]]:
    """The alerting rules of deploy/prometheus/alerts.yml on ``tta_requests_total`` errors, as written there."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        rule
        for group in groups
        for rule in group["rules"]
        if "alert" in rule and "tta_requests_total" in rule["expr"] and "error" in rule["expr"]
    ]


def fast_copies(path: Path) -> Path:
    """A rules file with the error-rate rules' exact expressions, firing without waiting (``for: 0s``)."""
    rules = [{**rule, "for": "0s", "labels": {**rule.get("labels", {}), **FAST_LABEL}} for rule in error_rate_rules()]
    path.write_text(yaml.safe_dump({"groups": [{"name": "fast-copies", "rules": rules}]}, sort_keys=False))
    return path


@dataclass
class Watched:
    server: str
    process: Popen[str]
    data_dir: Path
    prometheus: Prometheus


@pytest.fixture(scope="module")
def watched(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    tmp = tmp_path_factory.mktemp("watched")
    with running(tiny_model_dir, tmp) as (url, process):
        # Each injected 500 logs its traceback: read the output as it comes, or the pipe fills and the server stalls.
        assert process.stdout is not None
        threading.Thread(target=process.stdout.read, name="drain-server-output", daemon=True).start()
        rule_files = [RULES, fast_copies(tmp / "fast-copies.yml")]
        with running_prometheus([url.removeprefix("http://")], rule_files, tmp) as prometheus:
            yield Watched(url, process, tmp / "data", prometheus)


def test_prometheus_sees_the_requests_and_evaluates_every_alert_rule(watched):
    for _ in range(SUCCESSES):
        r = httpx.post(f"{watched.server}/v1/classify", json={"images": [IMAGE], "labels": ["cat", "dog"]})
        assert r.status_code == 200, r.text
    query = 'sum(tta_requests_total{outcome="success"})'
    seen = watched.prometheus.wait_for(
        lambda: (v := watched.prometheus.value(query)) is not None and v >= SUCCESSES and v,
        f"{query} to reach {SUCCESSES}",
    )
    assert seen == SUCCESSES

    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {rule.get("alert") or rule["record"] for group in groups for rule in group["rules"]}

    def evaluated() -> list[dict[str, Any]] | None:
        loaded = [rule for rule in watched.prometheus.rules() if rule["file"] == str(RULES)]
        return loaded if loaded and all(rule["health"] != "unknown" for rule in loaded) else None

    loaded = watched.prometheus.wait_for(evaluated, "every rule of alerts.yml to be evaluated once")
    assert {rule["name"] for rule in loaded} == names
    assert [(rule["name"], rule.get("lastError", "")) for rule in loaded if rule["health"] != "ok"] == []


def test_an_error_rate_alert_of_alerts_yml_fires_on_injected_errors(watched):
    rules = error_rate_rules()
    if not rules:
        pytest.skip(f"{RULES.relative_to(ROOT)} has no alert on tta_requests_total errors to fire")
    names = {rule["alert"] for rule in rules}
    # The fault: the store loses its label-set table under the running server.
    with sqlite3.connect(watched.data_dir / DATABASE_FILE) as db:
        db.execute("DROP TABLE label_sets")

    def firing() -> list[dict[str, Any]] | None:
        for _ in range(5):  # errors keep coming while we wait, as they would in an outage
            r = httpx.post(f"{watched.server}/v1/classify", json={"images": [IMAGE], "label_set": "pets"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        fired = [
            alert
            for alert in watched.prometheus.alerts()
            if alert["state"] == "firing" and alert["labels"]["alertname"] in names
        ]
        return fired or None

    fired = watched.prometheus.wait_for(firing, f"one of {sorted(names)} to fire")
    labels = {rule["alert"]: rule.get("labels", {}) for rule in rules}
    for alert in fired:  # with the labels alerts.yml gives it (its severity), routed as the real one would be
        assert alert["labels"].items() >= labels[alert["labels"]["alertname"]].items()
    errors = watched.prometheus.value('sum(tta_requests_total{outcome="error"})')
    assert errors is not None and errors >= 5
