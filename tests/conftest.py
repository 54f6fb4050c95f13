"""Shared fixtures: a tiny open_clip model built offline, and apps/servers running it.

Tests under tests/unit, tests/integration and tests/e2e get the marker of their folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from server.app import create_app
from server.settings import Settings

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in ("unit", "integration", "e2e"):
            if folder in parts:
                item.add_marker(getattr(pytest.mark, folder))


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight CLIP as an open_clip local-dir folder (config + safetensors)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG)
    # A CLIP-like temperature (the default init, 1/0.07) keeps logits in a realistic range.
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": TINY_PREPROCESS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "ttaserve.json").write_text(json.dumps({
        "demo": False, "description": "tiny random test model",
        "label_sets": {"tiny-colours": {"labels": ["red", "green", "blue"], "templates": ["a {} image."]}},
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(model=f"local-dir:{tiny_model_dir}", data_dir=tmp_path / "data", device="cpu",
                    max_batch_delay_ms=2.0, _env_file=None)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"server not ready: {client.get('/readyz').json()}")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c
