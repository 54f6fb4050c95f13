"""The README tells the truth: its curl examples work against the default server, its table lists every setting."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from server.settings import DEMO_MODEL_DIR, Settings
from tests.support.apps import PATIENCE_S
from tests.support.servers import ROOT, free_port, start, wait_served

README = (ROOT / "README.md").read_text()


def curl_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [b for b in blocks if b.lstrip().startswith(("# ", "curl")) and "curl" in b]


def test_every_setting_is_in_the_configuration_table():
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert f"| `TTA_{name.upper()}` | `{flag}` |" in README, name


def test_every_error_code_raised_in_the_server_is_documented():
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    codes = set(re.findall(r'code="([a-z_]+)"', source))
    missing = sorted(c for c in codes if f"`{c}`" not in README)
    assert not missing, missing


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.skipif(not (DEMO_MODEL_DIR / "open_clip_config.json").is_file(), reason="demo model not shipped")
def test_readme_curl_examples_work_against_the_default_server(tmp_path):
    port = free_port()
    proc = start(["--port", str(port)], tmp_path)  # no model: the built-in demo model
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)
        blocks = curl_blocks()
        assert len(blocks) >= 3
        for block in blocks:
            script = block.replace("localhost:8000", f"127.0.0.1:{port}")
            out = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE_S
            )
            assert out.returncode == 0, f"{block}\n{out.stdout}\n{out.stderr}"
            bodies = [json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
            for body in bodies:
                for result in body.get("results", []):
                    # The example images are named after their class; the demo model gets them right.
                    assert result["label"] in {p["label"] for p in result["predictions"]}
        multipart = subprocess.run(
            ["bash", "-c", blocks[0].replace("localhost:8000", f"127.0.0.1:{port}")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=PATIENCE_S,
        )
        labels = [r["label"] for r in json.loads(multipart.stdout)["results"]]
        assert labels == ["red star", "blue square"]
    finally:
        proc.terminate()
        proc.wait(PATIENCE_S)
