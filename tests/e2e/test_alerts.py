"""The Prometheus configuration and alert rules: they load, and the drift alert fires on a drop and only then."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.servers import ROOT

PROMTOOL = shutil.which("promtool")
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (.ci/run installs Debian's prometheus)")

UNIT_TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # A day at 0.9, then 0.7 from minute 1501: the label set's images drifted.
      - series: 'tta_estimated_accuracy{{label_set="pets", instance="tta:8000"}}'
        values: '0.9x1500 0.7x60'
      - series: 'tta_estimated_accuracy_images{{label_set="pets", instance="tta:8000"}}'
        values: '500x1560'
      # Steady, and a drop too small to matter.
      - series: 'tta_estimated_accuracy{{label_set="steady", instance="tta:8000"}}'
        values: '0.8x1500 0.75x60'
      - series: 'tta_estimated_accuracy_images{{label_set="steady", instance="tta:8000"}}'
        values: '500x1560'
      # A drop seen on too few images to trust.
      - series: 'tta_estimated_accuracy{{label_set="new", instance="tta:8000"}}'
        values: '0.9x1500 0.5x60'
      - series: 'tta_estimated_accuracy_images{{label_set="new", instance="tta:8000"}}'
        values: '20x1560'
    alert_rule_test:
      - eval_time: 1510m  # 9 minutes after the drop: pending, not firing
        alertname: TTAEstimatedAccuracyDrop
        exp_alerts: []
      - eval_time: 1530m
        alertname: TTAEstimatedAccuracyDrop
        exp_alerts:
          - exp_labels:
              severity: warning
              label_set: pets
              instance: tta:8000
            exp_annotations:
              summary: "Estimated accuracy of label set pets fell by 20%"
              description: >-
                The mean calibrated confidence of label set pets on tta:8000 is more than 10 points below
                its average over the past day: its images have probably shifted. Look at recent images;
                consider test-time adaptation, or labelled examples to recalibrate on.
"""


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_prometheus_configuration_and_its_rules_load():
    checked = promtool("check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rules found" in checked.stdout + checked.stderr


def test_the_drift_alert_fires_on_a_drop_against_the_past_day_and_not_otherwise(tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES))
    run = promtool("test", "rules", str(tests))
    assert run.returncode == 0, run.stdout + run.stderr
