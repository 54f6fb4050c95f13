"""The only code that knows open_clip: resolving and loading a model, its card, encoders, prompt learning on
the text tower, LoRA on the vision tower, activation probes, and CLIP's prompt templates.

``Backbone`` implements ``adapters.Backbone`` for open_clip models.
"""

from server.clip.backbone import Backbone, load_backbone
from server.clip.card import ModelCard, read_card, write_card
from server.clip.spec import ModelSpec, resolve_device, resolve_model

__all__ = [
    "Backbone",
    "ModelCard",
    "ModelSpec",
    "load_backbone",
    "read_card",
    "resolve_device",
    "resolve_model",
    "write_card",
]
