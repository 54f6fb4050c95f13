"""A trained adapter as a file: its parameters and its card, in one safetensors file.

Few-shot adapters (issue 16) are trained once, off the request path (``adapters.fewshot.train``), kept in
the registry and applied to the frozen model at request time; the model itself never changes. An
adapter is made of parts, each acting on one side of the frozen model:

- ``prompt``: a learned text context (CoOp; APEX's shallow text prompt), ``prompt.ctx`` [n_ctx, W],
  spliced in place of ``ctx_init``'s token embeddings (``prompt.ctx_init``): each class is encoded
  as ``"{ctx} {label}."`` by the text tower.
- ``text_adapter``: APEX's affine map of each class text embedding, ``t W + b`` then renormalized,
  ``text.weight`` [D, D] (starts at the identity) and ``text.bias`` [D] (starts at zero).
- ``lora``: low-rank factors on the vision tower's q and v projections at TTL's targets
  (``Backbone.lora_targets``), ``lora.{i}.a`` [r, in] and ``lora.{i}.b`` [out, r]; or, once merged,
  the full update ``lora.{i}.delta`` [out, in] (a merge is computed on full weight updates, never on
  the factors separately).

``TYPES`` names the combinations a training job offers. APEX pairs its text adapter with deep visual
prompts, which need a ViT's blocks rewritten; ours pairs it with visual LoRA, which the backbone already
runs functionally for TTL and which works on the ResNet towers too.

Every adapter also keeps what routing and APEX's class-distance ensemble need: the training labels'
frozen text embeddings (``label_features`` [C, D]) and ConDU's per-class prototypes (``prototypes``
[C, D]; a zero row for a label it saw no image of: it was trained against it, not on it). The card
(type, base model fingerprint, labels, training settings, metrics) travels in the file's metadata, so an
artifact is one file that can be uploaded as it is.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adapters.lowrank import LoraFactors, LoraTargets

FORMAT = 1  # the artifact layout this code writes and reads
CARD_KEY = "ttaserve.adapter"  # the safetensors metadata entry holding the card's JSON
PARTS = ("prompt", "text_adapter", "lora")
TYPES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "apex": ("text_adapter", "lora"),
    "lora": ("lora",),
}
MAX_HEADER_BYTES = 16 * 2**20


class ArtifactError(ValueError):
    """The bytes are not an adapter artifact this server can read; the message says why."""


class WrongBaseModel(ValueError):
    """The adapter was trained on another model than the one served."""

    def __init__(self, adapter: str, served: str):
        super().__init__(
            f"the adapter was made for base model {adapter}, but this server runs base model {served}; "
            "train it again on this model"
        )
        self.adapter, self.served = adapter, served


@dataclass(frozen=True)
class AdapterCard:
    """What an adapter is, what it was trained on, and how well it did."""

    type: str  # a key of TYPES, or "merged" for a merge's unified adapter
    parts: tuple[str, ...]  # which of PARTS it holds
    base_model: str  # the fingerprint of the frozen model it was trained on (``Backbone.fingerprint``)
    labels: tuple[str, ...]  # the training label names, in the order of label_features and prototypes
    ctx_init: str | None = None  # the text the prompt context started from (prompt part)
    lora_alpha: float = 32.0  # delta_W = (lora_alpha / r) * B @ A (lora part, factored)
    training: dict[str, Any] = field(default_factory=dict)  # steps, learning rate, seed, anchors, shots
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. support accuracy before and after
    created_at: float = field(default_factory=time.time)
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterCard:
        try:
            raw = json.loads(text)
            raw["parts"], raw["labels"] = tuple(raw["parts"]), tuple(raw["labels"])
            card = cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"the adapter card is not readable: {exc}") from exc
        if card.format != FORMAT:
            raise ArtifactError(f"adapter format {card.format} is not {FORMAT}, the one this server reads")
        unknown = sorted(set(card.parts) - set(PARTS))
        if unknown or not card.parts:
            raise ArtifactError(f"unknown adapter part(s) {unknown}; known: {', '.join(PARTS)}")
        return card


@dataclass(eq=False)
class Adapter:
    """An adapter's card and tensors (float32, CPU). Immutable by convention: never modify a loaded one."""

    card: AdapterCard
    tensors: dict[str, torch.Tensor]
    _lora: dict[LoraTargets, LoraFactors] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check()

    # -- checks -----------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ArtifactError unless the tensors are those the card's parts need, with shapes that agree."""
        t, card = self.tensors, self.card
        need = ["label_features", "prototypes"]
        if "prompt" in card.parts:
            need += ["prompt.ctx", "prompt.ctx_init"]
        if "text_adapter" in card.parts:
            need += ["text.weight", "text.bias"]
        missing = [name for name in need if name not in t]
        if missing:
            raise ArtifactError(f"the adapter lacks tensor(s) {', '.join(missing)} its parts ({card.parts}) need")
        n, dim = t["label_features"].shape if t["label_features"].dim() == 2 else (-1, -1)
        if n != len(card.labels) or tuple(t["prototypes"].shape) != (n, dim):
            raise ArtifactError(
                f"label_features {tuple(t['label_features'].shape)} and prototypes {tuple(t['prototypes'].shape)} "
                f"must both be [{len(card.labels)}, D], one row per training label"
            )
        if "text_adapter" in card.parts and (
            tuple(t["text.weight"].shape) != (dim, dim) or tuple(t["text.bias"].shape) != (dim,)
        ):
            raise ArtifactError(f"text.weight must be [{dim}, {dim}] and text.bias [{dim}]")
        if "prompt" in card.parts and t["prompt.ctx"].shape != t["prompt.ctx_init"].shape:
            raise ArtifactError("prompt.ctx and prompt.ctx_init must have the same shape [n_ctx, W]")
        if "lora" in card.parts and not self.lora_indices():
            raise ArtifactError("the lora part has no lora.{i}.a/.b or lora.{i}.delta tensors")
        for name, tensor in t.items():
            if not torch.isfinite(tensor).all():
                raise ArtifactError(f"tensor {name} holds NaN or infinite values")

    def check_base(self, fingerprint: str) -> None:
        """Raise WrongBaseModel unless the adapter was trained on the model with ``fingerprint``."""
        if self.card.base_model != fingerprint:
            raise WrongBaseModel(self.card.base_model, fingerprint)

    # -- the parts --------------------------------------------------------------------------------
    def lora_indices(self) -> list[int]:
        found = {int(name.split(".")[1]) for name in self.tensors if name.startswith("lora.")}
        return sorted(found)

    @property
    def lora_dense(self) -> bool:
        """Whether the lora part holds full updates (a merge's) rather than factors."""
        return any(name.endswith(".delta") for name in self.tensors if name.startswith("lora."))

    def lora_factors(self, targets: LoraTargets) -> LoraFactors:
        """The lora part as factors the backbone runs (``Backbone.vision_suffix``).

        A full update delta [out, in] runs as B = delta, A = identity [in, in], alpha = in (scaling 1):
        the same update, exactly. Built once per targets and kept: a served adapter's factors (a merged
        one's identities included) are not rebuilt for every request."""
        found = self._lora.get(targets)
        if found is not None:
            return found
        idx = self.lora_indices()
        if len(idx) != len(targets):
            raise ArtifactError(
                f"the adapter has LoRA on {len(idx)} projections, this model's targets are {len(targets)}"
            )
        if self.lora_dense:
            b = tuple(self.tensors[f"lora.{i}.delta"] for i in idx)
            with torch.inference_mode(False):  # kept across requests: a normal tensor, whatever mode builds it
                a = tuple(torch.eye(t.in_features, device=d.device) for t, d in zip(targets.targets, b, strict=True))
            factors = LoraFactors(targets, a, b, float(targets.targets[0].in_features))
        else:
            a = tuple(self.tensors[f"lora.{i}.a"] for i in idx)
            b = tuple(self.tensors[f"lora.{i}.b"] for i in idx)
            factors = LoraFactors(targets, a, b, self.card.lora_alpha)
        self._lora[targets] = factors
        return factors

    def adapt_text(self, class_features: torch.Tensor) -> torch.Tensor:
        """APEX's text adapter on unit-norm class features [C, D] -> [C, D] unit-norm (identity without it)."""
        if "text_adapter" not in self.card.parts:
            return class_features
        w, b = self.tensors["text.weight"].to(class_features), self.tensors["text.bias"].to(class_features)
        return F.normalize(class_features @ w + b, dim=-1)

    # -- full-weight updates, for merging -----------------------------------------------------------
    def deltas(self) -> dict[str, torch.Tensor]:
        """Every trained parameter as its update from the adapter's starting point (zero: the frozen model).

        Keys: ``prompt.ctx`` (ctx - ctx_init), ``text.weight`` (W - I), ``text.bias``, ``lora.{i}``
        ((alpha / r) B A, the full [out, in] update). Merging acts on these."""
        t, out = self.tensors, {}
        if "prompt" in self.card.parts:
            out["prompt.ctx"] = t["prompt.ctx"] - t["prompt.ctx_init"]
        if "text_adapter" in self.card.parts:
            w = t["text.weight"]
            out["text.weight"] = w - torch.eye(w.shape[0], dtype=w.dtype)
            out["text.bias"] = t["text.bias"].clone()
        if "lora" in self.card.parts:
            for i in self.lora_indices():
                if self.lora_dense:
                    out[f"lora.{i}"] = t[f"lora.{i}.delta"].clone()
                else:
                    a, b = t[f"lora.{i}.a"], t[f"lora.{i}.b"]
                    out[f"lora.{i}"] = (self.card.lora_alpha / a.shape[0]) * b @ a
        return out

    @classmethod
    def from_deltas(
        cls, card: AdapterCard, deltas: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> Adapter:
        """An adapter whose parameters are the starting point plus ``deltas`` (the inverse of ``deltas``).

        ``common`` holds what is not a trained update: ``label_features``, ``prototypes`` and, with a
        prompt part, ``prompt.ctx_init``. The lora part comes out full (``lora.{i}.delta``)."""
        tensors = {k: v.detach().float().clone() for k, v in common.items()}
        for key, d in deltas.items():
            d = d.detach().float()
            if key == "prompt.ctx":
                tensors["prompt.ctx"] = tensors["prompt.ctx_init"] + d
            elif key == "text.weight":
                tensors["text.weight"] = torch.eye(d.shape[0]) + d
            elif key == "text.bias":
                tensors["text.bias"] = d.clone()
            elif key.startswith("lora."):
                tensors[f"{key}.delta"] = d.clone()
            else:
                raise ArtifactError(f"unknown update {key!r}")
        return cls(card, tensors)

    # -- bytes ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.tensors.items()}
        return bytes(save_tensors(tensors, metadata={CARD_KEY: self.card.to_json()}))

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        """Read an artifact; raise ArtifactError, saying why, for anything else."""
        if len(data) < 8:
            raise ArtifactError("the file is too short to be a safetensors adapter artifact")
        (size,) = struct.unpack("<Q", data[:8])
        if size > MAX_HEADER_BYTES or 8 + size > len(data):
            raise ArtifactError("the file is not a safetensors adapter artifact (bad header length)")
        try:
            header = json.loads(data[8 : 8 + size])
            meta = header.get("__metadata__") or {}
        except (ValueError, AttributeError) as exc:
            raise ArtifactError(f"the safetensors header is not readable: {exc}") from exc
        if CARD_KEY not in meta:
            raise ArtifactError(f"the safetensors file has no {CARD_KEY!r} metadata: it is not an adapter artifact")
        card = AdapterCard.from_json(meta[CARD_KEY])
        try:
            tensors = {k: v.float() for k, v in load_tensors(data).items()}
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise ArtifactError(f"the tensors are not readable: {exc}") from exc
        return cls(card, tensors)


def prototypes(image_features: torch.Tensor, targets: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """ConDU's class prototypes from the frozen model: per class, the normalized mean of (the mean of its
    unit-norm image features, its unit-norm text feature).

    image_features [N, D] unit-norm, targets [N] class indices, text_features [C, D] unit-norm -> [C, D].
    A class without images gets a zero row: the adapter never saw it, so routing must not send images of
    it there (two adapters trained against one label set would otherwise share those prototypes, and tie)."""
    n_classes, dim = text_features.shape
    sums = torch.zeros(n_classes, dim, dtype=image_features.dtype).index_add_(0, targets, image_features)
    counts = torch.bincount(targets, minlength=n_classes).unsqueeze(1).to(image_features)
    image_mean = F.normalize(sums / counts.clamp_min(1), dim=-1)
    merged = F.normalize((image_mean + text_features) / 2, dim=-1)
    return torch.where(counts > 0, merged, torch.zeros_like(merged))


def seen(prototypes_: torch.Tensor) -> torch.Tensor:
    """[C] bool: the classes an adapter saw images of (a non-zero prototype)."""
    return prototypes_.abs().sum(dim=-1) > 0


def route_scores(image_features: torch.Tensor, prototypes_: torch.Tensor) -> torch.Tensor:
    """ConDU's routing score of images [N, D] against one adapter's prototypes [C, D]: the max cosine over the
    classes it saw images of, [N]; -1 (no image is routed there) for an adapter that saw none."""
    kept = prototypes_[seen(prototypes_)]
    if math.prod(kept.shape) == 0:
        return torch.full((image_features.shape[0],), -1.0, device=image_features.device)
    return (image_features @ kept.to(image_features).T).max(dim=-1).values
