"""Which model to serve: ``TTA_MODEL`` / ``TTA_PRETRAINED`` and ``TTA_DEVICE`` resolved and checked.

A model is a built-in open_clip name with a pretrained tag or a checkpoint file, ``local-dir:PATH``
(open_clip_config.json, weights and optionally a ``ttaserve.json`` model card), ``hf-hub:org/repo``, or
one the project ships (``demo``, ``demo-vit``; the default). Everything that can be checked without
reading weights is checked by ``resolve_model``, so a bad setting fails at start-up with its name;
``server.clip.backbone.load_backbone`` then loads the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch

from server.clip.card import ModelCard, read_card
from server.errors import ConfigError
from server.settings import DEMO_MODEL_DIR, Settings

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# Short names for the models the project ships (server/models/NAME).
SHIPPED_MODELS = {"demo": DEMO_MODEL_DIR, "demo-vit": DEMO_MODEL_DIR.parent / "demo-vit"}


@dataclass(frozen=True)
class ModelSpec:
    """What to load, resolved from the settings and checked before any weights are read."""

    name: str  # what open_clip.create_model receives
    pretrained: str | None
    display: str  # what /v1/models and the logs call it
    card: ModelCard = field(default_factory=ModelCard)  # the ttaserve.json of a local-dir model

    @property
    def is_demo(self) -> bool:
        return self.card.demo

    @property
    def folder(self) -> Path | None:
        """The folder of a local-dir model (where its card lives), None for other kinds."""
        return Path(self.name[len(LOCAL_DIR) :]) if self.name.startswith(LOCAL_DIR) else None


def _local_dir_spec(folder: Path, display: str) -> ModelSpec:
    if not (folder / "open_clip_config.json").is_file():
        raise ConfigError(
            f"TTA_MODEL={display}: {folder} has no open_clip_config.json; a local-dir model is a folder with "
            "open_clip_config.json (model_cfg and preprocess_cfg) and a weights file (.safetensors, .bin, .pth)."
        )
    return ModelSpec(f"{LOCAL_DIR}{folder}", None, display, read_card(folder))


def resolve_model(settings: Settings) -> ModelSpec:
    """Turn TTA_MODEL / TTA_PRETRAINED into a loadable spec, or fail with a message naming the setting."""
    model = settings.model
    if model is None:
        if not (DEMO_MODEL_DIR / "open_clip_config.json").is_file():
            raise ConfigError(
                "No model configured and the built-in demo model is missing from "
                f"{DEMO_MODEL_DIR}. Set TTA_MODEL (or --model), e.g. TTA_MODEL=ViT-B-16-quickgelu "
                "TTA_PRETRAINED=openai, or TTA_MODEL=local-dir:/path/to/model."
            )
        return _local_dir_spec(DEMO_MODEL_DIR, "demo")
    if model in SHIPPED_MODELS:
        return _local_dir_spec(SHIPPED_MODELS[model], model)
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR) :]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"TTA_MODEL={model}: no such directory {folder}")
        return _local_dir_spec(folder.resolve(), model)
    if model.startswith(HF_HUB):
        return ModelSpec(model, None, model)
    if model not in open_clip.list_models():
        raise ConfigError(
            f"TTA_MODEL={model!r} is not an open_clip model name, local-dir:PATH or hf-hub:org/repo. "
            "open_clip.list_models() lists the built-in names (OpenAI weights need the -quickgelu ones)."
        )
    pretrained = settings.pretrained
    if pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags and not Path(pretrained).expanduser().is_file():
            raise ConfigError(
                f"TTA_PRETRAINED={pretrained!r} is neither a pretrained tag of {model} ({', '.join(tags) or 'none'}) "
                "nor an existing checkpoint file (.pt or .safetensors)."
            )
        if pretrained not in tags:
            pretrained = str(Path(pretrained).expanduser().resolve())
    return ModelSpec(model, pretrained, model)


# The oldest NVIDIA driver each CUDA major version runs on (CUDA's minor-version compatibility): torch's
# CUDA 13 wheels (torch 2.14.1 from PyPI is one) need 580 or newer.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def cuda_unavailable_reason() -> str | None:
    """Why ``torch.cuda`` cannot be used here, in words for the log; None when it can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    major = int(torch.version.cuda.split(".")[0])
    needs = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    if major in MIN_DRIVER:
        needs += f", which needs an NVIDIA driver >= {MIN_DRIVER[major]}"
    try:
        torch.cuda.init()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    except (RuntimeError, AssertionError) as e:  # no driver, a driver too old, no device: torch says which
        return f"{str(e).strip().splitlines()[0]} ({needs})"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return f"torch.cuda.is_available() is false: no CUDA device is visible ({needs})"
    return None


def resolve_device(setting: str) -> torch.device:
    """TTA_DEVICE to a device: ``auto`` picks CUDA when there is one; a CUDA device that is not there fails."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"TTA_DEVICE={setting} but CUDA is not available here: {cuda_unavailable_reason()}; "
            "use TTA_DEVICE=cpu or auto."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"TTA_DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device
