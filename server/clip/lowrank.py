"""Low-rank (LoRA) adaptation of the frozen vision tower, for TTL: open_clip's vision blocks run functionally.

TTL (Imam et al., 2024, "Test-Time Low Rank Adaptation via Confidence Maximization for Zero-Shot
Generalization of Vision-Language Models", https://arxiv.org/abs/2407.15913) trains LoRA factors on
the q and v projections of the last three vision blocks at test time. This module runs those blocks
functionally with the low-rank deltas added, so the shared model is never modified (PEFT injects
layers into the model, which is unsafe under concurrency) and several requests can share one
computation with their factors stacked.

The backbone is split in two: ``vision_prefix`` runs the frozen tower up to the input of the first
adapted block once per request; ``vision_suffix`` re-runs only the adapted blocks, pooling and
projection per step. Written against open_clip 3.3.0's ``VisionTransformer`` /
``ResidualAttentionBlock`` (with ``nn.MultiheadAttention``) and ``ModifiedResNet`` /
``AttentionPool2d``; tests/unit/test_lowrank.py pins it to ``encode_image``. It lives beside
``server/clip/backbone.py`` (which exposes it as ``Backbone.lora_targets``, ``vision_prefix`` and
``vision_suffix``) only to keep that file a readable size. The factors and targets are data types of
the methods' side (``adapters.lowrank``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from adapters.backbone import UnsupportedModel
from adapters.lowrank import RESNET_POOL, LoraFactors, LoraTarget, LoraTargets


# -- targets ------------------------------------------------------------------------------------
def lora_targets(visual: torch.nn.Module, n_blocks: int = 3) -> LoraTargets:
    """TTL's LoRA targets in an open_clip vision tower, or UnsupportedModel saying why there are none.

    ViT: q and v of the last ``n_blocks`` resblocks (all of them when the tower has fewer).
    ModifiedResNet: q and v of the attention pool, its only attention (``n_blocks`` is not used).
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
    if isinstance(visual, ModifiedResNet) and isinstance(visual.attnpool, AttentionPool2d):
        pool = visual.attnpool
        return LoraTargets(
            "resnet",
            (),
            tuple(
                LoraTarget(f"attnpool.{p}_proj", RESNET_POOL, p, lin.in_features, lin.out_features)
                for p, lin in (("q", pool.q_proj), ("v", pool.v_proj))
            ),
        )
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModel(
            f"TTL's LoRA needs open_clip's VisionTransformer or ModifiedResNet vision tower; "
            f"this model's is {type(visual).__name__} (timm and Hugging Face towers are not supported)"
        )
    blocks = visual.transformer.resblocks
    first = max(0, len(blocks) - n_blocks)
    targets = []
    for i in range(first, len(blocks)):
        blk = blocks[i]
        attn = getattr(blk, "attn", None)
        if (
            type(blk) is not ResidualAttentionBlock
            or not isinstance(attn, torch.nn.MultiheadAttention)
            or not attn._qkv_same_embed_dim
            or attn.bias_k is not None
            or attn.add_zero_attn
        ):
            raise UnsupportedModel(
                f"TTL's LoRA needs open_clip's ResidualAttentionBlock with a packed "
                f"nn.MultiheadAttention; vision block {i} is {type(blk).__name__}"
            )
        width = attn.embed_dim
        targets += [LoraTarget(f"transformer.resblocks.{i}.attn.{p}", i, p, width, width) for p in ("q", "v")]
    return LoraTargets("vit", tuple(range(first, len(blocks))), tuple(targets))


# -- the frozen prefix ----------------------------------------------------------------------------
def vision_prefix(visual: Any, images: torch.Tensor, targets: LoraTargets) -> torch.Tensor:
    """The frozen tower up to the first adapted block. The caller picks the grad mode.

    Args:
        images: [N, 3, H, W] in the tower's dtype and device.
    Returns:
        ViT: [N, T, W] tokens entering block ``targets.first_block`` (batch-first);
        ResNet: [N, C, h, w] feature map entering the attention pool.
    """
    if targets.tower == "resnet":
        x = visual.stem(images)  # [N, width, H/4, W/4]
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # type: ignore[no-any-return]
    x = visual._embeds(images)  # [N, T, W]
    transformer = visual.transformer
    if not transformer.batch_first:  # the blocks' MultiheadAttention expects the tower's layout
        x = x.transpose(0, 1)  # [T, N, W]
    for blk in transformer.resblocks[: targets.first_block]:
        x = blk(x)
    return x if transformer.batch_first else x.transpose(0, 1)  # type: ignore[no-any-return]


