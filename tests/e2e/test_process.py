"""The real thing: ``python -m server`` in its own process, spoken to over loopback HTTP."""

from __future__ import annotations

import signal
import sqlite3

import httpx
import pytest

from tests.support.apps import PATIENCE_S
from tests.support.images import png_bytes
from tests.support.servers import free_port, start, wait_served


def test_classify_over_loopback_then_shut_down_cleanly(served):
    url, proc = served
    files = [("image", ("a.png", png_bytes(seed=1), "image/png")), ("image", ("b.png", png_bytes(), "image/png"))]
    r = httpx.post(
        f"{url}/v1/classify",
        files=files,
        data={"labels": ["red", "green", "blue"], "top_k": "2"},
        headers={"X-Request-ID": "e2e-1"},
        timeout=PATIENCE_S,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "e2e-1"
    assert [len(res["predictions"]) for res in r.json()["results"]] == [2, 2]
    r = httpx.post(f"{url}/v1/classify", content=b"x" * 100, headers={"content-type": "image/png"}, timeout=PATIENCE_S)
    assert r.status_code == 415
    metrics = httpx.get(f"{url}/metrics", timeout=PATIENCE_S).text
    assert 'tta_requests_total{method="zero_shot",outcome="success"} 1.0' in metrics
    proc.send_signal(signal.SIGTERM)
    # uvicorn drains, runs the lifespan's shutdown, then re-raises the signal for the supervisor to see.
    assert proc.wait(PATIENCE_S) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "Application shutdown complete" in log
    assert "effective configuration" in log and "[e2e-1 -]" in log


def test_label_sets_survive_a_process_restart(tiny_model_dir, tmp_path):
    for round_ in range(2):
        port = free_port()
        proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_served(url, proc)
            if round_ == 0:
                created = httpx.post(
                    f"{url}/v1/label-sets", json={"name": "kept", "labels": ["a", "b"]}, timeout=PATIENCE_S
                )
                assert created.status_code == 201
            else:
                assert httpx.get(f"{url}/v1/label-sets/kept", timeout=PATIENCE_S).json()["labels"] == ["a", "b"]
        finally:
            proc.terminate()
            proc.wait(PATIENCE_S)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--model", "ViT-Nonexistent-1"], "TTA_MODEL"),
        (["--default-method", "nope"], "TTA_DEFAULT_METHOD"),
        (["--default-templates", "nope"], "TTA_DEFAULT_TEMPLATES"),
    ],
)
def test_a_bad_setting_exits_at_once_naming_it(tmp_path, tiny_model_dir, flags, setting):
    proc = start(["--model", f"local-dir:{tiny_model_dir}", *flags], tmp_path)
    assert proc.wait(PATIENCE_S) == 2
    assert setting in proc.stdout.read()


def test_env_settings_are_used_and_secrets_masked(tiny_model_dir, tmp_path):
    port = free_port()
    proc = start(
        [],
        tmp_path,
        env={"TTA_MODEL": f"local-dir:{tiny_model_dir}", "TTA_PORT": str(port), "TTA_HF_TOKEN": "hf_do_not_print"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)
    finally:
        proc.terminate()
        proc.wait(PATIENCE_S)
    log = proc.stdout.read()
    assert '"hf_token": "***"' in log and "hf_do_not_print" not in log


def test_weights_that_fail_to_load_end_the_process(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    (broken / "open_clip_model.safetensors").write_bytes(b"this is not a safetensors file")
    proc = start(["--model", f"local-dir:{broken}", "--port", str(free_port())], tmp_path)
    assert proc.wait(PATIENCE_S) == 1
    assert "could not be loaded" in proc.stdout.read()


def test_preload_only_loads_and_exits(tiny_model_dir, tmp_path):
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--preload-only"], tmp_path)
    assert proc.wait(PATIENCE_S) == 0
    assert "preloaded" in proc.stdout.read()


def test_a_data_directory_from_a_newer_server_exits_at_once_naming_it(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "ttaserve.db") as db:
        db.execute("PRAGMA user_version = 999")
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(free_port())], tmp_path)
    assert proc.wait(PATIENCE_S) == 2
    assert "TTA_DATA_DIR" in proc.stdout.read()


def test_a_data_directory_that_cannot_be_written_exits_at_once_naming_it(tmp_path, tiny_model_dir):
    # Not chmod: tests may run as root, whom no mode stops. A regular file where a folder must be created
    # fails the same way a read-only mount does: the store cannot be opened.
    (tmp_path / "blocked").write_text("a file, not a directory")
    proc = start(
        ["--model", f"local-dir:{tiny_model_dir}", "--port", str(free_port())],
        tmp_path,
        env={"TTA_DATA_DIR": str(tmp_path / "blocked" / "data")},
    )
    assert proc.wait(PATIENCE_S) == 2
    out = proc.stdout.read()
    assert "cannot open the store" in out and "TTA_DATA_DIR must be a writable directory" in out, out
    assert "Traceback" not in out, out
