"""What the server says about itself: the loaded model, and the methods with their options and limits."""

from __future__ import annotations

from typing import Any

from adapters import get_method, method_names
from adapters.online import ONLINE_METHODS
from server.clip.spec import ModelSpec
from server.clip.templates import TEMPLATE_SETS
from server.engine import Engine
from server.service.calibration import Calibration
from server.service.label_sets import LabelSets
from server.service.sessions import SESSION_METHODS
from server.settings import Settings


def model_info(spec: ModelSpec, engine: Engine, label_sets: LabelSets, calibration: Calibration) -> dict[str, Any]:
    """The loaded model (one per process): its device, precision and shape, its label sets and temperatures."""
    backbone = engine.backbone
    if backbone is None:
        return {"id": spec.display, "pretrained": spec.pretrained, "demo": spec.is_demo, "ready": False}
    return {
        "id": spec.display,
        "open_clip_name": spec.name,
        "pretrained": spec.pretrained,
        "demo": spec.is_demo,
        "description": spec.card.description,
        "device": str(backbone.device),
        "precision": backbone.precision,
        "image_size": list(backbone.image_size),
        "embed_dim": backbone.embed_dim,
        "context_length": backbone.context_length,
        "logit_scale": backbone.logit_scale,
        "fingerprint": backbone.fingerprint,
        "ready": engine.ready,
        "label_sets": sorted(label_sets.shipped),
        "calibration": calibration.describe(),
    }


def methods_info(settings: Settings) -> dict[str, Any]:
    """Every test-time method with its options schema, and the server limits that bound a request."""
    s = settings
    limits = {
        "max_images_per_request": s.max_images_per_request,
        "max_labels": s.max_labels,
        "max_templates": s.max_templates,
        "max_top_k": s.max_top_k,
        "max_image_pixels": s.max_image_pixels,
        "max_body_bytes": s.max_body_bytes,
        "request_timeout_s": s.request_timeout_s,
        "max_views": s.max_views,
        "max_steps": s.max_steps,
        "max_frames": s.max_frames,
    }
    methods = [
        {
            "name": name,
            "summary": get_method(name).summary,
            "options_schema": get_method(name).options_schema(),
            "limits": limits,
        }
        for name in method_names()
    ]
    return {
        "default": s.default_method,
        "template_sets": {k: list(v) for k, v in TEMPLATE_SETS.items()},
        "methods": methods,
        "sessions": {
            "default": s.session_method,
            "combines_with": list(SESSION_METHODS),
            "methods": [{"name": name, "summary": m.summary} for name, m in sorted(ONLINE_METHODS.items())],
        },
    }