# -- the adapted suffix ---------------------------------------------------------------------------
def vision_suffix(visual: Any, prefix: torch.Tensor, lora: LoraFactors) -> torch.Tensor:
    """Re-run the adapted part of the tower with the low-rank deltas; differentiable in A and B.

    Args:
        prefix: from ``vision_prefix`` for ``lora.targets``: [N, ...], or [R, N, ...] with stacked factors.
        lora: [r, in] / [out, r] factors, or [R, ...] stacked.
    Returns:
        [N, D] or [R, N, D] image features before normalisation, in the tower's dtype.
    """
    targets = lora.targets
    if (targets.tower == "resnet") != isinstance(visual, ModifiedResNet):
        raise ValueError(f"the LoRA targets are for a {targets.tower} tower, not {type(visual).__name__}")
    feature_dims = 3 if targets.tower == "resnet" else 2
    want = feature_dims + (2 if lora.stacked else 1)
    if prefix.dim() != want:
        raise ValueError(
            f"prefix has shape {tuple(prefix.shape)}; expected {want} dims for "
            f"{'stacked' if lora.stacked else 'unstacked'} factors on a {targets.tower} tower"
        )
    r = lora.a[0].shape[0] if lora.stacked else 1
    x = prefix if lora.stacked else prefix[None]  # [R, N, ...]
    if x.shape[0] != r:
        raise ValueError(f"prefix stacks {x.shape[0]} requests but the factors stack {r}")
    n = x.shape[1]
    # Stacked requests run as one batch of R*N images; only the low-rank deltas are per request.
    a = [(f if lora.stacked else f[None]).to(x.dtype) for f in lora.a]  # each [R, r, in]
    b = [(f if lora.stacked else f[None]).to(x.dtype) for f in lora.b]  # each [R, out, r]
    x = x.flatten(0, 1)  # [R*N, ...]
    if targets.tower == "resnet":
        feats = _attnpool(visual.attnpool, x, r, (a[0], b[0]), (a[1], b[1]), lora.scaling)  # [R*N, D]
    else:
        feats = _vit_suffix(visual, targets.blocks, x, r, a, b, lora.scaling)  # [R*N, D]
    feats = feats.view(r, n, -1)  # [R, N, D]
    return feats if lora.stacked else feats[0]


