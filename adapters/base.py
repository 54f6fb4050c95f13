"""The one interface every test-time method implements, and the registry that holds them.

A method is a stateless object. Per request it is handed the image features and the class
features, builds whatever state that request needs (prompt context, LoRA factors, prototype
shifts, optimizer), adapts it, and returns logits; the state dies with the request and the
backbone is never modified. Options are a frozen dataclass deriving from ``MethodOptions``, with
the paper's defaults, validated in ``__post_init__``, listed by ``/v1/methods`` and settable per
request under ``options``; ``Method`` is generic in its options type. Three option groups are shared:
``descriptions`` (every method: the description head, and MSTA's consistency term for text-side
methods), ``ensemble`` (methods that adapt: APEX's blend with zero-shot, applied by the engine) and
``regularizers`` (gradient methods: anchor regularizers; ``regularizer_kinds`` says which apply).

A method sees the model only through the ``adapters.backbone.Backbone`` protocol.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import TypeAdapter, ValidationError

from adapters.backbone import Backbone
from adapters.descriptions import TEMPLATES_ONLY, DescriptionFeatures, DescriptionOptions
from adapters.ensemble import NO_ENSEMBLE, EnsembleOptions
from adapters.regularizers import NO_REGULARIZERS, RegularizerOptions

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: what the server asks of any method's options, with the values of a
    method that has no such field. A method's options override them with fields of the same name."""

    descriptions: DescriptionOptions = TEMPLATES_ONLY

    @property
    def views(self) -> int:
        """Views per image, the image itself included; 1: the base view only."""
        return 1

    @property
    def augmentation(self) -> str:
        """How augmented views are made: "crop_flip" (random resized crops with flips) or "augmix"."""
        return "crop_flip"

    @property
    def steps(self) -> int:
        """Optimizer steps per image; 0: no gradient step."""
        return 0

    @property
    def ctx_init(self) -> str | None:
        """The text a learned prompt context starts from (prompt tuning); None: the method learns none."""
        return None

    @property
    def ensemble(self) -> EnsembleOptions:
        """The blend of adapted and zero-shot answers; off for a method without the option."""
        return NO_ENSEMBLE

    @property
    def regularizers(self) -> RegularizerOptions:
        """Anchor regularizer weights; all 0 for a method without the option."""
        return NO_REGULARIZERS


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


@dataclass
class AdaptInput:
    """What a method is given for one image of one request. Everything here is the request's own."""

    view_features: torch.Tensor  # [V, D] unit-norm, no grad; row 0 is the base (unaugmented) view
    class_features: torch.Tensor  # [C, D] unit-norm zero-shot classifier (template ensemble)
    logit_scale: float
    labels: tuple[str, ...]
    generator: torch.Generator  # the request's; every random draw of the method comes from it
    backbone: Backbone  # for methods that re-run a tower (TPT: text, TTL: vision)
    views: torch.Tensor | None = None  # [V, 3, h, w] preprocessed pixels, for methods that re-encode them
    cache: dict[str, Any] = field(default_factory=dict)  # what the method's ``encode_views`` kept (TTL: prefix)
    stop: Callable[[], bool] = lambda: False  # True once nobody waits for this image (deadline, disconnect)
    descriptions: DescriptionFeatures | None = None  # the label set's, when the options use them
    anchors: torch.Tensor | None = None  # [M, D] unit-norm anchor texts, when options.regularizers.anchor_kl > 0

    def zero_shot_logits(self) -> torch.Tensor:
        """[V, C] the frozen model's logits for every view."""
        return self.logit_scale * self.view_features @ self.class_features.T


@dataclass
class AdaptResult:
    """A method's answer for one image: final logits of the base view and what it did to get there."""

    logits: torch.Tensor  # [C]
    steps: int = 0  # optimizer steps (or iterations, for forward-only methods) taken
    selected_views: int = 1  # views the loss or vote used
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific report fields (ZERO: agreement)
    order: torch.Tensor | None = None  # [C] class indices best first, when not the order of ``logits`` (ZERO)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapted parameters, detached (for tests)


class OptionsError(ValueError):
    """Raised for options a method does not accept; the message is shown to the client."""


class Stopped(Exception):
    """Raised between steps when every image of a batch has lost its caller (deadline or disconnect)."""


@dataclass(frozen=True)
class Cost:
    """What adapting one image costs, in forward-pass equivalents (a backward pass counts as two), and
    the activations it keeps, in whole-tower units.

    The engine turns these into seconds and bytes with what one image and one prompt token take,
    measured at start-up (``server.engine.admission``), admits adaptation work against a budget in seconds and
    stacks images within a budget in bytes. Encoding the views is priced by the engine from ``n_views``.
    """

    image_passes: float  # images through the vision tower
    prompt_passes: float = 0.0  # prompts through the text tower (TPT, C-TPT)
    kept_images: float = 0.0  # images whose vision-tower activations are kept for a backward pass (TTL)
    kept_prompts: float = 0.0  # prompts whose text-tower activations are kept for a backward pass (TPT)


