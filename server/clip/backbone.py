"""The frozen CLIP backbone: encoders over a loaded open_clip model.

It preprocesses images, encodes images and prompts, and for the methods that re-run a tower it
implements ``adapters.Backbone``: prompt learning (TPT, C-TPT) runs the text tower by hand from token
embeddings with a learned context spliced in (``prompt_inputs``, ``encode_text_with_contexts``; the
tower's parts in ``server/clip/prompting.py``), and TTL's LoRA splits the vision tower at the first
adapted block (``lora_targets``, ``vision_prefix``, ``vision_suffix``; ``server/clip/lowrank.py``).
Both are written against open_clip 3.3.0 and pinned by equivalence tests. The model's weights are
never modified. Only the engine's lanes call the encoders; ``preprocess`` and ``tokenize`` are safe from any
thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from adapters.backbone import TPT_CTX_INIT, UnsupportedModel
from adapters.lowrank import LoraFactors, LoraTargets
from adapters.prompts import PromptInputs
from server.clip import lowrank
from server.clip.cache import ByteLRU, split_text_budget
from server.clip.prompting import TextTower, shared_prefix_block, shares_prefix, text_tower
from server.clip.spec import HF_HUB, LOCAL_DIR, ModelSpec, resolve_device, resolve_model
from server.clip.templates import render
from server.clip.tokens import composable, tokenize_prompts
from server.errors import ConfigError
from server.settings import Settings

log = logging.getLogger("ttaserve.clip")

# Prompts per text-encoder call, the same for every build so a class's features never depend on which lane built
# them: bounds activation memory, and what the zero-shot lane runs between two image batches (tens of ms).
TEXT_CHUNK = 64
# Words open_clip's tokenizer may remember (each a few hundred bytes): its cache otherwise grows with every
# new word a request sends.
TOKENIZER_CACHE_WORDS = 50_000

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backbone:
    """A loaded, frozen open_clip model and what is needed to use it."""

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        precision: str,
        prompt_cache_bytes: int,
    ):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.preprocess_cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
        self._transform = image_transform_v2(self.preprocess_cfg, is_train=False)
        size = self.preprocess_cfg.size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        scale: torch.Tensor = model.logit_scale  # type: ignore[assignment]  # an nn.Parameter of CLIP
        self.logit_scale = float(scale.detach().float().exp().item())
        projection = getattr(model, "text_projection", None)
        self.embed_dim = int(projection.shape[-1]) if isinstance(projection, torch.Tensor) else None
        self.context_length = int(getattr(model, "context_length", 77))
        self.fingerprint = ""  # a digest of the weights: set by measure_fingerprint on the engine's thread
        self.prompt_cache: ByteLRU[PromptInputs] = ByteLRU(prompt_cache_bytes, lambda p: p.nbytes)
        self._tokenizer_lock = threading.Lock()  # open_clip's tokenizer keeps a word cache that is not thread-safe

    @property
    def visual(self) -> torch.nn.Module:
        tower: torch.nn.Module = self.model.visual  # type: ignore[assignment]  # every open_clip model has one
        return tower

    # -- images ---------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image to the model's input tensor [3, H, W] (float32, CPU)."""
        out: torch.Tensor = self._transform(image)
        return out

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit-norm features (float32, on the device)."""
        with torch.inference_mode():
            x = images.to(self.device, self.dtype, non_blocking=True)
            feats: torch.Tensor = self.model.encode_image(x)  # type: ignore[operator]  # [B, D]
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """[P] prompts -> [P, context] token ids (CPU). Safe from any thread: the service tokenizes a label
        set's prompts off the lanes, and the tokenizer's word cache is guarded and bounded here."""
        with self._tokenizer_lock:
            tokens: torch.Tensor = self.tokenizer(list(prompts))
            self._bound_tokenizer_cache()
        return tokens

    def tokenize_rendered(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[L * T, context] token ids of every template rendered with every label (label-major), as ``tokenize``
        gives them, built from each label's and template's tokens when the tokenizer allows
        (``server.clip.tokens``)."""
        if not composable(self.tokenizer):
            return self.tokenize([render(t, label) for label in labels for t in templates])
        with self._tokenizer_lock:
            ids = tokenize_prompts(self.tokenizer, labels, templates, self.tokenizer.context_length)
            self._bound_tokenizer_cache()
        return ids

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[p, context] token ids (at most ``TEXT_CHUNK`` rows: one call is the unit the lanes cannot
        interrupt) -> [p, D] unit-norm text features (float32, on the device).

        In CLIP's causal text tower the call is cut after its longest prompt's EOT (a label set's prompts
        are a few tokens of the 77: 5-10x less text compute); other towers run whole.
        """
        try:
            encode = text_tower(self.model, self.tokenizer).encode_tokens
        except UnsupportedModel:  # not a causal CLIP text tower: open_clip's own encode_text
            encode = self.model.encode_text  # type: ignore[assignment]
        with torch.inference_mode():
            return torch.nn.functional.normalize(encode(tokens.to(self.device)).float(), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[P] prompts -> [P, D] unit-norm text features (float32, on the device), ``TEXT_CHUNK`` at a time."""
        tokens = self.tokenize(prompts)
        return torch.cat([self.encode_tokens(chunk) for chunk in torch.split(tokens, TEXT_CHUNK)])

    def _bound_tokenizer_cache(self) -> None:
        """open_clip's BPE tokenizer keeps every word it has seen; past ``TOKENIZER_CACHE_WORDS`` it starts
        over. The caller holds the tokenizer's lock."""
        cache = getattr(self.tokenizer, "cache", None)
        if isinstance(cache, dict) and len(cache) > TOKENIZER_CACHE_WORDS:
            decoder = getattr(self.tokenizer, "decoder", {})
            specials = [decoder[i] for i in getattr(self.tokenizer, "all_special_ids", []) if i in decoder]
            cache.clear()
            cache.update({token: token for token in specials})

    def warm_up(self) -> None:
        """One forward pass of each tower, so the first request does not pay for lazy initialisation."""
        h, w = self.image_size
        self.encode_images(torch.zeros(1, 3, h, w))
        self.encode_prompts(["a photo of a warm-up."])
        self.sync()

    def measure_fingerprint(self) -> str:
        """A digest of the model: its name, and each weight's shape and sums. Any change to the weights
        changes it; what was fitted with one model (a calibration) is not applied to another."""
        digest = hashlib.sha256(f"{self.spec.name}|{self.spec.pretrained}".encode())
        with torch.no_grad():
            for name, weight in self.model.state_dict().items():
                w = weight.double()
                digest.update(f"{name}{tuple(w.shape)}{float(w.sum()):.17g}{float((w * w).sum()):.17g}".encode())
        self.fingerprint = digest.hexdigest()[:16]
        return self.fingerprint

    def sync(self) -> None:
        """Wait for the device to finish what was queued (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- prompt learning (TPT, C-TPT) ------------------------------------------------------------
    # Written against open_clip 3.3.0's CLIP.encode_text and TextTransformer.forward; the
    # equivalence test in tests/unit/test_prompting.py pins it.
    @property
    def prompt_learning_error(self) -> str | None:
        """Why this model cannot take a learned text context, or None when it can."""
        try:
            text_tower(self.model, self.tokenizer)
        except UnsupportedModel as exc:
            return str(exc)
        return None

    def _text_tower(self) -> TextTower:
        return text_tower(self.model, self.tokenizer)

    def prompt_inputs(self, labels: tuple[str, ...], ctx_init: str = TPT_CTX_INIT) -> PromptInputs:
        """The frozen token embeddings of ``"{ctx_init} {label}."`` for each label, cached per label set.

        As in the official TPT, underscores in ``ctx_init`` become spaces and the learned context is
        one vector per word, the first tokens of ``ctx_init`` ("a photo of a": 4; "itap of a": 3, the
        tokens "it", "ap", "of", with "a" left frozen in the prompt); the rest is cut to the longest
        prompt of the set. Built under ``no_grad`` (never inference mode, whose tensors
        autograd refuses) so adaptation graphs can use them. Raises UnsupportedModel when the model's
        text tower or tokenizer cannot take a learned context, or ``ctx_init`` does not fit.
        """
        key = (self.spec.display, labels, ctx_init)
        cached = self.prompt_cache.get(key)
        if cached is not None:
            return cached
        tower = self._text_tower()
        text = ctx_init.replace("_", " ")
        with self._tokenizer_lock:
            init_list = self.tokenizer.encode(text)
            self._bound_tokenizer_cache()
        with torch.inference_mode(False), torch.no_grad():
            init_ids = torch.tensor(init_list, dtype=torch.long, device=self.device)  # [tokens]
            n_tokens = int(init_ids.numel())
            if n_tokens < 1:
                raise UnsupportedModel(f"ctx_init {ctx_init!r} has no tokens")
            n_ctx = min(len(text.split(" ")), n_tokens)  # the official n_ctx counts words
            if n_tokens + 3 > self.context_length:  # SOT, the context, one label token, EOT
                raise UnsupportedModel(
                    f"ctx_init {ctx_init!r} ({n_tokens} tokens) does not fit the text context "
                    f"of {self.context_length} tokens with a label after it"
                )
            ids = self.tokenize([f"{text} {label}." for label in labels]).to(self.device)  # [C, 77]
            if not bool((ids[:, 1 : 1 + n_tokens] == init_ids).all()):
                raise UnsupportedModel(f"ctx_init {ctx_init!r} tokenizes differently when a label follows it")
            eot = tower.pool_positions(ids)  # [C]
            length = int(eot.max()) + 1  # causal: nothing after the last EOT reaches any pooled token
            ids = ids[:, :length]  # [C, L]
            emb = tower.token_embedding(ids).to(tower.cast_dtype)  # [C, L, W]
            inputs = PromptInputs(
                labels=labels,
                prefix=emb[:, :1].clone(),
                ctx_init=emb[0, 1 : 1 + n_ctx].float().clone(),
                suffix=emb[:, 1 + n_ctx :].clone(),
                eot=eot,
                tokens=ids,
            )
        self.prompt_cache.put(key, inputs)
        return inputs

    def encode_text_with_context(self, ctx: torch.Tensor, inputs: PromptInputs) -> torch.Tensor:
        """Class text features with a learned context spliced in after SOT, differentiable in ``ctx``.

        Runs open_clip's text tower by hand on [SOT] + ctx + suffix, cut to the longest prompt: with
        ``ctx = inputs.ctx_init`` it equals ``encode_text`` of the tokenized prompts. Call it under
        ``torch.enable_grad()`` to train ``ctx``; the model's parameters get no gradient.

        Args:
            ctx: [n_ctx, W] one context, or [R, n_ctx, W] one per stacked request (float32).
            inputs: from ``prompt_inputs``.
        Returns:
            [C, D] or [R, C, D] unit-norm float32 features.
        """
        single = ctx.dim() == 2
        ctx = ctx[None] if single else ctx  # [R, n, W]
        feats = torch.stack(self.encode_text_with_contexts(ctx, [inputs] * ctx.shape[0]))  # [R, C, D]
        return feats[0] if single else feats

    def encode_text_with_contexts(self, ctx: torch.Tensor, inputs: Sequence[PromptInputs]) -> list[torch.Tensor]:
        """R contexts, each with its own label set, through the text tower as one batch.

        The prompts of all label sets are stacked, padded after their EOT to the longest (which changes
        nothing in a causal tower), and each row gets its request's context; the rows are split back
        per request. SOT and the context, shared by every prompt of a request, run once per request
        (``shared_prefix_block``). Differentiable in ``ctx``.

        Args:
            ctx: [R, n_ctx, W] float32, one context per request.
            inputs: R ``prompt_inputs`` results with the same ``n_ctx`` (the same one may repeat).
        Returns:
            R tensors [C_r, D], unit-norm float32.
        """
        tower = self._text_tower()
        if ctx.dim() != 3 or ctx.shape[0] != len(inputs):
            raise ValueError(f"ctx has shape {tuple(ctx.shape)}; expected [{len(inputs)}, n_ctx, W]")
        for inp in inputs:
            if tuple(ctx.shape[1:]) != tuple(inp.ctx_init.shape):
                raise ValueError(
                    f"ctx has shape {tuple(ctx.shape)}, expected [R, {inp.n_ctx}, {inp.ctx_init.shape[-1]}]"
                )
        length = max(inp.context_length for inp in inputs)
        sizes = [inp.prefix.shape[0] for inp in inputs]
        ctx = ctx.to(self.device, tower.cast_dtype)
        pos = tower.positional_embedding[:length].to(tower.cast_dtype)  # [L, W]
        eot = torch.cat([inp.eot for inp in inputs])  # [P]
        tails = torch.cat(
            [torch.nn.functional.pad(inp.suffix, (0, 0, 0, length - inp.context_length)) for inp in inputs]
        )  # [P, L-1-n, W] label tokens, ".", EOT, padding
        mask = tower.attn_mask[:length, :length]
        if shares_prefix(tower):
            # SOT and the context are the same tokens in every prompt of a request: in a causal tower their
            # states are too, so they run once per request and each prompt attends to its request's copy.
            head = 1 + ctx.shape[1]
            shared = torch.cat([torch.stack([inp.prefix[0] for inp in inputs]), ctx], dim=1) + pos[:head]  # [R, h, W]
            x = tails + pos[head:]  # [P, L-h, W]
            owner = torch.repeat_interleave(
                torch.arange(len(inputs), device=x.device), torch.tensor(sizes, device=x.device)
            )  # [P] request of each prompt
            for blk in tower.blocks:
                shared, x = shared_prefix_block(blk, shared, x, owner, mask)
            eot = eot - head
        else:
            x = torch.cat(
                [
                    torch.cat([inp.prefix, ctx[r][None].expand(c, -1, -1)], dim=1)
                    for r, (inp, c) in enumerate(zip(inputs, sizes, strict=True))
                ]
            )  # [P, 1+n, W]
            x = torch.cat([x, tails], dim=1) + pos  # [P, L, W]
            # open_clip's text transformer is batch-first and takes the causal mask as an argument.
            x = tower.transformer(x, attn_mask=mask)  # [P, L, W]
        x = tower.pool(x, eot)  # [P, D]
        return list(torch.split(torch.nn.functional.normalize(x.float(), dim=-1), sizes))

    # -- low-rank vision adaptation (TTL) --------------------------------------------------------
    # The open_clip vision internals live in server/clip/lowrank.py (kept apart for size), pinned by
    # tests/unit/test_lowrank.py against encode_image.
    def lora_targets(self, n_blocks: int = 3) -> LoraTargets:
        """Where TTL's LoRA goes: q and v of the last ``n_blocks`` ViT blocks (all when fewer), or of a
        ModifiedResNet's attention pool. Raises UnsupportedModel for other vision towers (timm, ...)."""
        return lowrank.lora_targets(self.visual, n_blocks)

    def vision_prefix(self, images: torch.Tensor, targets: LoraTargets | None = None) -> torch.Tensor:
        """The frozen vision tower up to the first adapted block, to cache for all of a request's steps.

        Built under ``no_grad``, never inference mode, so adaptation graphs can use it.

        Args:
            images: [N, 3, H, W] preprocessed images.
            targets: from ``lora_targets`` (default: TTL's last three blocks); pass the same to the suffix.
        Returns:
            ViT: [N, T, W] tokens entering the first adapted block; ResNet: [N, C, h, w] feature map
            entering the attention pool. In the model's dtype, on the device.
        """
        targets = targets if targets is not None else self.lora_targets()
        with torch.inference_mode(False), torch.no_grad():
            x = images.to(self.device, self.dtype, non_blocking=True)
            if x.is_inference():  # made in inference mode: copy to a normal tensor
                x = x.clone()
            return lowrank.vision_prefix(self.visual, x, targets)

    def vision_suffix(self, prefix: torch.Tensor, lora: LoraFactors) -> torch.Tensor:
        """Unit-norm image features with LoRA on the adapted blocks, differentiable in ``lora``'s A and B.

        With B = 0 it equals ``encode_images``; the model's weights are never modified. Call it under
        ``torch.enable_grad()`` to train the factors.

        Args:
            prefix: [N, ...] from ``vision_prefix`` with ``lora.targets``, or [R, N, ...] stacked.
            lora: one request's factors, or R requests' stacked with ``LoraFactors.stack``.
        Returns:
            [N, D] or [R, N, D] float32.
        """
        feats = lowrank.vision_suffix(self.visual, prefix.to(self.device), lora)  # [R, N, D] or [N, D]
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _looks_like_download_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    words = ("download", "connection", "offline", "resolve", "huggingface", "hf_hub", "timed out", "network")
    return any(w in text for w in words)


def load_backbone(settings: Settings, spec: ModelSpec | None = None) -> Backbone:
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
    _, prompt_bytes = split_text_budget(settings.text_cache_bytes)
    return Backbone(spec, model, tokenizer, device, settings.precision, prompt_bytes)
