"""The frozen CLIP backbone: the one module that knows open_clip.

It resolves the configured model (a built-in name with a pretrained tag or checkpoint file,
``local-dir:PATH``, ``hf-hub:org/repo``, or the built-in demo model), loads it in eval mode with
gradients off, preprocesses images, encodes them, and builds class text features by prompt
ensembling, cached in an LRU bounded in bytes. Only the engine's worker thread calls the encoding
methods; ``preprocess`` is safe from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from server.errors import ConfigError
from server.settings import DEMO_MODEL_DIR, Settings
from server.templates import render

log = logging.getLogger("ttaserve.backbone")

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# Short names for the models the project ships (server/models/NAME).
SHIPPED_MODELS = {"demo": DEMO_MODEL_DIR, "demo-vit": DEMO_MODEL_DIR.parent / "demo-vit"}
TEXT_CHUNK = 256  # prompts per text-encoder call: bounds activation memory for large label sets

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load, resolved from the settings and checked before any weights are read."""

    name: str  # what open_clip.create_model receives
    pretrained: str | None
    display: str  # what /v1/models and the logs call it
    metadata: dict[str, Any] = field(default_factory=dict)  # ttaserve.json of a local-dir model

    @property
    def is_demo(self) -> bool:
        return bool(self.metadata.get("demo"))


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "ttaserve.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _local_dir_spec(folder: Path, display: str) -> ModelSpec:
    if not (folder / "open_clip_config.json").is_file():
        raise ConfigError(
            f"TTA_MODEL={display}: {folder} has no open_clip_config.json; a local-dir model is a folder with "
            "open_clip_config.json (model_cfg and preprocess_cfg) and a weights file (.safetensors, .bin, .pth)."
        )
    return ModelSpec(f"{LOCAL_DIR}{folder}", None, display, _read_metadata(folder))


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


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TTA_DEVICE={setting} but CUDA is not available here; use TTA_DEVICE=cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"TTA_DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device


def _looks_like_download_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    words = ("download", "connection", "offline", "resolve", "huggingface", "hf_hub", "timed out", "network")
    return any(w in text for w in words)


class TextFeatureCache:
    """An LRU of class text features, bounded by the bytes its tensors hold."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[Any, ...], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: computed per request, never kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()

    def __len__(self) -> int:
        return len(self._items)


class Backbone:
    """A loaded, frozen open_clip model and what is needed to use it."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, tokenizer: Any, device: torch.device,
                 precision: str, text_cache_bytes: int):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.text_cache = TextFeatureCache(text_cache_bytes)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.preprocess_cfg = PreprocessCfg(**cfg)
        self._transform = image_transform_v2(self.preprocess_cfg, is_train=False)
        size = self.preprocess_cfg.size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
        self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        self.embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else None
        self.context_length = int(getattr(model, "context_length", 77))

    @classmethod
    def load(cls, settings: Settings, spec: ModelSpec | None = None) -> Backbone:
        """Load and freeze the model. Raises ConfigError with a way out when it cannot."""
        spec = spec or resolve_model(settings)
        device = resolve_device(settings.device)
        if settings.precision == "fp16" and device.type == "cpu":
            raise ConfigError("TTA_PRECISION=fp16 is not supported on the CPU; use fp32 or bf16.")
        if settings.hf_token is not None:
            os.environ.setdefault("HF_TOKEN", settings.hf_token.get_secret_value())
        if spec.pretrained is None and not spec.name.startswith((LOCAL_DIR, HF_HUB)):
            log.warning("TTA_MODEL=%s without TTA_PRETRAINED: random weights, predictions are meaningless", spec.name)
        try:
            model = open_clip.create_model(
                spec.name,
                pretrained=spec.pretrained,
                precision=settings.precision,
                device=device,
                cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
            )
            tokenizer = open_clip.get_tokenizer(spec.name)
        except ConfigError:
            raise
        except Exception as exc:
            if _looks_like_download_failure(exc):
                raise ConfigError(
                    f"Could not fetch the weights of {spec.display} (pretrained={spec.pretrained}): {exc}. "
                    "This machine may be offline. Put open_clip_config.json and the weights in a folder and "
                    "set TTA_MODEL=local-dir:/path/to/folder, or set TTA_PRETRAINED to a local checkpoint file."
                ) from exc
            raise ConfigError(f"Could not load TTA_MODEL={spec.display}: {type(exc).__name__}: {exc}") from exc
        model.eval()
        model.requires_grad_(False)
        return cls(spec, model, tokenizer, device, settings.precision, settings.text_cache_bytes)

    # -- images ---------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image to the model's input tensor [3, H, W] (float32, CPU)."""
        return self._transform(image)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit-norm features (float32, on the device)."""
        with torch.inference_mode():
            x = images.to(self.device, self.dtype, non_blocking=True)
            feats = self.model.encode_image(x)  # [B, D]
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    # -- text -----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[P] prompts -> [P, D] unit-norm text features (float32, on the device)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(prompts), TEXT_CHUNK):
                tokens = self.tokenizer(prompts[start : start + TEXT_CHUNK]).to(self.device)  # [p, L]
                feats = self.model.encode_text(tokens)  # [p, D]
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    def class_features(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """[C, D] class embeddings: per class, the renormalised mean of its unit-norm template features."""
        key = (self.spec.display, labels, templates)
        cached = self.text_cache.get(key)
        if cached is not None:
            return cached
        prompts = [render(t, label) for label in labels for t in templates]
        feats = self.encode_prompts(prompts).view(len(labels), len(templates), -1)  # [C, T, D]
        classes = torch.nn.functional.normalize(feats.mean(dim=1), dim=-1)  # [C, D]
        self.text_cache.put(key, classes)
        return classes

    def warm_up(self) -> None:
        """One forward pass of each tower, so the first request does not pay for lazy initialisation."""
        h, w = self.image_size
        self.encode_images(torch.zeros(1, 3, h, w))
        self.encode_prompts(["a photo of a warm-up."])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def info(self) -> dict[str, Any]:
        """What /v1/models reports about the loaded model."""
        return {
            "id": self.spec.display,
            "open_clip_name": self.spec.name,
            "pretrained": self.spec.pretrained,
            "demo": self.spec.is_demo,
            "description": self.spec.metadata.get("description"),
            "device": str(self.device),
            "precision": self.precision,
            "image_size": list(self.image_size),
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "logit_scale": self.logit_scale,
        }