class Method(ABC, Generic[OptionsT]):
    """Base class of test-time methods. Subclasses set ``name``, ``summary`` and ``Options``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: type[OptionsT]  # a frozen MethodOptions dataclass with defaults for every field
    # What each anchor regularizer acts on in this method; a kind not listed is refused (422).
    regularizer_kinds: ClassVar[dict[str, str]] = {}
    # Whether adaptation changes the class text embeddings (TPT, C-TPT): MSTA's consistency term needs it.
    adapts_text: ClassVar[bool] = False
    # Whether adaptation runs the vision tower with parameters of its own (TTL's LoRA): a few-shot adapter's
    # lora part would be bypassed.
    adapts_vision_tower: ClassVar[bool] = False

    def parse_options(self, raw: dict[str, Any] | None) -> OptionsT:
        """Validate a request's ``options`` into this method's Options; unknown keys are errors."""
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(raw) - known)
        if unknown:
            accepted = ", ".join(sorted(known)) or "none"
            raise OptionsError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; it accepts: {accepted}")
        types = {f.name: str(f.type) for f in dataclasses.fields(self.Options)}
        for key, value in raw.items():
            if isinstance(value, bool) and "bool" not in types[key]:  # a lax validator reads true as 1
                raise OptionsError(f"options.{key} must be a number, not {str(value).lower()}")
        for key in ("descriptions", "ensemble", "regularizers"):
            group = raw.get(key)
            if isinstance(group, dict):
                for name, value in group.items():
                    if isinstance(value, bool) and name != "consistency":
                        raise OptionsError(f"options.{key}.{name} must be a number or a name, not {str(value).lower()}")
        try:
            options = TypeAdapter(self.Options).validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg")).removeprefix("Value error, ")
            raise OptionsError(f"options.{where}: {msg}" if where else msg) from exc
        except (TypeError, ValueError) as exc:  # raised by the dataclass's own __post_init__ checks
            raise OptionsError(str(exc)) from exc
        self.check_groups(options)
        return options

    def check_groups(self, options: OptionsT) -> None:
        """Refuse a shared option group this method cannot act on, saying why."""
        for kind in options.regularizers.asked():
            if kind not in self.regularizer_kinds:
                has = ", ".join(f"{k} ({v})" for k, v in self.regularizer_kinds.items())
                raise OptionsError(
                    f"options.regularizers.{kind} does not apply to {self.name!r}"
                    + (f": it regularizes {has}" if has else ": it trains no parameters")
                )
        if options.descriptions.consistency and not self.adapts_text:
            raise OptionsError(
                f"options.descriptions.consistency keeps adapted class text embeddings near their descriptions, "
                f"but {self.name!r} never changes the text embeddings (it adapts the image side or nothing); "
                "use it with tpt or ctpt"
            )

    def options_schema(self) -> dict[str, Any]:
        return TypeAdapter(self.Options).json_schema()

    def cost(self, options: OptionsT, n_classes: int) -> Cost:
        """The forward passes adapting one image takes; the default encodes its views once."""
        return Cost(image_passes=float(options.views))

    def encode_views(
        self, backbone: Backbone, views: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Encode each image's views in one pass: per image, [V, D] unit-norm features and a cache for ``adapt``.

        TTL overrides it to keep the activations that enter its adapted blocks.
        """
        sizes = [v.shape[0] for v in views]
        feats = backbone.encode_images(torch.cat(list(views))).clone()  # [sum V, D], a normal tensor
        return [(f, {}) for f in torch.split(feats, sizes)]

    def adapt(self, inp: AdaptInput, options: OptionsT) -> AdaptResult:
        """Adapt to one image and predict it. The default is no adaptation: the base view's zero-shot logits."""
        return AdaptResult(self.predict(inp.view_features[:1], inp.class_features, inp.logit_scale, options)[0])

    def adapt_batch(self, inputs: Sequence[AdaptInput], options: OptionsT) -> list[AdaptResult]:
        """Adapt to several images (of one or many requests) with the same options.

        Each image's result must be what ``adapt`` gives it alone. Gradient methods override this
        to stack the images' parameters into one computation; the default runs them in turn.
        """
        results = []
        for inp in inputs:
            if inp.stop():
                results.append(AdaptResult(inp.zero_shot_logits()[0].detach(), selected_views=0))
                continue
            results.append(self.adapt(inp, options))
        return results

    def predict(
        self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float, options: OptionsT
    ) -> torch.Tensor:
        """[B, D] unit-norm image features, [C, D] unit-norm class features -> [B, C] zero-shot logits."""
        return logit_scale * image_features @ class_features.T


REGISTRY: dict[str, Method[Any]] = {}

MethodT = TypeVar("MethodT", bound=type[Method[Any]])


def register(cls: MethodT) -> MethodT:
    """Class decorator: validate the method at import time and add one instance to the registry."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise TypeError(f"{cls.__name__}.name must be a lowercase snake_case string, got {name!r}")
    if name in REGISTRY:
        raise TypeError(f"method name {name!r} registered twice ({cls.__name__})")
    options = getattr(cls, "Options", None)
    if not isinstance(options, type) or not dataclasses.is_dataclass(options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.Options.{f.name} needs a default (the paper's)")
    if not issubclass(options, MethodOptions):
        raise TypeError(f"{cls.__name__}.Options must derive from MethodOptions")
    if not getattr(cls, "summary", ""):
        raise TypeError(f"{cls.__name__}.summary must say in one line what the method does")
    REGISTRY[name] = cls()
    return cls
