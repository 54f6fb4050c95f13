"""The frozen pieces of a label set's prompts that prompt tuning (TPT, C-TPT) splices a learned context into.

A backbone builds them (``Backbone.prompt_inputs``) and runs them with a context
(``Backbone.encode_text_with_contexts``); a method only reads ``ctx_init`` to start its context from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PromptInputs:
    """The frozen pieces of one label set's prompts ``"{ctx_init} {label}."``, cut to the longest.

    ``prefix + ctx + suffix`` along the token axis is the prompt's token embeddings; the context
    length L is the largest EOT position + 1, which loses nothing in CLIP's causal text tower.
    """

    labels: tuple[str, ...]
    prefix: torch.Tensor  # [C, 1, W] the SOT embedding, in the tower's dtype
    ctx_init: torch.Tensor  # [n_ctx, W] float32, the embeddings of ctx_init's tokens: TPT's initial ctx
    suffix: torch.Tensor  # [C, L-1-n_ctx, W] label tokens, ".", EOT, padding
    eot: torch.Tensor  # [C] int64, where each prompt is pooled
    tokens: torch.Tensor  # [C, L] int64 token ids, cut

    @property
    def n_ctx(self) -> int:
        return int(self.ctx_init.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def nbytes(self) -> int:
        tensors = (self.prefix, self.ctx_init, self.suffix, self.eot, self.tokens)
        return sum(t.numel() * t.element_size() for t in tensors)
