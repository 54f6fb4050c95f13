"""A real Prometheus (Debian's ``prometheus``) on loopback, scraping servers the tests run, queried over its HTTP API.

``running_prometheus`` writes a configuration (scrape and rule evaluation every second, the given rule
files), starts Prometheus with its data in ``tmp_path`` and yields a ``Prometheus`` to query; every wait
polls the HTTP API until its condition holds, with a bounded deadline, never a guessed sleep.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.apps import PATIENCE_S, wait_for
from tests.support.servers import free_port

T = TypeVar("T")
PROMETHEUS = shutil.which("prometheus")
INTERVAL = "1s"  # scrape and evaluation: what the tests wait for arrives within a few of these

CONFIG = """
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
rule_files: {rule_files}
scrape_configs:
  - job_name: ttaserve
    metrics_path: /metrics
    static_configs:
      - targets: {targets}
"""


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[str]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=PATIENCE_S)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", r.text
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-element instant vector (``sum(...)``), None while it is empty."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        """Every rule loaded, each with its group's file and name added."""
        return [
            {**rule, "file": group["file"], "group": group["name"]}
            for group in self.api("rules")["groups"]
            for rule in group["rules"]
        ]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, probe: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
        """Poll ``probe`` until it returns something other than None or False; fail naming ``what`` after
        ``timeout_s`` (a failsafe: the waits end as soon as Prometheus has what they ask for)."""

        def alive_probe() -> T | None:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log()}")
            return probe()

        return wait_for(alive_probe, f"{what} (after {timeout_s:g} s)", timeout_s)


@contextmanager
def running_prometheus(targets: Sequence[str], rule_files: Sequence[Path], tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) every second and evaluating ``rule_files`` every second."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed: apt-get install prometheus (.ci/run installs it)")
    home = tmp_path / "prometheus"
    home.mkdir()
    config = home / "prometheus.yml"
    config.write_text(CONFIG.format(interval=INTERVAL, rule_files=[str(f) for f in rule_files], targets=list(targets)))
    port = free_port()
    log_path = home / "prometheus.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)

    def ready() -> bool:
        try:
            return httpx.get(f"{prometheus.url}/-/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        prometheus.wait_for(ready, "prometheus to start", timeout_s=PATIENCE_S)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PATIENCE_S)
