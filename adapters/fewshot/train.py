"""Few-shot adapter training with ARF's anchors, on the frozen model through ``adapters.Backbone`` only.

``train_adapter`` fits one adapter (``artifact.TYPES``: a prompt context, APEX's text adapter with
visual LoRA, or LoRA alone) on a user's labelled support images and returns it as an ``Adapter``.

The loss (ARF: Han et al., "Anchor-based Robust Finetuning of Vision-Language Models", CVPR 2024,
https://arxiv.org/abs/2404.06244; ``shared/research/seed_systems.md`` section 3 and F4):

- cross-entropy, with optional label smoothing, over the frozen logit scale times the cosine between
  the adapted image features of a batch of support images and the adapted features of every class;
- plus ``tca_weight`` times a CLIP-style symmetric InfoNCE on a batch of caption anchors (ARF's
  text-compensated anchors: the user's own captions of their images; we have no captioner);
- plus ``ita_weight`` times the same on a batch of retrieved anchors (ARF's image-text anchor
  retrieval): the pairs of the user's pool whose frozen image features are among the ``retrieve_k``
  nearest neighbours of some support image (``retrieve``).

Anchor pairs go through the same adapted sides as the classes. Images: the lora part when there is one
(frozen features otherwise). Texts: with a prompt part, each anchor text is re-encoded as
``"{ctx} {text}."`` with the learned context (its final period dropped first), so the anchors
constrain the one thing that type trains; with a text adapter, the text's frozen feature goes through
the adapter; with LoRA alone, the frozen text feature is the target. The frozen text features of
anchor texts come with the anchors (``Pairs.text_features``): the caller encodes them with the frozen
text tower, as it does its class features, which keeps training within the Backbone protocol.

How ours departs from ARF (which has no public code): ARF finetunes the whole model, we train an
adapter's few parameters; its caption anchors come from a captioner (BLIP-2), ours are the user's own
captions; its retrieval searches CC3M, ours a pool the user uploads, keyed by the support images' frozen
image features (ARF's key is not documented); its loss weights are not published, ours default to 1 and
are settings (``tca_weight``, ``ita_weight``).

Everything random (batch order, LoRA's A) comes from one generator seeded with ``config.seed``: the same
inputs and seed give the same adapter on the same machine. The support set's frozen image features give
the adapter's prototypes (``artifact.prototypes``) and its "before" accuracy; its "after" accuracy is
measured with ``adapters.fewshot.apply``, the functions that serve it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from adapters.backbone import TPT_CTX_INIT, Backbone
from adapters.base import Stopped
from adapters.common import check_range
from adapters.fewshot.apply import IMAGE_CHUNK, adapter_class_features, adapter_image_features
from adapters.fewshot.artifact import TYPES, Adapter, AdapterCard, prototypes
from adapters.lowrank import LoraFactors
from adapters.prompts import PromptInputs

MAX_TRAIN_STEPS = 100_000


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr`` and ``steps`` default to what the demo model's validation split chose for the
    default type, apex (``benchmarks/fewshot_adapters.py``, 10 shots of 4 classes); there it chose lr 3e-3
    with 75 steps for prompt and lr 3e-3 with 25 steps for lora."""

    type: str = "apex"  # a key of artifact.TYPES
    steps: int = 75
    lr: float = 3e-4  # AdamW (no weight decay), cosine decay to zero
    batch_size: int = 32  # support images per step; each anchor kind draws as many pairs
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_blocks: int = 3  # LoRA on q and v of the last lora_blocks vision blocks (Backbone.lora_targets)
    ctx_init: str = TPT_CTX_INIT  # the prompt part's starting context
    label_smoothing: float = 0.0
    tca_weight: float = 1.0  # caption anchors (ARF's text-compensated anchors)
    ita_weight: float = 1.0  # retrieved anchors (ARF's image-text anchor retrieval)
    retrieve_k: int = 4  # pool pairs retrieved per support image (then deduplicated)

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"type must be one of {', '.join(TYPES)}, got {self.type!r}")
        for name in ("steps", "batch_size", "seed", "lora_rank", "lora_blocks", "retrieve_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        check_range("steps", self.steps, 1, MAX_TRAIN_STEPS)
        if not (isinstance(self.lr, float | int) and 0 < self.lr <= 10):
            raise ValueError(f"lr must be above 0 and at most 10, got {self.lr!r}")
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_range("lora_rank", self.lora_rank, 1, 256)
        if not (isinstance(self.lora_alpha, float | int) and 0 < self.lora_alpha <= 1e4):
            raise ValueError(f"lora_alpha must be above 0 and at most 10000, got {self.lora_alpha!r}")
        check_range("lora_blocks", self.lora_blocks, 1, 64)
        if not isinstance(self.ctx_init, str) or not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty text, e.g. 'a photo of a'")
        for name in ("label_smoothing", "tca_weight", "ita_weight"):
            if not isinstance(getattr(self, name), float | int):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be at least 0 and below 1, got {self.label_smoothing!r}")
        check_range("tca_weight", self.tca_weight, 0, 100)
        check_range("ita_weight", self.ita_weight, 0, 100)
        check_range("retrieve_k", self.retrieve_k, 0, 1000)


@dataclass(frozen=True, eq=False)
class Pairs:
    """Image-text pairs: preprocessed images [M, 3, H, W], their texts, and the texts' frozen unit-norm
    features [M, D] (the frozen text tower's, as the caller encodes class prompts)."""

    images: torch.Tensor
    texts: tuple[str, ...]
    text_features: torch.Tensor

    def __post_init__(self) -> None:
        m = len(self.texts)
        if self.images.dim() != 4 or self.images.shape[0] != m:
            raise ValueError(f"anchor images have shape {tuple(self.images.shape)}; expected [{m}, 3, H, W]")
        if self.text_features.dim() != 2 or self.text_features.shape[0] != m:
            raise ValueError(f"anchor text_features have shape {tuple(self.text_features.shape)}; expected [{m}, D]")
        if any(not t.strip() for t in self.texts):
            raise ValueError("anchor texts must not be empty")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: torch.Tensor) -> Pairs:
        return Pairs(self.images[index], tuple(self.texts[int(i)] for i in index), self.text_features[index])


