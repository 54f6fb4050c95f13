"""Class text is tokenized off the engine's lanes and encoded a chunk per zero-shot lane turn, priced by admission:
a request with a large label set not yet cached never holds the answers of everyone else."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import Backbone, load_backbone
from server.clip.backbone import TEXT_CHUNK
from server.engine.engine import LOADER_THREAD
from tests.support.apps import PATIENCE_S, metric, wait_ready, wait_until
from tests.support.images import b64, png_bytes

LANES = ("tta-zero-shot", "tta-adapt")
SMALL = {"labels": ["cat", "dog"]}
BIG = {"labels": [f"thing number {i}" for i in range(300)], "templates": ["a photo of a {}.", "art of a {}."]}


class TextHold:
    """A loader whose backbone holds the first zero-shot image batch (the plug) and the ``hold_chunk``-th turn of a
    large label set's text until the test says so, and records which threads tokenize."""

    def __init__(self, hold_chunk: int) -> None:
        self.plug_in, self.plug_gate = threading.Event(), threading.Event()
        self.chunk_in, self.chunk_gate = threading.Event(), threading.Event()
        self.hold_chunk = hold_chunk
        self.full_chunks = 0
        self.tokenized_on: set[str] = set()

    def load(self, settings: Any, spec: Any) -> Backbone:
        backbone = load_backbone(settings, spec)
        encode_images, encode_tokens, tokenize = backbone.encode_images, backbone.encode_tokens, backbone.tokenize

        def on_lane() -> bool:
            return threading.current_thread().name != LOADER_THREAD

        def images(x: torch.Tensor) -> torch.Tensor:
            if on_lane() and not self.plug_in.is_set():
                self.plug_in.set()
                self.plug_gate.wait(PATIENCE_S)
            return encode_images(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            if on_lane() and t.shape[0] == TEXT_CHUNK:  # a turn of BIG's text (SMALL's is 2 prompts)
                self.full_chunks += 1
                if self.full_chunks == self.hold_chunk:
                    self.chunk_in.set()
                    self.chunk_gate.wait(PATIENCE_S)
            return encode_tokens(t)

        def tokenizing(prompts: Any) -> torch.Tensor:
            self.tokenized_on.add(threading.current_thread().name)
            return tokenize(prompts)

        backbone.encode_images = images  # type: ignore[method-assign]
        backbone.encode_tokens = tokens  # type: ignore[method-assign]
        backbone.tokenize = tokenizing  # type: ignore[method-assign]
        return backbone


def _post(client: TestClient, body: dict[str, Any]) -> Callable[[], Any]:
    return lambda: client.post("/v1/classify", json={"images": [b64(png_bytes())], **body})


def test_a_large_label_set_is_encoded_between_other_requests_batches(settings):
    hold = TextHold(hold_chunk=2)  # BIG is 600 prompts, encoded in turns of TEXT_CHUNK (64)
    with TestClient(create_app(settings, load=hold.load)) as client, ThreadPoolExecutor(3) as pool:
        wait_ready(client)
        plug = pool.submit(_post(client, SMALL))  # also caches SMALL's classes, before the lane is held
        assert hold.plug_in.wait(PATIENCE_S)
        big = pool.submit(_post(client, BIG))
        small = pool.submit(_post(client, SMALL))
        wait_until(lambda: metric(client.get("/metrics").text, "tta_queue_depth") == 2, "both requests to queue")
        hold.plug_gate.set()
        assert hold.chunk_in.wait(PATIENCE_S), "the big label set's second chunk was never encoded"
        # The lane is held inside the big label set's second chunk: the small request was answered before it.
        answered = small.result(timeout=PATIENCE_S)
        assert answered.status_code == 200, answered.text
        assert answered.json()["results"][0]["label"] in SMALL["labels"]
        assert not big.done()
        hold.chunk_gate.set()
        r = big.result(timeout=PATIENCE_S)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["label"] in BIG["labels"]
        assert plug.result().status_code == 200
    assert hold.tokenized_on, "nothing was tokenized"
    assert not hold.tokenized_on & set(LANES), f"tokenized on a lane: {hold.tokenized_on}"


def test_text_beyond_the_budget_is_refused_while_the_lane_encodes_other_text(settings):
    settings.text_budget_s = 1e-9  # any build waits for the one being encoded
    hold = TextHold(hold_chunk=1)
    with TestClient(create_app(settings, load=hold.load)) as client, ThreadPoolExecutor(2) as pool:
        wait_ready(client)
        hold.plug_gate.set()  # no plug in this test
        big = pool.submit(_post(client, BIG))
        assert hold.chunk_in.wait(PATIENCE_S)  # the lane is encoding BIG's text
        other = {"labels": [f"other thing {i}" for i in range(300)], "templates": BIG["templates"]}
        refused = _post(client, other)()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "text_queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        small = _post(client, SMALL)()  # little text, yet over this tiny budget while BIG's is encoded
        assert small.status_code == 429
        hold.chunk_gate.set()
        assert big.result(timeout=PATIENCE_S).status_code == 200
        assert _post(client, other)().status_code == 200  # the lane is idle again: any build is taken


def test_an_adaptation_request_past_its_deadline_stops_encoding_its_labels_text(settings):
    hold = TextHold(hold_chunk=1)
    hold.plug_gate.set()
    adapt = {"method": "zero", "options": {"views": 4}}
    with TestClient(create_app(settings, load=hold.load)) as client, ThreadPoolExecutor(1) as pool:
        wait_ready(client)
        body = {"images": [b64(png_bytes())], **BIG, **adapt}
        late = pool.submit(client.post, "/v1/classify", json=body, headers={"X-Request-Timeout": "1"})
        assert hold.chunk_in.wait(PATIENCE_S)  # the adaptation lane encodes BIG's first turn, held there
        r = late.result(timeout=PATIENCE_S)
        assert r.status_code == 504, r.text
        turns = hold.full_chunks
        hold.chunk_gate.set()
        ok = client.post("/v1/classify", json={"images": [b64(png_bytes())], **SMALL, **adapt})
        assert ok.status_code == 200, ok.text  # the lane is free again
        assert hold.full_chunks == turns  # BIG's remaining text was never encoded: its caller was gone