def _delta(x: torch.Tensor, r: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA term of each stacked request: [R*N, T, in] -> [R*N, T, out], computed as PEFT does.

    (x A^T) B^T never forms delta_W: its gradient costs O(tokens * width * rank), not O(tokens * width^2).
    """
    rn, t, _ = x.shape
    low = x.reshape(r, (rn // r) * t, -1) @ a.transpose(-1, -2)  # [R, N*T, r]
    return (low @ b.transpose(-1, -2) * scaling).view(rn, t, -1)  # [R*N, T, out]


def _lora_attention(
    attn: torch.nn.MultiheadAttention,
    x: torch.Tensor,
    r: int,
    lq: tuple[torch.Tensor, torch.Tensor] | None,
    lv: tuple[torch.Tensor, torch.Tensor] | None,
    scaling: float,
    attn_mask: torch.Tensor | None = None,
    queries: int | None = None,
) -> torch.Tensor:
    """nn.MultiheadAttention's self-attention (need_weights=False) with LoRA on the packed q and v slices.

    Follows ``F.multi_head_attention_forward``: packed in-projection, per-head SDPA with the float mask,
    out-projection. Batch-first: x [B, T, W] -> [B, T', W], where only the first ``queries`` tokens
    (all when None) are computed as queries; each output row depends only on its own query.
    """
    w, bias, heads = attn.in_proj_weight, attn.in_proj_bias, attn.num_heads
    width = x.shape[-1]
    qkv = F.linear(x, w, bias)  # [B, T, 3W]
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]  # each [B, T, W]
    xq = x
    if queries is not None:
        q, xq = q[:, :queries], x[:, :queries]  # [B, T', W]
    if lq is not None:
        q = q + _delta(xq, r, *lq, scaling)  # [B, T', W]
    if lv is not None:
        v = v + _delta(x, r, *lv, scaling)  # [B, T, W]
    out = heads_attention(q, k, v, heads, attn_mask)  # [B, T', W]
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)  # [B, T', W]


def heads_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention, batch-first: [B, Tq, W], [B, T, W] x2 -> [B, Tq, W]."""
    bsz, tq, width = q.shape
    hd = width // heads
    q = q.reshape(bsz, tq, heads, hd).transpose(1, 2)  # [B, H, Tq, hd]
    k = k.reshape(bsz, -1, heads, hd).transpose(1, 2)  # [B, H, T, hd]
    v = v.reshape(bsz, -1, heads, hd).transpose(1, 2)  # [B, H, T, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask)  # [B, H, Tq, hd]
    return out.transpose(1, 2).reshape(bsz, tq, width)  # [B, Tq, W]


def lora_block(
    blk: ResidualAttentionBlock,
    x: torch.Tensor,
    r: int,
    lq: tuple[torch.Tensor, torch.Tensor] | None,
    lv: tuple[torch.Tensor, torch.Tensor] | None,
    scaling: float,
    attn_mask: torch.Tensor | None = None,
    queries: int | None = None,
) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` (self-attention) with LoRA on q and v.

    x: [R*N, T, W] batch-first -> [R*N, T', W] (T' = ``queries`` when given: the tokens kept).
    """
    if attn_mask is not None:
        attn_mask = attn_mask.to(x.dtype)  # as ResidualAttentionBlock.attention casts it
        if queries is not None:
            attn_mask = attn_mask[:queries]  # [T', T]
    h = _lora_attention(blk.attn, blk.ln_1(x), r, lq, lv, scaling, attn_mask, queries)  # [R*N, T', W]
    x = x if queries is None else x[:, :queries]  # [R*N, T', W]
    x = x + blk.ls_1(h)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))  # type: ignore[no-any-return]


def _vit_suffix(
    visual: Any,
    adapted: tuple[int, ...],
    x: torch.Tensor,
    r: int,
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """The adapted resblocks (the tower's last ones), then open_clip's pooling and projection:
    [R*N, T, W] -> [R*N, D]. Factors are in target order: q then v of each adapted block."""
    blocks = visual.transformer.resblocks
    # With class-token pooling and no attentional pooler, only token 0 of the last block's output is
    # read: computing just its query row (keys and values still from every token) is exact and skips
    # most of that block (its MLP and out-projection for the other tokens).
    cls_only = visual.attn_pool is None and visual.pool_type == "tok"
    for j, i in enumerate(adapted):
        last = i == len(blocks) - 1
        x = lora_block(
            blocks[i],
            x,
            r,
            (a[2 * j], b[2 * j]),
            (a[2 * j + 1], b[2 * j + 1]),
            scaling,
            queries=1 if last and cls_only else None,
        )  # [R*N, T, W] ([R*N, 1, W] after the last)
    pooled, _ = visual._pool(x)  # [R*N, W']
    if visual.proj is not None:
        pooled = pooled @ visual.proj  # [R*N, D]
    return pooled  # type: ignore[no-any-return]


def _attnpool(
    pool: AttentionPool2d,
    x: torch.Tensor,
    r: int,
    lq: tuple[torch.Tensor, torch.Tensor],
    lv: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
) -> torch.Tensor:
    """open_clip's ``AttentionPool2d.forward`` with LoRA on q_proj and v_proj: [R*N, C, h, w] -> [R*N, D].

    Batch-first where open_clip is sequence-first (same math). The pool returns only the mean token's
    output, so only that query is computed.
    """
    x = x.flatten(2).transpose(1, 2)  # [R*N, hw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [R*N, hw+1, C]
    x = x + pool.positional_embedding.to(x.dtype)  # [R*N, hw+1, C]
    xq = x[:, :1]  # [R*N, 1, C]
    q = F.linear(xq, pool.q_proj.weight, pool.q_proj.bias) + _delta(xq, r, *lq, scaling)  # [R*N, 1, C]
    k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias)  # [R*N, hw+1, C]
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias) + _delta(x, r, *lv, scaling)  # [R*N, hw+1, C]
    out = heads_attention(q, k, v, pool.num_heads, None)  # [R*N, 1, C]
    return F.linear(out[:, 0], pool.c_proj.weight, pool.c_proj.bias)  # [R*N, D]
