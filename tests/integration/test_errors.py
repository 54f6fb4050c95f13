"""Bad input never yields a 500 or a hang: each case has its status, its own code and a clear message."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.api import create_app
from tests.support.apps import wait_ready
from tests.support.images import b64, png_bytes

LABELS = ["red", "green"]


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny body: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def assert_error(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    for word in words:
        assert word in body["error"]["message"]
    return body


def classify(client, images, **extra):
    return client.post("/v1/classify", json={"images": images, "labels": LABELS, **extra})


def test_not_an_image(client):
    assert_error(classify(client, [b64(b"hello, I am text")]), 422, "invalid_image", "image 0")


def test_truncated_image(client):
    data = png_bytes(seed=1, size=(64, 64))
    assert_error(classify(client, [b64(png_bytes()), b64(data[: len(data) // 2])]), 422, "truncated_image", "image 1")


def test_zero_byte_image_in_json_and_multipart(client):
    assert_error(classify(client, [""]), 422, "empty_image")
    r = client.post("/v1/classify", files={"image": ("e.png", b"", "image/png")}, data={"labels": LABELS})
    assert_error(r, 422, "empty_image")


def test_huge_dimensions_are_refused_before_decoding(client):
    assert_error(classify(client, [b64(huge_png(100_000, 100_000))]), 422, "image_too_large", "TTA_MAX_IMAGE_PIXELS")


def test_invalid_base64(client):
    assert_error(classify(client, ["not base64!!"]), 422, "invalid_base64")
    assert_error(classify(client, ["data:image/png,rawtext"]), 422, "invalid_base64", "base64")


def test_body_over_the_limit_is_413(settings):
    settings.max_body_bytes = 4096
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        big = b64(png_bytes(seed=2, size=(100, 100)))
        assert_error(classify(c, [big]), 413, "body_too_large", "TTA_MAX_BODY_BYTES")
        r = c.post(
            "/v1/classify",
            files={"image": ("a.png", png_bytes(seed=2, size=(100, 100)), "image/png")},
            data={"labels": LABELS},
        )
        assert_error(r, 413, "body_too_large")
        # A chunked body declares no length: the limit still holds as the bytes arrive.
        chunks = (b'{"images": ["' + b"A" * 1000 for _ in range(10))
        r = c.post("/v1/classify", content=chunks, headers={"content-type": "application/json"})
        assert_error(r, 413, "body_too_large")
        assert 'tta_rejected_total{reason="body_too_large"} 3.0' in c.get("/metrics").text


def test_no_labels(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())]})
    assert_error(r, 422, "no_labels")
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": []})
    assert_error(r, 422, "no_labels")


def test_duplicate_and_empty_labels(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["cat", "dog", "cat"]})
    assert_error(r, 422, "duplicate_labels", "labels[2]", "labels[0]")
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["cat", "  "]})
    assert_error(r, 422, "empty_label", "labels[1]")


def test_labels_and_label_set_together(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["a"], "label_set": "tiny-colours"})
    assert_error(r, 422, "labels_and_label_set")


def test_unknown_label_set_is_404(client):
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "label_set": "nope"})
    assert_error(r, 404, "unknown_label_set", "nope")


def test_unknown_method_names_the_known_ones(client):
    r = classify(client, [b64(png_bytes())], method="magic")
    assert_error(r, 422, "unknown_method", "magic", "zero_shot")


def test_unknown_option(client):
    r = classify(client, [b64(png_bytes())], options={"lr": 0.1})
    assert_error(r, 422, "invalid_options", "lr")


def test_too_many_images_and_labels(settings):
    settings.max_images_per_request = 2
    settings.max_labels = 3
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert_error(classify(c, [b64(png_bytes())] * 3), 422, "too_many_images", "limit is 2")
        r = c.post("/v1/classify", files=[("image", ("a.png", png_bytes(), "image/png"))] * 3, data={"labels": LABELS})
        assert_error(r, 422, "too_many_images")
        r = c.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": ["a", "b", "c", "d"]})
        assert_error(r, 422, "too_many_labels", "limit is 3")
        r = c.post("/v1/label-sets", json={"name": "big", "labels": ["a", "b", "c", "d"]})
        assert_error(r, 422, "too_many_labels")


def test_no_images(client):
    assert_error(client.post("/v1/classify", json={"images": [], "labels": LABELS}), 422, "no_images")
    assert_error(
        client.post("/v1/classify", files={"other": ("a", b"x")}, data={"labels": LABELS}), 422, "invalid_form", "other"
    )
    r = client.post("/v1/classify", data={"labels": LABELS}, files={"x": ("", b"")})
    assert r.status_code == 422


def test_malformed_bodies(client):
    r = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    r = client.post("/v1/classify", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    r = client.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    r = client.post("/v1/classify", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "invalid_form")
    r = client.post("/v1/classify", json={"images": [b64(png_bytes())], "labels": LABELS, "colour": "red"})
    assert_error(r, 422, "validation_error", "colour")
    r = client.post("/v1/classify", json={"images": "abc", "labels": LABELS})
    assert_error(r, 422, "validation_error", "images")
    r = client.post(
        "/v1/classify",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"labels": LABELS, "options": "{oops"},
    )
    assert_error(r, 400, "invalid_form", "options")


def test_bad_templates_and_top_k(client):
    assert_error(classify(client, [b64(png_bytes())], templates="fancy"), 422, "unknown_template_set", "ensemble7")
    assert_error(classify(client, [b64(png_bytes())], templates=["no placeholder"]), 422, "invalid_templates")
    assert_error(classify(client, [b64(png_bytes())], templates=[]), 422, "invalid_templates")
    assert_error(classify(client, [b64(png_bytes())], top_k=0), 422, "validation_error", "top_k")
    assert_error(classify(client, [b64(png_bytes())], top_k=5000), 422, "invalid_top_k")


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_bad_image_among_good_ones_fails_the_request_not_the_server(client, mode):
    good = io.BytesIO()
    Image.new(mode, (16, 16)).save(good, format="PNG")
    r = classify(client, [b64(good.getvalue()), b64(b"\x89PNG\r\n\x1a\nrubbish")])
    assert r.status_code == 422
    assert classify(client, [b64(good.getvalue())]).status_code == 200


def test_text_that_is_not_valid_unicode_is_refused_and_never_stored(client):
    """JSON's lone-surrogate escape decodes to a string no encoder can write: refused with its place named,
    so it never reaches the tokenizer or the store (where it once made every list of label sets a 500)."""
    surrogate = '"a\\ud800"'

    def post(path: str, body: str):
        return client.post(path, content=body, headers={"content-type": "application/json"})

    image = b64(png_bytes())
    r = post("/v1/classify", f'{{"images": ["{image}"], "labels": [{surrogate}, "b"]}}')
    assert_error(r, 422, "invalid_text", "labels[0]", "surrogate")
    r = post("/v1/classify", f'{{"images": ["{image}"], "labels": ["a", "b"], "templates": [{surrogate[:-1]} {{}}"]}}')
    assert_error(r, 422, "invalid_text", "templates[0]")
    r = post(
        "/v1/classify",
        f'{{"images": ["{image}"], "labels": ["a"], "method": "tpt", "options": {{"ctx_init": {surrogate}}}}}',
    )
    assert_error(r, 422, "invalid_text", "options.ctx_init")
    assert_error(post("/v1/label-sets", f'{{"name": "x", "labels": [{surrogate}]}}'), 422, "invalid_text")
    body = f'{{"name": "y", "labels": ["a"], "descriptions": {{"a": [{surrogate}]}}}}'
    assert_error(post("/v1/label-sets", body), 422, "invalid_text", "descriptions")
    listed = client.get("/v1/label-sets")
    assert listed.status_code == 200 and not {"x", "y"} & {s["name"] for s in listed.json()["label_sets"]}


def test_json_nested_past_the_parser_is_a_400(client):
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/v1/classify", content=b'{"images": ' + deep + b"}", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json", "nested too deeply")
    files = [("image", ("a.png", png_bytes(), "image/png"))]
    r = client.post("/v1/classify", files=files, data={"labels": "a", "options": "[" * 100_000})
    assert_error(r, 400, "invalid_form", "options")
    r = client.post(
        "/v1/label-sets",
        content=b'{"name": "x", "labels": ' + deep + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["request_id"]


def test_a_label_set_name_may_not_end_in_a_newline(client):
    assert_error(client.post("/v1/label-sets", json={"name": "ok\n", "labels": ["a"]}), 422, "invalid_name")


def test_a_newline_in_the_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="ttaserve")
    r = client.get("/v1/label-sets/x%0A2026-01-01 INFO forged%0D")
    assert r.status_code == 404
    lines = [record.getMessage() for record in caplog.records]
    assert all("\n" not in line and "\r" not in line for line in lines), lines
    assert any("x\\x0a2026-01-01 INFO forged\\x0d" in line for line in lines), lines


def test_inputs_that_would_amplify_work_are_refused_before_it_starts(client):
    """Each is cheap to send and expensive to serve: refused with its own code before it decodes or queues."""
    strip = Image.new("RGB", (100_000, 1))  # 370 bytes as a PNG; resized on its short side it was gigabytes
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    r = client.post("/v1/classify", json={"images": [b64(buf.getvalue())], "labels": LABELS})
    assert_error(r, 422, "extreme_aspect_ratio", "100000x1", "TTA_MAX_ASPECT_RATIO")
    wide = io.BytesIO()
    Image.new("RGB", (190, 10), (200, 30, 30)).save(wide, format="PNG")  # 19:1, within the limit
    assert client.post("/v1/classify", json={"images": [b64(wide.getvalue())], "labels": LABELS}).status_code == 200

    image = b64(png_bytes())
    r = client.post("/v1/classify", json={"images": [image], "labels": LABELS, "templates": ["a {} " + "x" * 60_000]})
    assert_error(r, 422, "template_too_long", "TTA_MAX_TEMPLATE_CHARS")
    options = {"ctx_init": "a" * 20_000}
    r = client.post("/v1/classify", json={"images": [image], "labels": LABELS, "method": "tpt", "options": options})
    assert_error(r, 422, "invalid_options", "ctx_init has 20000 characters")
    many = {"red": [f"a red thing number {i}" for i in range(200_000)]}
    r = client.post("/v1/label-sets", json={"name": "many", "labels": LABELS, "descriptions": many})
    assert_error(r, 422, "invalid_descriptions", "TTA_MAX_DESCRIPTIONS")
    long = {"red": ["x" * 1000]}
    r = client.post("/v1/label-sets", json={"name": "long", "labels": LABELS, "descriptions": long})
    assert_error(r, 422, "invalid_descriptions", "TTA_MAX_TEMPLATE_CHARS")


def test_booleans_are_not_numbers(client):
    """JSON's true is 1 to a lax validator: confidence_gate: false skipped every adaptation, abstain_below: true
    abstained on everything."""
    image = b64(png_bytes())
    for field, value in (("confidence_gate", False), ("abstain_below", True), ("top_k", True), ("seed", False)):
        r = client.post("/v1/classify", json={"images": [image], "labels": LABELS, field: value})
        assert_error(r, 422, "validation_error", field, "not true or false")
    r = client.post(
        "/v1/classify", json={"images": [image], "labels": LABELS, "method": "tpt", "options": {"steps": True}}
    )
    assert_error(r, 422, "invalid_options", "options.steps must be a number")
    r = client.post(
        "/v1/classify", json={"images": [image], "labels": LABELS, "abstain_below": 1}
    )  # an int is a number
    assert r.status_code == 200 and r.json()["results"][0]["abstained"] in (True, False)
