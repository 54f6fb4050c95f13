"""Logs as an operator reads them from a real process: JSON lines with TTA_LOG_FORMAT=json, and the caller's W3C
trace id carried into the records of its request."""

from __future__ import annotations

import json
import re
import signal

import httpx

from tests.support.apps import PATIENCE_S
from tests.support.images import b64, png_bytes
from tests.support.servers import free_port, start, wait_served

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
BODY = {"images": [b64(png_bytes())], "labels": ["red", "green", "blue"]}


def test_json_logs_carry_request_id_trace_and_the_access_fields(tiny_model_dir, tmp_path):
    port = free_port()
    proc = start(
        ["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path, env={"TTA_LOG_FORMAT": "json"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)
        with httpx.Client(timeout=PATIENCE_S) as client:
            ok = client.post(
                f"{url}/v1/classify", json=BODY, headers={"X-Request-ID": "j-ok", "traceparent": TRACEPARENT}
            )
            assert ok.status_code == 200
            bad_trace = "00-" + "0" * 32 + f"-{SPAN_ID}-01"  # an all-zero trace id is invalid: not carried
            refused = client.post(
                f"{url}/v1/classify",
                content=b"x",
                headers={"content-type": "text/plain", "X-Request-ID": "j-415", "traceparent": bad_trace},
            )
            assert refused.status_code == 415
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PATIENCE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PATIENCE_S)
    lines = [line for line in proc.stdout.read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's included, is one JSON object
    assert all({"time", "level", "logger", "message", "request_id"} <= r.keys() for r in records)
    assert any(r["logger"] == "uvicorn.error" for r in records)

    (access,) = [r for r in records if r["logger"] == "ttaserve.access" and r["request_id"] == "j-ok"]
    assert access["method"] == "POST" and access["path"] == "/v1/classify" and access["status"] == 200
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] > 0
    assert access["outcome"] == "success" and access["classify_method"] == "zero_shot"
    assert access["trace_id"] == TRACE_ID and access["span_id"] == SPAN_ID
    assert "key" not in access  # no API keys on this server: no key name

    of_415 = [r for r in records if r["request_id"] == "j-415"]
    assert {r["logger"] for r in of_415} == {"ttaserve.access", "ttaserve.errors"}
    assert all("trace_id" not in r for r in of_415)
    (access_415,) = [r for r in of_415 if r["logger"] == "ttaserve.access"]
    assert access_415["status"] == 415 and "outcome" not in access_415  # refused before the classify service


def test_text_logs_append_the_trace_id(served):
    url, proc = served
    headers = {"X-Request-ID": "t-ok", "traceparent": TRACEPARENT}
    r = httpx.post(f"{url}/v1/classify", json=BODY, headers=headers, timeout=PATIENCE_S)
    assert r.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(PATIENCE_S) == 0
    (line,) = [line for line in proc.stdout.read().splitlines() if "[t-ok " in line]
    assert re.search(rf"POST /v1/classify 200 [0-9.]+ ms trace_id={TRACE_ID}$", line), line
