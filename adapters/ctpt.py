"""C-TPT: Calibrated Test-Time Prompt Tuning (Yoon et al., ICLR 2024, https://arxiv.org/abs/2403.14119).

TPT plus a term that rewards dispersed class text features: loss = marginal entropy of the
confident views - lambda * ATFD, where ATFD is the mean L2 distance of the normalised class
features to their centroid. Spreading the classes apart counters the over-confidence entropy
minimisation brings. lambda is 50 for fine-grained label sets and 20 for natural shifts in the
paper's scripts; ours defaults to 50 and takes it as the ``dispersion_weight`` option.

TPT's additions of ours (off by default) apply as they are: the description head and MSTA's
consistency term, the ``feature`` and ``l2sp`` regularizers, the ensemble with zero-shot.

How ours differs from the official code (hee-suk-yoon/C-TPT): everything TPT's file says (views
encoded once, context cut to the longest prompt, ``ctx_init`` read per word as the official code
does). Views: C-TPT's fine-grained runs use AugMix as TPT does, and its natural-shift scripts turn it
on for the ImageNet sets too (``--I_augmix``); ours defaults to ``crop_flip``, and ``augmentation:
"augmix"`` gives the official pipeline (adapters/augmix.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import register
from adapters.common import check_range
from adapters.tpt import PromptOptions, PromptTuning


@dataclass(frozen=True)
class CTPTOptions(PromptOptions):
    dispersion_weight: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("dispersion_weight", self.dispersion_weight, 0.0, 1000.0)


@register
class CTPT(PromptTuning[CTPTOptions]):
    name = "ctpt"
    summary = "TPT with C-TPT's text-feature dispersion term, for better-calibrated confidence."
    Options = CTPTOptions

    def dispersion_weight(self, options: CTPTOptions) -> float:
        return float(options.dispersion_weight)