@dataclass(frozen=True, eq=False)
class Anchors:
    """ARF's anchors: ``captions`` (the user's captions of their own images) are all used; ``pool`` is
    where ``retrieve`` draws the pairs nearest the support images from."""

    captions: Pairs | None = None
    pool: Pairs | None = None


def retrieve(query_features: torch.Tensor, pool_features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the pool items among the ``k`` nearest (cosine) of any query, each once.

    query_features [N, D], pool_features [P, D], both unit-norm -> [<= N * k] int64, in the order
    query 0's neighbours nearest first, then query 1's new ones, and so on."""
    if k <= 0 or pool_features.shape[0] == 0 or query_features.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    sims = query_features.float().cpu() @ pool_features.float().cpu().T  # [N, P]
    nearest = sims.topk(min(k, sims.shape[1]), dim=1).indices  # [N, k]
    seen: dict[int, None] = dict.fromkeys(int(i) for i in nearest.flatten())
    return torch.tensor(list(seen), dtype=torch.long)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over M matched pairs [M, D] x [M, D] (pair i is image i with text i)."""
    logits = scale * image_features @ text_features.T  # [M, M]
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into n items: shuffled epochs, drawn from ``generator``."""
    size = min(size, n)
    order = torch.zeros(0, dtype=torch.long)
    while True:
        while order.numel() < size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:size]
        order = order[size:]


def _rows(inputs: PromptInputs, index: torch.Tensor) -> PromptInputs:
    """Some of a label set's prompts, as ``prompt_inputs`` of just those labels would give them (padded)."""
    idx = index.to(inputs.eot.device)
    return PromptInputs(
        labels=tuple(inputs.labels[int(i)] for i in index),
        prefix=inputs.prefix[idx],
        ctx_init=inputs.ctx_init,
        suffix=inputs.suffix[idx],
        eot=inputs.eot[idx],
        tokens=inputs.tokens[idx],
    )


def _encode(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([backbone.encode_images(chunk) for chunk in torch.split(images, IMAGE_CHUNK)])


def _accuracy(image_features: torch.Tensor, class_features: torch.Tensor, targets: torch.Tensor) -> float:
    pred = (image_features @ class_features.T).argmax(dim=1).cpu()
    return float((pred == targets.cpu()).float().mean())


def _check_inputs(images: torch.Tensor, targets: torch.Tensor, labels: tuple[str, ...], cf: torch.Tensor) -> None:
    if not labels or len(set(labels)) != len(labels):
        raise ValueError("labels must be a non-empty list of distinct names")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"support images have shape {tuple(images.shape)}; expected [N, 3, H, W] with N >= 1")
    if targets.shape != (images.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 [{images.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if int(targets.min()) < 0 or int(targets.max()) >= len(labels):
        raise ValueError(f"targets must index the {len(labels)} labels")
    if cf.dim() != 2 or cf.shape[0] != len(labels):
        raise ValueError(f"class_features have shape {tuple(cf.shape)}; expected [{len(labels)}, D]")


def train_adapter(
    backbone: Backbone,
    images: torch.Tensor,
    targets: torch.Tensor,
    labels: tuple[str, ...],
    class_features: torch.Tensor,
    config: TrainConfig,
    *,
    base_model: str,
    anchors: Anchors | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Adapter:
    """Train an adapter of ``config.type`` on support ``images`` [N, 3, H, W] labelled ``targets`` [N]
    (indices into ``labels``), against ``class_features`` [C, D], the frozen unit-norm features of
    ``labels``; the card records ``base_model`` (the backbone's fingerprint).

    ``progress(step, steps, loss, elapsed_s)`` is called after every step; ``stop()`` is checked before
    each and raises ``adapters.Stopped`` when it returns True. Raises ValueError for inputs that do
    not fit together, ``UnsupportedModel`` when the model cannot take the adapter's parts."""
    labels = tuple(labels)
    _check_inputs(images, targets, labels, class_features)
    started = time.monotonic()
    parts = TYPES[config.type]
    device, scale = backbone.device, backbone.logit_scale
    generator = torch.Generator().manual_seed(config.seed)
    targets = targets.cpu()
    class_features = class_features.detach().to(device, torch.float32)

    frozen = _encode(backbone, images)  # [N, D] the support set's frozen features
    anchors = anchors or Anchors()
    kinds: list[tuple[str, Pairs, float]] = []
    if anchors.captions is not None and len(anchors.captions) and config.tca_weight > 0:
        kinds.append(("tca", anchors.captions, config.tca_weight))
    retrieved = 0
    if anchors.pool is not None and len(anchors.pool) and config.ita_weight > 0 and config.retrieve_k > 0:
        chosen = retrieve(frozen, _encode(backbone, anchors.pool.images), config.retrieve_k)
        retrieved = int(chosen.numel())
        kinds.append(("ita", anchors.pool.select(chosen), config.ita_weight))

    # The trainable parameters, each at the point where the adapter equals the frozen model.
    params: list[torch.Tensor] = []
    lora: LoraFactors | None = None
    if "lora" in parts:
        lora_targets = backbone.lora_targets(config.lora_blocks)
        lora = LoraFactors.init(lora_targets, config.lora_rank, config.lora_alpha, generator=generator, device=device)
        params += lora.parameters()
    ctx: torch.Tensor | None = None
    class_inputs: PromptInputs | None = None
    anchor_inputs: list[PromptInputs | None] = [None] * len(kinds)
    if "prompt" in parts:
        class_inputs = backbone.prompt_inputs(labels, config.ctx_init)
        ctx = class_inputs.ctx_init.detach().clone().to(device).requires_grad_(True)
        params.append(ctx)
        anchor_inputs = [
            backbone.prompt_inputs(tuple(t.strip().rstrip(".").strip() or t for t in pairs.texts), config.ctx_init)
            for _, pairs, _ in kinds
        ]
    weight = bias = None
    if "text_adapter" in parts:
        dim = class_features.shape[1]
        weight = torch.eye(dim, device=device).requires_grad_(True)
        bias = torch.zeros(dim, device=device).requires_grad_(True)
        params += [weight, bias]

    def image_side(source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Adapted features of some of ``source``'s images, by index (the frozen ones without LoRA)."""
        if lora is None:
            feats = _encode(backbone, source)
            return lambda idx: feats[idx.to(device)]
        prefix = torch.cat([backbone.vision_prefix(c, lora.targets) for c in torch.split(source, IMAGE_CHUNK)])
        return lambda idx: backbone.vision_suffix(prefix[idx.to(device)], lora)

    def text_side(frozen_text: torch.Tensor, inputs: PromptInputs | None, idx: torch.Tensor) -> torch.Tensor:
        feats = frozen_text.detach().to(device, torch.float32)[idx.to(device)]
        if ctx is not None and inputs is not None:
            feats = backbone.encode_text_with_contexts(ctx[None], [_rows(inputs, idx)])[0]
        if weight is not None and bias is not None:
            feats = F.normalize(feats @ weight + bias, dim=-1)
        return feats

    support_images = image_side(images)
    anchor_images = [image_side(pairs.images) for _, pairs, _ in kinds]
    streams = [_batches(images.shape[0], config.batch_size, generator)]
    streams += [_batches(len(pairs), config.batch_size, generator) for _, pairs, _ in kinds]
    all_classes = torch.arange(len(labels))

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
    )
    loss_value = float("nan")
    with torch.enable_grad():
        for step in range(config.steps):
            if stop is not None and stop():
                raise Stopped(f"training stopped after {step} of {config.steps} steps")
            idx = next(streams[0])
            img = support_images(idx)  # [B, D]
            cls = text_side(class_features, class_inputs, all_classes)  # [C, D]
            loss = F.cross_entropy(scale * img @ cls.T, targets[idx].to(device), label_smoothing=config.label_smoothing)
            for k, (_, pairs, w) in enumerate(kinds):
                a_idx = next(streams[k + 1])
                a_img = anchor_images[k](a_idx)
                a_txt = text_side(pairs.text_features, anchor_inputs[k], a_idx)
                loss = loss + w * clip_loss(a_img, a_txt, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step + 1, config.steps, loss_value, time.monotonic() - started)

    tensors: dict[str, torch.Tensor] = {
        "label_features": class_features.cpu().clone(),
        "prototypes": prototypes(frozen.cpu(), targets, class_features.cpu()),
    }
    if ctx is not None and class_inputs is not None:
        tensors["prompt.ctx"] = ctx.detach().float().cpu().clone()
        tensors["prompt.ctx_init"] = class_inputs.ctx_init.detach().float().cpu().clone()
    if weight is not None and bias is not None:
        tensors["text.weight"], tensors["text.bias"] = weight.detach().cpu().clone(), bias.detach().cpu().clone()
    if lora is not None:
        for i, (a, b) in enumerate(zip(lora.a, lora.b, strict=True)):
            tensors[f"lora.{i}.a"], tensors[f"lora.{i}.b"] = a.detach().cpu().clone(), b.detach().cpu().clone()
    card = AdapterCard(
        type=config.type,
        parts=parts,
        base_model=base_model,
        labels=labels,
        ctx_init=config.ctx_init if "prompt" in parts else None,
        lora_alpha=float(config.lora_alpha),
        training={
            **asdict(config),
            "shots": int(images.shape[0]),
            "shots_per_class": torch.bincount(targets, minlength=len(labels)).tolist(),
            "caption_anchors": len(anchors.captions) if anchors.captions is not None else 0,
            "pool_size": len(anchors.pool) if anchors.pool is not None else 0,
            "retrieved_anchors": retrieved,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    adapter = Adapter(card, tensors)
    after_images = adapter_image_features(backbone, adapter, images)
    after_classes = adapter_class_features(backbone, adapter, labels, class_features)
    metrics = {
        "support_accuracy_before": _accuracy(frozen, class_features, targets),
        "support_accuracy_after": _accuracy(after_images, after_classes, targets),
        "final_loss": loss_value,
    }
    return Adapter(replace(card, metrics=metrics), tensors)
