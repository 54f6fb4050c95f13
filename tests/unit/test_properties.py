"""Property-based checks of what parses a request: whatever arrives, the answer is a value or a typed
``InvalidInput``/``BadRequest`` (a 4xx), never another exception (a 500). Derandomized, so CI sees the
same cases every run."""

from __future__ import annotations

import contextlib
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from adapters import get_method, method_names
from server.api.inputs import parse_json_body
from server.errors import BadRequest, InvalidInput
from server.service.decoding import decode_base64, decode_image
from server.service.validation import parse_options, resolve_templates, validate_label_set_name, validate_labels
from server.settings import Settings

SETTINGS = Settings(_env_file=None)
CHECK = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Text with what breaks parsers: control characters, lone surrogates, long runs, braces.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=400) | st.sampled_from(
    ["{}", "{}{}", "a {}", "\ud800", "\n", "{0}", "{x}", "%s", "", " ", "a" * 301]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


FIELDS = ["images", "labels", "label_set", "templates", "top_k", "method", "options", "seed", "compare",
          "abstain_below", "confidence_gate", "other"]  # fmt: skip
OPTIONS = ["views", "steps", "lr", "selection", "ctx_init", "gamma", "rank", "alpha", "blocks", "tau", "iterations",
           "lambda_y", "lambda_q", "dispersion_weight", "junk"]  # fmt: skip
REFUSED = (BadRequest, InvalidInput)  # what the API answers with a 4xx


@CHECK
@given(st.dictionaries(st.sampled_from(FIELDS), json_values))
def test_any_json_body_parses_or_is_refused_with_a_4xx(fields):
    body = json.dumps(fields, allow_nan=True).encode("utf-8", "surrogatepass")
    with contextlib.suppress(*REFUSED):
        parse_json_body(body)


@CHECK
@given(st.binary(max_size=2000))
def test_any_bytes_as_json_parse_or_are_refused(raw):
    with contextlib.suppress(*REFUSED):
        parse_json_body(raw)


@CHECK
@given(st.lists(texts, max_size=8) | texts)
def test_templates_resolve_or_are_refused(value):
    try:
        resolved = resolve_templates(value, SETTINGS)
    except InvalidInput:
        return
    assert resolved and all("{}" in t and len(t) <= SETTINGS.max_template_chars for t in resolved)


@CHECK
@given(st.lists(texts, max_size=8), texts)
def test_labels_and_names_validate_or_are_refused(labels, name):
    try:
        checked = validate_labels(labels, SETTINGS)
        assert len(set(checked)) == len(checked) and all(c.strip() for c in checked)
        checked[0].encode("utf-8")  # valid Unicode: the tokenizer and the store can take it
    except InvalidInput:
        pass
    with contextlib.suppress(InvalidInput):
        assert validate_label_set_name(name) == name and "\n" not in name


@CHECK
@given(st.sampled_from(method_names()), st.dictionaries(st.sampled_from(OPTIONS), json_values, max_size=4))
def test_any_options_parse_into_the_methods_options_or_are_refused(name, raw):
    method = get_method(name)
    try:
        options = parse_options(method, raw)
    except InvalidInput:
        return
    assert isinstance(options, method.Options)


@CHECK
@given(st.binary(max_size=600) | st.builds(lambda cut, flip: PNG[:cut] + bytes([flip]) + PNG[cut + 1 :],
       st.integers(0, len(PNG) - 1), st.integers(0, 255)))  # fmt: skip
def test_any_bytes_decode_to_an_rgb_image_or_are_refused(data):
    try:
        image = decode_image(data, 0, SETTINGS.max_image_pixels, SETTINGS.max_aspect_ratio)
    except InvalidInput:
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0


@CHECK
@given(texts)
def test_any_text_as_base64_decodes_or_is_refused(text):
    with contextlib.suppress(InvalidInput):
        decode_base64(text, 0)
