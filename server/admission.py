"""What adaptation work costs, in seconds, for the engine's admission to the adaptation lane.

A method states the forward passes adapting one image takes (``Method.cost``: image passes and
prompt passes, a backward pass counting as two); the backbone's warm-up measured what one image and
one prompt take to encode. Their product is corrected per method by a moving average of what
batches really took against what was estimated (stacking, caches and the shared prompt prefix make
real work cheaper than the plain count).
"""

from __future__ import annotations

from typing import Any

from adapters import get_method
from server.backbone import Backbone


class CostModel:
    """Seconds to adapt images with a method, learnt from the batches the engine runs."""

    def __init__(self) -> None:
        self._correction: dict[str, float] = {}

    def estimate_s(self, backbone: Backbone | None, method: str, options: Any, n_images: int, n_classes: int) -> float:
        """Estimated seconds to adapt ``n_images`` images with ``method`` against ``n_classes`` classes."""
        if backbone is None:
            return 0.0
        cost = get_method(method).cost(options, n_classes)
        seconds = cost.image_passes * backbone.image_s + cost.prompt_passes * backbone.prompt_s
        return n_images * seconds * self._correction.get(method, 1.0)

    def learn(self, method: str, estimated_s: float, actual_s: float) -> None:
        """Move the method's correction towards what a batch estimated at ``estimated_s`` really took."""
        if estimated_s <= 0:
            return
        old = self._correction.get(method, 1.0)
        ratio = min(10.0, max(0.1, actual_s / estimated_s * old))
        self._correction[method] = 0.7 * old + 0.3 * ratio
