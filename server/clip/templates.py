"""Prompt templates: named sets built in, and how labels become prompts.

A template holds ``{}`` where the label goes. Named sets:

- ``simple``: "a photo of a {}.", CLIP's default single prompt.
- ``openai_imagenet``: the 80 templates CLIP used for ImageNet zero-shot.
- ``ensemble7``: the 7-template subset from CLIP's notebooks that TDA and others use.

The two larger sets are rendered from open_clip's own metadata, so they match it exactly.

A label's descriptions become prompts as in "Visual Classification via Description" (Menon and
Vondrick, 2023), whose rules TPS's descriptor prototypes follow: ``"{label}, which {connector}
{description}"``.
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

PLACEHOLDER = "{}"

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "openai_imagenet": tuple(t(PLACEHOLDER) for t in OPENAI_IMAGENET_TEMPLATES),
    "ensemble7": tuple(t(PLACEHOLDER) for t in SIMPLE_IMAGENET_TEMPLATES),
}


def render(template: str, label: str) -> str:
    """The prompt for one label; plain replacement, so other braces in a template are kept as they are."""
    return template.replace(PLACEHOLDER, label)


_VERB_STARTS = ("has", "often", "typically", "may", "can")


def describe(label: str, description: str) -> str:
    """``"{label}, which is/has ... {description}"``, the connector chosen by the description's first word."""
    text = description.strip()
    first = text.split(" ", 1)[0].lower()
    if first in ("a", "an") or first == "used":
        connector = "is "
    elif first in _VERB_STARTS:
        connector = ""
    else:
        connector = "has "
    return f"{label}, which {connector}{text}"
