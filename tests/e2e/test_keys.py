"""A real ``python -m server`` with API keys, and the Python client and ``tta`` sending them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest
from ttaserve_client import ApiError, AsyncClient, Client

from tests.support.apps import PATIENCE_S
from tests.support.images import png_bytes
from tests.support.servers import free_port, start, wait_served

ADMIN = "alice-admin-0123456789abcdef"
CLASSIFY = "alice-classify-0123456789abcdef"  # the same name: Alice's label sets, without the right to change them


def tta(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TTA_SERVER", "TTA_API_KEY")}
    if key is not None:
        env["TTA_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "ttaserve_client", *args], capture_output=True, text=True, env=env, check=False
    )


@pytest.fixture
def keyed(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Popen[str]]]:
    port = free_port()
    env = {"TTA_API_KEYS": f"alice:{CLASSIFY}", "TTA_ADMIN_API_KEYS": f"alice:{ADMIN}"}
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)  # /readyz needs no key
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(PATIENCE_S)


def test_the_client_and_tta_send_their_api_key(keyed):
    url, proc = keyed
    with Client(url) as anonymous, pytest.raises(ApiError) as refused:
        anonymous.label_sets()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")

    with Client(url, api_key=ADMIN) as admin:
        admin.create_label_set("pets", ["cat", "dog"])

    async def classify() -> str | None:
        async with AsyncClient(url, api_key=CLASSIFY) as client:
            answer = await client.classify([png_bytes()], label_set="pets")
            return answer.results[0].label

    assert asyncio.run(classify()) in {"cat", "dog"}

    listed = tta("--server", url, "--api-key", CLASSIFY, "label-sets", "list")
    assert listed.returncode == 0 and "pets" in listed.stdout, listed.stderr
    assert "pets" in tta("--server", url, "label-sets", "list", key=CLASSIFY).stdout  # TTA_API_KEY
    denied = tta("--server", url, "label-sets", "delete", "pets", key=CLASSIFY)
    assert denied.returncode == 1 and "403 forbidden" in denied.stderr and "admin key" in denied.stderr
    missing = tta("--server", url, "label-sets", "list")
    assert missing.returncode == 1 and "401 unauthorized" in missing.stderr
    assert tta("--server", url, "label-sets", "delete", "pets", key=ADMIN).returncode == 0

    proc.terminate()
    out, _ = proc.communicate(timeout=PATIENCE_S)
    assert "POST /v1/label-sets 201" in out and "key=alice" in out  # the key's name in the access log
    assert ADMIN not in out and CLASSIFY not in out  # never the key, not even in the settings logged at start


def test_a_bad_key_setting_stops_the_server_with_one_line(tiny_model_dir, tmp_path):
    secret = "k" * 12
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(free_port())], tmp_path,
                 {"TTA_ADMIN_API_KEYS": f"alice:{secret}"})  # fmt: skip
    out, _ = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 2
    assert "TTA_ADMIN_API_KEYS" in out and "at least 16" in out and "Traceback" not in out
    assert secret not in out
