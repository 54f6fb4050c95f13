"""Checking what a caller asks for against the server's limits: labels, templates, label-set names,
descriptions, image counts, method options and top_k.

Each problem raises ``InvalidInput`` with its own code, so a client can tell them apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from adapters import Method, MethodOptions, OptionsError, get_method, method_names
from server.clip.templates import PLACEHOLDER, TEMPLATE_SETS
from server.errors import InvalidInput
from server.settings import Settings

_LABEL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let a final newline by


def check_text(text: str, where: str) -> str:
    """Text that is valid Unicode: JSON's ``\\ud800`` escapes decode to lone surrogates, which no encoder
    (the tokenizer, the store, the JSON of an answer) can write."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"{where} is not valid Unicode text: a lone surrogate {text[exc.start]!r} at character {exc.start}",
                code="invalid_text",
            ) from exc
    return text


def validate_labels(labels: Sequence[str] | None, settings: Settings, where: str = "labels") -> tuple[str, ...]:
    if not labels:
        raise InvalidInput(f"{where} is empty: give at least one label, or a label_set", code="no_labels")
    if len(labels) > settings.max_labels:
        raise InvalidInput(
            f"{len(labels)} labels; the limit is {settings.max_labels} (TTA_MAX_LABELS)", code="too_many_labels"
        )
    cleaned = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise InvalidInput(f"{where}[{i}] is empty", code="empty_label")
        check_text(label, f"{where}[{i}]")
        label = " ".join(label.split())
        if len(label) > settings.max_label_chars:
            raise InvalidInput(
                f"{where}[{i}] has {len(label)} characters; the limit is {settings.max_label_chars}",
                code="label_too_long",
            )
        cleaned.append(label)
    seen: dict[str, int] = {}
    for i, label in enumerate(cleaned):
        if label in seen:
            raise InvalidInput(
                f"{where}[{i}] {label!r} repeats {where}[{seen[label]}]; labels must be unique",
                code="duplicate_labels",
            )
        seen[label] = i
    return tuple(cleaned)


def resolve_templates(
    value: Sequence[str] | str | None, settings: Settings, fallback: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """A named set or an explicit list to a tuple of templates; None falls back, then to the server default."""
    if value is None:
        if fallback is not None:
            return fallback
        value = settings.default_templates
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            raise InvalidInput(
                f"unknown template set {value!r}; named sets are {', '.join(sorted(TEMPLATE_SETS))}, "
                "or pass a list of templates containing {}",
                code="unknown_template_set",
            )
        return TEMPLATE_SETS[value]
    if not value:
        raise InvalidInput("templates is an empty list", code="invalid_templates")
    if len(value) > settings.max_templates:
        raise InvalidInput(
            f"{len(value)} templates; the limit is {settings.max_templates} (TTA_MAX_TEMPLATES)",
            code="too_many_templates",
        )
    for i, template in enumerate(value):
        check_text(template, f"templates[{i}]")
        if len(template) > settings.max_template_chars:
            raise InvalidInput(
                f"templates[{i}] has {len(template)} characters; the limit is {settings.max_template_chars} "
                "(TTA_MAX_TEMPLATE_CHARS)",
                code="template_too_long",
            )
        if PLACEHOLDER not in template:
            raise InvalidInput(
                f"templates[{i}] {template!r} has no {{}} where the label goes", code="invalid_templates"
            )
    return tuple(value)


def validate_label_set_name(name: str) -> str:
    if not _LABEL_SET_NAME.fullmatch(name):
        raise InvalidInput(
            f"label set name {name!r} is invalid: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def validate_descriptions(
    descriptions: Mapping[str, list[str]] | None, labels: tuple[str, ...], settings: Settings
) -> dict[str, list[str]] | None:
    if descriptions is None:
        return None
    unknown = [k for k in descriptions if k not in labels]
    if unknown:
        raise InvalidInput(
            f"descriptions name labels not in the set: {', '.join(map(repr, unknown[:5]))}", code="invalid_descriptions"
        )
    for key, items in descriptions.items():
        if len(items) > settings.max_descriptions:
            raise InvalidInput(
                f"descriptions[{key!r}] has {len(items)} descriptions; the limit is {settings.max_descriptions} "
                "per label (TTA_MAX_DESCRIPTIONS)",
                code="invalid_descriptions",
            )
        for j, item in enumerate(items):
            check_text(item, f"descriptions[{key!r}][{j}]")
            if len(item) > settings.max_template_chars:
                raise InvalidInput(
                    f"descriptions[{key!r}][{j}] has {len(item)} characters; the limit is "
                    f"{settings.max_template_chars} (TTA_MAX_TEMPLATE_CHARS)",
                    code="invalid_descriptions",
                )
        if any(not d.strip() for d in items):
            raise InvalidInput(f"descriptions[{key!r}] holds an empty description", code="invalid_descriptions")
    return dict(descriptions)


def check_image_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise InvalidInput("no images: send at least one", code="no_images")
    if n > settings.max_images_per_request:
        raise InvalidInput(
            f"{n} images; the limit is {settings.max_images_per_request} per request (TTA_MAX_IMAGES_PER_REQUEST)",
            code="too_many_images",
        )


def resolve_method(name: str | None, settings: Settings) -> Method[MethodOptions]:
    """The method a request names, or the server's default."""
    name = name or settings.default_method
    if name not in method_names():
        raise InvalidInput(
            f"unknown method {name!r}; known methods: {', '.join(method_names())}", code="unknown_method"
        )
    return get_method(name)


def parse_options(method: Method[MethodOptions], raw: Mapping[str, object] | None) -> MethodOptions:
    """A request's ``options`` validated into ``method``'s options dataclass."""
    for key, value in (raw or {}).items():
        if isinstance(value, str):
            check_text(value, f"options.{key}")
    try:
        return method.parse_options(dict(raw) if raw is not None else None)
    except OptionsError as exc:
        raise InvalidInput(str(exc), code="invalid_options") from exc


def check_limits(options: MethodOptions, settings: Settings) -> None:
    """Views and steps within what the server allows (TTA_MAX_VIEWS, TTA_MAX_STEPS)."""
    if options.views > settings.max_views:
        raise InvalidInput(
            f"options.views={options.views}; the limit is {settings.max_views} (TTA_MAX_VIEWS)", code="invalid_options"
        )
    if options.steps > settings.max_steps:
        raise InvalidInput(
            f"options.steps={options.steps}; the limit is {settings.max_steps} (TTA_MAX_STEPS)", code="invalid_options"
        )


def resolve_top_k(top_k: int | None, n_labels: int, settings: Settings) -> int:
    """Predictions per image: the request's ``top_k`` within TTA_MAX_TOP_K (default: the server's), at most C."""
    if top_k is not None and top_k > settings.max_top_k:
        raise InvalidInput(f"top_k={top_k}; the limit is {settings.max_top_k}", code="invalid_top_k")
    return min(top_k or settings.default_top_k, n_labels)
