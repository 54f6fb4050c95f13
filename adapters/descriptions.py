"""Class descriptions: the description head every method can use, and MSTA's consistency term.

MSTA (Chen et al., CVPR 2025, https://arxiv.org/abs/2411.11223; no public code) pulls each trainable
class embedding toward frozen embeddings of LLM-written descriptions of the class,
L_CC = 2 - cos(w_c, D_c^s) - cos(w_c, D_c^t) (spatial and temporal descriptions), weight 1.0.
CuPL-style heads and TPS's "micro" prototypes average description embeddings into the class
embedding itself. Both are here, once:

- ``head``: a class embedding is normalize((1 - mix) * T_c + mix * D_c), T_c the mean of its unit-norm
  template embeddings, D_c the mean of its unit-norm description embeddings; a label without
  descriptions keeps T_c. ``mix = 0.5`` is TPS's micro pooling, its default; every other method
  defaults to 0 (templates alone). The server builds zero-shot class features with it, and
  prompt tuning applies it to its re-encoded class prompts.
- ``consistency``: mean over described classes of 1 - cos(w_c, D_c). A label set's descriptions are
  one group, not MSTA's spatial and temporal two, so this is the one-group case of MSTA's
  "2 - cos - cos"; it has a zero gradient where w_c = D_c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import ConfigDict


@dataclass(frozen=True)
class DescriptionOptions:
    """How a label set's descriptions are used (a request naming a label set with descriptions).

    ``mix``: weight of the descriptions' mean in each described class embedding (0: templates alone;
    TPS's default 0.5 is its "micro" prototype). ``consistency``: add MSTA's consistency term, each
    adapted class embedding kept near its frozen description embedding (text-side methods: TPT,
    C-TPT), with weight ``consistency_weight``.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")  # a misspelt key is an error

    mix: float = 0.0
    consistency: bool = False
    consistency_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"descriptions.mix must be between 0 and 1, got {self.mix:g}")
        if not 0.0 <= self.consistency_weight <= 1e3:
            raise ValueError(
                f"descriptions.consistency_weight must be between 0 and 1000, got {self.consistency_weight:g}"
            )

    @property
    def wanted(self) -> bool:
        """Whether the request's descriptions must be encoded."""
        return self.mix > 0 or self.consistency


TEMPLATES_ONLY = DescriptionOptions()  # the default of every method but TPS
MICRO_PROTOTYPES = DescriptionOptions(mix=0.5)  # TPS's default: its "micro" pooling


@dataclass(frozen=True, eq=False)
class DescriptionFeatures:
    """A label set's descriptions through the frozen text tower."""

    means: torch.Tensor  # [C, D] mean of each class's unit-norm description embeddings (zero where none)
    present: torch.Tensor  # [C] bool, the class has descriptions


def head(templates: torch.Tensor, descriptions: DescriptionFeatures | None, mix: float) -> torch.Tensor:
    """[..., C, D] template embeddings (or their mean) -> [..., C, D] unit-norm class embeddings."""
    if descriptions is None or mix == 0.0:
        return F.normalize(templates, dim=-1)
    means = descriptions.means.to(templates.dtype)
    mixed = (1.0 - mix) * templates + mix * means  # [..., C, D]
    return F.normalize(torch.where(descriptions.present[:, None], mixed, templates), dim=-1)


def consistency(classes: torch.Tensor, descriptions: DescriptionFeatures) -> torch.Tensor:
    """Mean over described classes of 1 - cos(w_c, D_c): [..., C, D] -> [...] (0 if none is described)."""
    present = descriptions.present
    if not bool(present.any()):
        return classes.sum(dim=(-1, -2)) * 0.0
    cos = F.cosine_similarity(classes[..., present, :], descriptions.means[present].to(classes.dtype), dim=-1)
    return (1.0 - cos).mean(-1)
