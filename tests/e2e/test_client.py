"""The Python client as a user gets it: its wheel, in a fresh virtual environment without torch, running
its own tests (clients/python/tests: every method sync and async, retries) against a live server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.support.servers import ROOT

CLIENT = ROOT / "clients" / "python"


def run(args: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


def test_the_client_wheel_installs_without_torch_and_passes_its_tests_against_a_live_server(served, tmp_path):
    url, _ = served
    wheels, source = tmp_path / "wheels", tmp_path / "source"  # built from a copy: no build/ in the checkout
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source])
    (wheel,) = wheels.glob("ttaserve_client-*.whl")
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", f"{wheel}[cli]", "pytest"])
    installed = run([python, "-m", "pip", "list", "--format", "freeze"]).stdout.lower()
    assert "ttaserve-client==0.1.0" in installed or "ttaserve_client==0.1.0" in installed
    assert not {"torch", "numpy", "pillow", "ttaserve"} & {line.split("==")[0] for line in installed.splitlines()}

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"TTASERVE_URL": url}
    tests = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=CLIENT, env=env)
    assert " passed" in tests.stdout and "failed" not in tests.stdout and "skipped" not in tests.stdout, tests.stdout
    # The tests ran the wheel's code, not the checkout's.
    where = run([python, "-c", "import ttaserve_client; print(ttaserve_client.__file__)"], cwd=tmp_path, env=env)
    assert str(fresh) in where.stdout

    methods = run([fresh / "bin" / "tta", "--server", url, "methods"], env=env)
    assert "zero_shot" in methods.stdout
