"""Unsupervised objectives and view selection shared by the test-time methods.

Each function reproduces one piece of an official implementation (see
``shared/research/tta_methods.md``):

- ``entropy`` and ``select_confident``: TPT's ``select_confident_samples`` (azshue/TPT
  ``tpt_classification.py``), also used by C-TPT, TPS and ZERO.
- ``marginal_entropy``: TPT's ``avg_entropy``, the entropy of the views' averaged prediction.
- ``ttl_weighted_entropy``: the loss TTL runs through ``deyo.py: forward_and_adapt_sar`` with its
  default flags (Razaimam45/TTL-Test-Time-Low-Rank-Adaptation).
- ``dispersion``: C-TPT's average text feature dispersion, ATFD (hee-suk-yoon/C-TPT
  ``clip/custom_clip.py``, ``l2_norm_mean_training``).

How ours differs: ``select_confident`` sorts stably (ties keep view order, so a request is
reproducible; TPT's ``argsort`` leaves ties to the backend) and keeps at least one view where
``int(N * fraction)`` would keep none. Functions take leading batch dimensions where that is
natural, so requests stacked for batched adaptation compute each request's loss separately.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TTL_MAX_ENTROPY = math.log(1000)  # TTL's entropy filter; hard-coded for ImageNet, all views pass when C <= 1000


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats of each row: [..., C] logits -> [...]."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the views' softmax (TPT's ``avg_entropy``): [..., N, C] -> [...].

    The mean is taken in log space, logsumexp over views minus log N, and clamped to the dtype's
    lowest finite value so that a class with probability 0 contributes 0 * min rather than 0 * -inf.
    """
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)  # [..., N, C]
    avg = logp.logsumexp(dim=-2) - math.log(logits.shape[-2])  # [..., C]
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(dim=-1)


def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``int(N * fraction)`` lowest-entropy views (at least one), most confident first.

    Args:
        logits: [N, C] per-view logits.
        fraction: TPT's selection_p (0.1), ZERO's gamma (0.3).
    Returns:
        [K] int64 indices into the N views.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = logits.shape[0]
    keep = max(1, int(n * fraction))
    return torch.argsort(entropy(logits), stable=True)[:keep]  # [K]


def ttl_weighted_entropy(logits: torch.Tensor, tau: float = 0.4, max_entropy: float = TTL_MAX_ENTROPY) -> torch.Tensor:
    """TTL's loss: the mean over views of H_i * exp(-(H_i - tau)), the weights detached.

    TTL's code (DeYO's ``forward_and_adapt_sar`` with ``filter_ent=0``, ``reweight_ent=1``,
    ``reweight_plpd=0``, ``margin_e0=0.4`` passed unscaled) first keeps the views with
    H_i <= ln(1000), which is every view when C <= 1000, and weights each kept view by
    ``1 / exp(H_i - tau)``; we write the weight the same way, so rounding matches too.

    Args:
        logits: [..., N, C] per-view logits.
        tau: the entropy margin e0 (nats).
        max_entropy: views with a larger entropy are dropped, as TTL does.
    Returns:
        [...] the loss. Where no view passes the filter it is 0 with a zero gradient; TTL then skips
        the optimizer step, and callers must too (AdamW's weight decay would still move parameters).
    """
    h = entropy(logits)  # [..., N]
    kept = (h <= max_entropy).to(h.dtype)  # [..., N]
    weighted = h * (1.0 / torch.exp(h.detach() - tau)) * kept  # [..., N]
    return weighted.sum(-1) / kept.sum(-1).clamp(min=1.0)


def dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's ATFD: mean L2 distance of the normalised class features to their centroid.

    [..., C, D] -> [...]. C-TPT maximises it (loss = entropy - lambda * ATFD) to calibrate TPT.
    """
    t = F.normalize(text_features, dim=-1)  # [..., C, D]
    centroid = t.mean(dim=-2, keepdim=True)  # [..., 1, D]
    distances: torch.Tensor = torch.linalg.norm(t - centroid, dim=-1)  # [..., C] (torch.linalg is untyped)
    return distances.mean(dim=-1)
