"""Prompt learning on open_clip's text tower: the tower's parts, and a block that runs the tokens every
prompt of a request shares once.

Written against open_clip 3.3.0's ``CLIP.encode_text`` (batch-first transformer, causal mask passed
in); ``Backbone.prompt_inputs`` and ``Backbone.encode_text_with_contexts`` use it, and
tests/unit/test_prompting.py pins it to ``encode_text``. The frozen prompt pieces themselves
(``adapters.prompts.PromptInputs``) are a data type of the methods' side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from adapters.backbone import UnsupportedModel
from server.clip.lowrank import heads_attention


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower that ``encode_text`` uses, wherever the model keeps them."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.Tensor  # [77, W]
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor  # [77, 77] additive causal mask
    pool_type: str
    eos_id: int | None

    @property
    def blocks(self) -> list[ResidualAttentionBlock]:
        """The transformer's residual blocks, in order (empty when it keeps them elsewhere)."""
        resblocks = getattr(self.transformer, "resblocks", None)
        return list(resblocks) if isinstance(resblocks, torch.nn.ModuleList) else []

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()  # type: ignore[no-any-return,operator]

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[C, L] token ids -> [C] the positions open_clip's ``text_global_pool`` reads."""
        if self.pool_type == "argmax" or self.eos_id is None:  # text_tower accepts 'eos' only with an id
            return ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        return torch.eq(ids, self.eos_id).to(torch.int32).argmax(dim=-1)  # 'eos'

    def pool(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[P, L, W] the last block's states -> [P, D] features (not normalised): ln_final, each prompt's
        pooled position, the projection."""
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), positions]  # [P, W]
        proj = self.text_projection
        if isinstance(proj, torch.nn.Module):
            out: torch.Tensor = proj(x)
            return out
        return x @ proj if proj is not None else x

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` of [P, 77] token ids -> [P, D], cut after the last pooled position:
        in a causal tower the tokens after it change nothing that is read."""
        positions = self.pool_positions(ids)  # [P]
        length = int(positions.max()) + 1
        x = self.token_embedding(ids[:, :length]).to(self.cast_dtype)  # [P, L, W]
        x = x + self.positional_embedding[:length].to(self.cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])  # batch-first, causal
        return self.pool(x, positions)


def text_tower(model: torch.nn.Module, tokenizer: Any) -> TextTower:
    """Find the text tower's parts, or raise UnsupportedModel saying why a learned context cannot be used."""
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import TextTransformer

    if not isinstance(tokenizer, SimpleTokenizer):
        raise UnsupportedModel(
            f"prompt learning needs CLIP's BPE tokenizer (SOT ... EOT), not {type(tokenizer).__name__}"
        )
    if isinstance(model, open_clip.CLIP):
        src: Any = model
        pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):
        src = model.text
        if src.cls_emb is not None or src.use_pad_mask:
            raise UnsupportedModel("prompt learning does not support text towers with a class token or padding mask")
        pool_type, eos_id = src.pool_type, getattr(src, "eos_id", None)
    else:
        raise UnsupportedModel(
            f"prompt learning needs open_clip's own text transformer; {type(model).__name__} has another text tower"
        )
    if src.attn_mask is None:
        raise UnsupportedModel("prompt learning needs a causal text tower (this one attends in both directions)")
    if pool_type not in ("argmax", "eos") or (pool_type == "eos" and eos_id is None):
        raise UnsupportedModel(f"prompt learning needs EOT pooling; this text tower pools with {pool_type!r}")
    return TextTower(
        src.token_embedding,
        src.positional_embedding,
        src.transformer,
        src.ln_final,
        src.text_projection,
        src.attn_mask,
        pool_type,
        eos_id,
    )


def shares_prefix(tower: TextTower) -> bool:
    """Whether the tower's blocks are open_clip's plain self-attention blocks, which the shared-prefix path runs."""
    blocks = tower.blocks
    return bool(blocks) and all(
        isinstance(b, ResidualAttentionBlock)
        and isinstance(b.attn, torch.nn.MultiheadAttention)
        and b.attn.in_proj_weight is not None
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    )


def shared_prefix_block(
    blk: ResidualAttentionBlock, shared: torch.Tensor, x: torch.Tensor, owner: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``ResidualAttentionBlock.forward`` for prompts whose first h tokens are shared per request.

    Args:
        shared: [R, h, W] the shared tokens' states, once per request.
        x: [P, S, W] the other tokens of every prompt; prompt p belongs to request ``owner[p]``.
        mask: [h+S, h+S] the causal mask.
    Returns:
        the next block's ``shared`` and ``x``: each prompt attends to its request's shared keys and values,
        then (causally) to its own, exactly as its full [h+S] sequence would.
    """
    attn = blk.attn
    width, h = shared.shape[-1], shared.shape[1]
    mask = mask.to(x.dtype)  # as ResidualAttentionBlock.attention casts it
    qs, ks, vs = torch.split(F.linear(blk.ln_1(shared), attn.in_proj_weight, attn.in_proj_bias), width, dim=-1)
    qx, kx, vx = torch.split(F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias), width, dim=-1)
    # qs, ks, vs: [R, h, W]; qx, kx, vx: [P, S, W]
    out_s = heads_attention(qs, ks, vs, attn.num_heads, mask[:h, :h])  # [R, h, W]
    keys, values = torch.cat([ks[owner], kx], dim=1), torch.cat([vs[owner], vx], dim=1)  # [P, h+S, W]
    out_x = heads_attention(qx, keys, values, attn.num_heads, mask[h:])  # [P, S, W]
    shared = shared + blk.ls_1(F.linear(out_s, attn.out_proj.weight, attn.out_proj.bias))
    x = x + blk.ls_1(F.linear(out_x, attn.out_proj.weight, attn.out_proj.bias))
    return shared + blk.ls_2(blk.mlp(blk.ln_2(shared))), x + blk.ls_2(blk.mlp(blk.ln_2(x)))
