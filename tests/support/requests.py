"""Classify request bodies shared by the adaptation lane's tests (CPU and GPU)."""

from __future__ import annotations

from typing import Any

from tests.support.images import b64, png_bytes

LABEL_SETS = [
    ["red", "green", "blue", "a cat", "a dog"],
    ["a square", "a circle", "a star"],
    ["apple", "banana", "cherry", "grape"],
]
BATCHED = ["tpt", "ctpt", "tps", "ttl", "zero", "mta"]

# A large learning rate makes the adaptation visible on the tiny model. Not for TTL: Adam's first step is
# about lr * sign(gradient) per weight, so with thousands of LoRA weights whose gradients are ~0, rounding
# differences of a larger matmul flip signs and lr 0.5 turns them into 1e-4 logit differences.
STRONG = {"tpt": {"lr": 0.5}, "ctpt": {"lr": 0.5}, "tps": {"lr": 0.5}}


def body(method: str, seed: int, labels: list[str], **extra: Any) -> dict[str, Any]:
    """One seeded image of its own size, classified against ``labels`` with ``method``."""
    return {
        "images": [b64(png_bytes(seed=seed, size=(60 + seed, 48)))],
        "labels": labels,
        "method": method,
        "seed": seed,
        "top_k": len(labels),
        "options": STRONG.get(method, {}),
        **extra,
    }


def plug(method: str) -> dict[str, Any]:
    """A request for ``LaneHold`` to hold: another method than ``method``, so it never stacks with its requests."""
    return body("tps" if method == "zero" else "zero", 99, LABEL_SETS[0])


def logits(result: dict[str, Any]) -> dict[str, float]:
    return {p["label"]: p["logit"] for p in result["predictions"]}


def probabilities(result: dict[str, Any]) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in result["predictions"]}
