"""A tiny open_clip model built offline: random weights, a custom config, written as a local-dir folder."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {
    "size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight CLIP as an open_clip local-dir folder (config + safetensors + ttaserve.json)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG)
    # A CLIP-like temperature (the default init, 1/0.07) keeps logits in a realistic range.
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": TINY_PREPROCESS})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "ttaserve.json").write_text(
        json.dumps(
            {
                "demo": False,
                "description": "tiny random test model",
                "label_sets": {"tiny-colours": {"labels": ["red", "green", "blue"], "templates": ["a {} image."]}},
            }
        )
    )
    return folder
