"""The difficulty-adaptive ensemble of adapted and zero-shot predictions, after APEX.

APEX (Yang, Ko and Yun, EMNLP 2024, https://arxiv.org/abs/2311.15569; code YangYongJin/APEX) blends
an adapted and a frozen CLIP with a weight that leans on general knowledge where the task is easy
and on the adapted model where it is hard. Its own weight is per class, ``exp(-4 * distance)`` from
the test class name to the classes an adapter was trained on, and the blend is in feature space.

How ours differs:

- Per-request test-time adaptation has no training classes, so the ``entropy`` policy reads the
  difficulty off the image itself: d = the zero-shot entropy of each of the most confident views
  (TPT's 10%), divided by log C and averaged, in [0, 1]. The weight of the adapted answer is
  sigmoid((d - a) / b): an image the frozen model finds easy keeps its zero-shot answer, a hard one
  takes the adapted answer.
- A divergence guard (ours, not APEX's) multiplies that weight by exp(-k / guard), where k is
  KL(p_adapted || p_zero_shot) between the image's adapted and zero-shot answers (softmax of the
  logits): the nats by which the adapted answer is surer of what the frozen model does not support.
  Difficulty says when adapting should help; the divergence says when it went somewhere the frozen
  model cannot follow, which is what a bad setting (a learning rate too high, too many steps) does.
  On the demo model the confident views' difficulty barely varies (0.01-0.06), so without the guard
  the weight is about the same for every image, and at 100x TPT's learning rate the blend still lost
  6-7 points to zero-shot on contrast; the guard is what keeps such an answer near zero-shot.
  ``guard`` 0 turns it off (the plain APEX-style weight).
- ``a``, ``b`` and ``guard`` default to values chosen on the demo model's validation split and its
  design shift families only (``benchmarks/ensemble_shift.py fit``: the best worse margin over TPT
  at its default learning rate and at 100x; never the test split or the held-out families; see
  benchmarks/RESULTS.md). Another model needs its own.
- APEX's ``class_distance`` rule weighs a stored adapter against the frozen model by each class's
  distance to the adapter's training labels: the server offers it where that blend happens, as
  ``adapter_alpha: "class_distance"`` on a request naming an adapter (``adapters/fewshot/apply.py``);
  as an ensemble policy of test-time adaptation (which has no training classes) it is refused with a
  422 that says where to ask for it.
- The blend is of logits (the scaled cosines), one weight per image: w * adapted + (1 - w) * zero-shot.
  The server calibrates the blended logits (calibration applies after the blend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import ConfigDict

from adapters.losses import entropy, select_confident

# Chosen on validation data (benchmarks/ensemble_shift.py fit, seed 0): see the module docstring.
DEFAULT_A = 0.015
DEFAULT_B = 0.002
DEFAULT_GUARD = 0.03  # nats of KL(adapted || zero-shot) at which the adaptive weight falls by a factor e
CONFIDENT_VIEWS = 0.1  # TPT's selection: the views whose entropy the difficulty averages


@dataclass(frozen=True)
class EnsembleOptions:
    """How the final answer blends the adapted and the zero-shot logits (APEX's ensemble).

    ``mode``: ``off`` (the adapted answer alone, as without this option), ``fixed`` (``weight`` on
    the adapted logits for every image) or ``adaptive`` (a weight per image from ``policy``).
    ``entropy``: w = sigmoid((d - a) / b) * exp(-k / guard), d the confident views' normalised
    zero-shot entropy, k = KL(adapted || zero-shot) of the image's answers (``guard`` 0: no factor).
    ``class_distance`` (APEX's rule) is a stored adapter's blend: ``adapter_alpha: "class_distance"``.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")  # a misspelt key is an error

    mode: Literal["off", "fixed", "adaptive"] = "off"
    weight: float = 0.5
    policy: Literal["entropy", "class_distance"] = "entropy"
    a: float = DEFAULT_A
    b: float = DEFAULT_B
    guard: float = DEFAULT_GUARD

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"ensemble.weight must be between 0 and 1, got {self.weight:g}")
        if not 0.0 <= self.a <= 1.0:
            raise ValueError(f"ensemble.a must be between 0 and 1 (a normalised entropy), got {self.a:g}")
        if not 1e-3 <= self.b <= 10.0:
            raise ValueError(f"ensemble.b must be between 0.001 and 10, got {self.b:g}")
        if not 0.0 <= self.guard <= 100.0:
            raise ValueError(f"ensemble.guard must be between 0 (off) and 100 nats, got {self.guard:g}")
        if self.mode == "adaptive" and self.policy == "class_distance":
            raise ValueError(
                "ensemble.policy 'class_distance' is APEX's weight of a stored adapter against the frozen model, by "
                "each class's distance to the adapter's training labels: ask for it with adapter: NAME and "
                'adapter_alpha: "class_distance"; test-time adaptation has no training classes, so its ensemble '
                "takes policy 'entropy'"
            )


NO_ENSEMBLE = EnsembleOptions()  # the default: the adapted answer alone


@dataclass(frozen=True)
class Blend:
    logits: torch.Tensor  # [C] the blended logits
    difficulty: float | None  # the normalised zero-shot entropy of the confident views; None when off
    weight: float  # on the adapted logits
    divergence: float | None = None  # KL(adapted || zero-shot) of the answers, nats; None when off


def difficulty(view_logits: torch.Tensor) -> float:
    """d in [0, 1]: the mean over the most confident views of their zero-shot entropy / log C ([V, C] logits)."""
    n_classes = view_logits.shape[-1]
    if n_classes < 2:
        return 0.0
    picked = select_confident(view_logits, CONFIDENT_VIEWS)  # [K]
    return float(entropy(view_logits[picked].float()).mean()) / math.log(n_classes)


def adaptive_weight(d: float, a: float, b: float) -> float:
    """sigmoid((d - a) / b): the weight of the adapted logits at difficulty d."""
    z = (d - a) / b
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def divergence(adapted: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """KL(softmax(adapted) || softmax(zero_shot)) in nats, over the last axis: [..., C], [..., C] -> [...]."""
    log_p = adapted.double().log_softmax(-1)
    log_q = zero_shot.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def guarded_weight(d: float, k: float, options: EnsembleOptions) -> float:
    """The adaptive weight of the adapted logits: sigmoid((d - a) / b), times exp(-k / guard) when guarded."""
    w = adaptive_weight(d, options.a, options.b)
    return w * math.exp(-k / options.guard) if options.guard > 0 else w


def blend(view_logits: torch.Tensor, adapted: torch.Tensor, options: EnsembleOptions) -> Blend:
    """The ensemble of one image.

    Args:
        view_logits: [V, C] zero-shot logits of the image's views, row 0 the image itself.
        adapted: [C] the method's final logits.
    Returns:
        the blended logits [C] (``adapted`` itself, untouched, when the mode is ``off``), the difficulty,
        the weight on the adapted logits and the divergence of the two answers.
    """
    if options.mode == "off":
        return Blend(adapted, None, 1.0)
    zero_shot = view_logits[0].to(adapted.dtype)
    d = difficulty(view_logits)  # reported in fixed mode too: what the adaptive weight would read
    k = float(divergence(adapted, zero_shot))
    w = options.weight if options.mode == "fixed" else guarded_weight(d, k, options)
    return Blend(w * adapted + (1.0 - w) * zero_shot, d, w, k)
