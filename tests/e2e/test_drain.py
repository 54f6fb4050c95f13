"""SIGTERM drains a real ``python -m server`` process under load: the socket stays open, readiness says 503 at once,
new work is refused with Retry-After, the request in flight finishes, and the process exits 0.

The request held in flight is an upload the test itself has not finished sending: the test, as the
client, decides when it ends, so nothing depends on how fast the machine runs a model.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx

from tests.support.apps import PATIENCE_S, metric, wait_until
from tests.support.images import b64, png_bytes
from tests.support.servers import running

BODY = {"images": [b64(png_bytes(seed=3))], "labels": ["red", "green", "blue"]}


def in_flight(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=PATIENCE_S).text, "tta_http_inflight_requests")


class HeldUpload:
    """A classify request whose body is sent in two halves, the second when the test says so."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(BODY).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=PATIENCE_S)
        head = (
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"X-Request-ID: held\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        half = len(body) // 2
        self.sock.sendall(head + body[:half])
        self.rest = body[half:]

    def finish(self) -> tuple[int, dict]:
        """Send the rest of the body; the status and JSON body of the answer."""
        self.sock.sendall(self.rest)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)


class Load:
    """Threads that classify in a loop until the server refuses them; every answer is kept."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.answers: list[tuple[int, str | None, str | None]] = []  # status, error code, Retry-After
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=PATIENCE_S) as client:
                while True:
                    r = client.post(f"{self.url}/v1/classify", json=BODY)
                    code = r.json()["error"]["code"] if r.status_code != 200 else None
                    self.answers.append((r.status_code, code, r.headers.get("retry-after")))
                    if r.status_code != 200:
                        return
        except BaseException as exc:  # noqa: BLE001 - a refused connection is what the test must not see
            self.errors.append(exc)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join(PATIENCE_S)


def test_sigterm_drains_under_load_then_exits_0(tiny_model_dir, tmp_path):
    with running(tiny_model_dir, tmp_path, "--drain-timeout-s", str(PATIENCE_S), "--retry-after-s", "2") as (url, proc):
        held = HeldUpload(url)
        wait_until(lambda: in_flight(url) == 1, "the held upload to be in flight")
        load = Load(url)
        load.start()
        wait_until(lambda: sum(a[0] == 200 for a in load.answers) >= 3, "the load to be served")

        proc.send_signal(signal.SIGTERM)
        # Readiness turns 503 once the signal is handled; the socket never stops answering meanwhile.
        readiness: list[httpx.Response] = []

        def refused() -> bool:
            readiness.append(httpx.get(f"{url}/readyz", timeout=PATIENCE_S))
            return readiness[-1].status_code == 503

        wait_until(refused, "/readyz to answer 503")
        assert {r.status_code for r in readiness} <= {200, 503}
        assert readiness[-1].json()["error"]["code"] == "shutting_down"
        assert readiness[-1].headers["retry-after"] == "2"
        r = httpx.post(f"{url}/v1/classify", json=BODY, timeout=PATIENCE_S)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"] == "2"
        assert httpx.get(f"{url}/healthz", timeout=PATIENCE_S).status_code == 200  # alive, only not ready
        load.join()
        assert not load.errors, load.errors
        assert {a for a in load.answers if a[0] != 200} == {(503, "shutting_down", "2")}

        # The drain waits for the request in flight: the process is still up, and answers it in full.
        assert proc.poll() is None
        status, answer = held.finish()
        assert status == 200, answer
        assert answer["request_id"] == "held" and len(answer["results"]) == 1
        assert proc.wait(PATIENCE_S) == 0
        log = proc.stdout.read()
    assert "SIGTERM: draining" in log and "drained: no request in flight" in log, log
    assert "Application shutdown complete" in log


def test_a_drain_ends_after_its_grace_period_even_with_a_request_in_flight(tiny_model_dir, tmp_path):
    grace_s = 1.0
    with running(tiny_model_dir, tmp_path, "--drain-timeout-s", str(grace_s)) as (url, proc):
        held = HeldUpload(url)  # never finished
        wait_until(lambda: in_flight(url) == 1, "the held upload to be in flight")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PATIENCE_S) == 0
        waited = time.monotonic() - signalled
        held.sock.close()
        log = proc.stdout.read()
    assert waited >= grace_s  # it did wait for the request, for the grace period
    assert "1 request(s) still in flight after 1 s (TTA_DRAIN_TIMEOUT_S)" in log, log
