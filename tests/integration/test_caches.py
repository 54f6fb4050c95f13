"""Memory stays flat: the text caches count their keys and keep within one budget, and open_clip's tokenizer
does not remember every word it was ever sent."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api import create_app
from server.clip import backbone as backbone_module
from tests.support.apps import metric, wait_ready
from tests.support.images import b64, png_bytes


def test_the_text_caches_count_their_keys_and_stay_within_their_budget(settings):
    settings.text_cache_bytes = 256 * 1024
    image = b64(png_bytes())
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        seen = []
        for i in range(12):
            labels = [f"{i} {k} " + "long label " * 17 for k in range(100)]  # 100 labels of ~190 characters
            r = client.post("/v1/classify", json={"images": [image], "labels": labels, "templates": ["{}"]})
            assert r.status_code == 200, r.text
            seen.append(metric(client.get("/metrics").text, "tta_text_cache_bytes"))
    # One entry's labels alone hold 100 x ~190 characters: a cache counting only its features (100 x D floats)
    # would report a few kilobytes.
    assert seen[0] > 100 * 190
    assert max(seen) <= settings.text_cache_bytes  # features and prompt inputs, within the one budget
    assert seen[-1] > 3 * seen[0]  # it filled up to the budget, then evicted to stay within it


def test_the_tokenizer_forgets_words_past_its_bound(settings, monkeypatch):
    monkeypatch.setattr(backbone_module, "TOKENIZER_CACHE_WORDS", 300)
    image = b64(png_bytes())
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        tokenizer = client.app.state.runtime.engine.backbone.tokenizer
        for i in range(10):
            labels = [f"word{i}x{k}" for k in range(100)]  # 100 words it has never seen
            assert client.post("/v1/classify", json={"images": [image], "labels": labels}).status_code == 200
            assert len(tokenizer.cache) <= 300 + 100 * 5  # a request's words, beyond the bound, until it ends
        assert len(tokenizer.cache) <= 300
