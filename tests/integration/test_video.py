"""Video and multi-frame requests through POST /v1/classify: pooling, sampling, files, limits; and the
per-request view options (AugMix, ``ctx_init`` read as the official TPT reads it)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import Settings
from tests.support.apps import wait_ready
from tests.support.images import b64, png_bytes
from tests.support.requests import logits

LABELS = ["red", "green", "blue", "a cat", "a dog"]
# Tight enough to catch a wrong pooling or a different frame; loose enough for float summation order.
ATOL = 1e-4


def frames(n: int, size: tuple[int, int] = (48, 40)) -> list[bytes]:
    return [png_bytes(seed=10 + i, size=size) for i in range(n)]


def classify(client: TestClient, **body: object) -> dict[str, object]:
    r = client.post("/v1/classify", json={"labels": LABELS, "top_k": len(LABELS), **body})
    assert r.status_code == 200, r.text
    return r.json()


def only(body: dict[str, object]) -> dict[str, float]:
    results = body["results"]
    assert isinstance(results, list) and len(results) == 1  # a video is one answer
    return logits(results[0])


def assert_same(a: dict[str, float], b: dict[str, float], atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) <= atol for k in a), (a, b)


def differs(a: dict[str, float], b: dict[str, float]) -> bool:
    return any(abs(a[k] - b[k]) > 1e-3 for k in a)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_identical_frames_give_the_single_image_scores(client, pooling):
    image = png_bytes(seed=3, size=(50, 44))
    single = only(classify(client, images=[b64(image)]))
    video = only(classify(client, video={"frames": [b64(image)] * 5, "sampling": "all", "pooling": pooling}))
    assert_same(video, single)


@pytest.mark.parametrize(("method", "options"), [("tpt", {"lr": 0.5}), ("tps", {"lr": 0.5}), ("zero", {}), ("mta", {})])
def test_identical_frames_give_the_single_image_scores_when_adapting(client, method, options):
    """A clip's views crop every frame alike, drawn as one image's views are: T copies adapt as the image."""
    image = png_bytes(seed=4, size=(56, 44))
    common = {"method": method, "seed": 7, "options": {"views": 16, **options}}
    single = classify(client, images=[b64(image)], **common)
    video = classify(client, video={"frames": [b64(image)] * 4, "sampling": "all"}, **common)
    assert_same(only(video), only(single))
    assert video["results"][0]["adaptation"]["views"] == 16


def test_permuting_frames_does_not_change_mean_pooled_scores(client):
    clip = [b64(f) for f in frames(6)]
    order = [3, 0, 5, 1, 4, 2]
    a = only(classify(client, video={"frames": clip, "sampling": "all"}))
    b = only(classify(client, video={"frames": [clip[i] for i in order], "sampling": "all"}))
    assert_same(a, b)
    # The frames matter: a clip of another frame set scores differently.
    assert differs(a, only(classify(client, video={"frames": clip[:2], "sampling": "all"})))


def test_max_pooling_takes_each_class_at_its_best_frame(client):
    clip = frames(3)
    per_frame = [only(classify(client, images=[b64(f)])) for f in clip]
    pooled = only(classify(client, video={"frames": [b64(f) for f in clip], "pooling": "max"}))
    assert_same(pooled, {k: max(p[k] for p in per_frame) for k in LABELS})


@pytest.mark.parametrize(
    ("sampling", "num_frames", "picked"),
    [("segment", 3, [1, 5, 8]), ("uniform", 3, [0, 5, 9]), ("uniform", 20, list(range(10))), ("all", 2, None)],
)
def test_sampling_picks_the_frames_it_says(client, sampling, num_frames, picked):
    clip = [b64(f) for f in frames(10)]
    picked = list(range(10)) if picked is None else picked
    sampled = only(classify(client, video={"frames": clip, "num_frames": num_frames, "sampling": sampling}))
    expected = only(classify(client, video={"frames": [clip[i] for i in picked], "sampling": "all"}))
    assert_same(sampled, expected)


def test_multipart_frames_equal_json_frames(client):
    clip = frames(4)
    files = [("frame", (f"{i}.png", f, "image/png")) for i, f in enumerate(clip)]
    r = client.post(
        "/v1/classify",
        files=files,
        data={"labels": LABELS, "top_k": str(len(LABELS)), "num_frames": "2", "sampling": "uniform", "pooling": "max"},
    )
    assert r.status_code == 200, r.text
    as_json = classify(
        client, video={"frames": [b64(f) for f in clip], "num_frames": 2, "sampling": "uniform", "pooling": "max"}
    )
    assert_same(only(r.json()), only(as_json))


def video_file(colours: list[tuple[int, int, int]], size: tuple[int, int] = (48, 32)) -> bytes:
    """A lossless video (FFV1 in Matroska) whose frame i is a flat ``colours[i]`` with a moving square."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb24" if "rgb24" in {f.name for f in stream.codec.video_formats or []} else "bgr0"
        for i, colour in enumerate(colours):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[:] = colour
            pixels[8:20, 2 + 3 * i : 14 + 3 * i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decoded_frames(data: bytes) -> list[bytes]:
    """The file's frames as PNGs, decoded here with PyAV."""
    out = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            buf = io.BytesIO()
            frame.to_image().convert("RGB").save(buf, format="PNG")
            out.append(buf.getvalue())
    return out


def test_a_video_file_is_sampled_and_pooled_as_its_frames(client):
    colours = [(20 * i, 200 - 15 * i, 40 + 10 * i) for i in range(10)]
    data = video_file(colours)
    pngs = decoded_frames(data)
    assert len(pngs) == 10
    for payload in ({"file": b64(data)}, {"file": f"data:video/x-matroska;base64,{b64(data)}"}):
        sampled = only(classify(client, video={**payload, "num_frames": 3, "sampling": "uniform"}))
        expected = only(classify(client, video={"frames": [b64(pngs[i]) for i in (0, 5, 9)], "sampling": "all"}))
        assert_same(sampled, expected)
    r = client.post(
        "/v1/classify",
        files=[("video", ("clip.mkv", data, "video/x-matroska"))],
        data={"labels": LABELS, "top_k": str(len(LABELS)), "num_frames": "3", "sampling": "uniform"},
    )
    assert r.status_code == 200, r.text
    assert_same(only(r.json()), expected)
    adapted = classify(client, video={"file": b64(data), "num_frames": 4}, method="tps", seed=1, options={"views": 8})
    assert adapted["results"][0]["adaptation"]["views"] == 8


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient]:
    limited = settings.model_copy(update={"max_frames": 4, "max_body_bytes": 64 * 1024})
    with TestClient(create_app(limited), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(
    ("video", "extra", "status", "code"),
    [
        ({"frames": ["F"] * 5}, {}, 422, "too_many_frames"),
        ({"frames": ["F"], "num_frames": 5}, {}, 422, "too_many_frames"),
        ({"frames": []}, {}, 422, "no_images"),
        ({"frames": ["F"], "file": "F"}, {}, 422, "invalid_video"),
        ({"frames": ["F"], "sampling": "random"}, {}, 422, "validation_error"),
        ({"frames": ["F"], "pooling": "max"}, {"method": "tpt"}, 422, "invalid_video"),
        ({"frames": ["F"]}, {"method": "ttl"}, 422, "video_unsupported"),
        ({"frames": ["F"]}, {"images": ["F"]}, 422, "images_and_video"),
        ({"frames": ["F"]}, {"method": "tpt", "options": {"views": 100_000}}, 422, "invalid_options"),
        ({"file": "bm90IGEgdmlkZW8="}, {}, 422, "invalid_video"),
        ({"frames": ["F"] * 4, "big": "x" * 70_000}, {}, 413, "body_too_large"),
    ],
)
def test_oversize_and_bad_video_requests_are_refused(small_client, video, extra, status, code):
    frame = b64(png_bytes(seed=1))
    video = {k: [frame if f == "F" else f for f in v] if k == "frames" else v for k, v in video.items()}
    extra = {k: [frame] if v == ["F"] else v for k, v in extra.items()}
    r = small_client.post("/v1/classify", json={"labels": LABELS, "video": video, **extra})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_a_file_with_more_frames_than_allowed_is_refused_for_sampling_all(small_client):
    data = video_file([(10 * i, 50, 90) for i in range(6)])
    r = small_client.post("/v1/classify", json={"labels": LABELS, "video": {"file": b64(data), "sampling": "all"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_frames", r.text
    ok = small_client.post("/v1/classify", json={"labels": LABELS, "video": {"file": b64(data), "num_frames": 4}})
    assert ok.status_code == 200, ok.text


def test_frames_of_different_sizes_are_refused_when_adapting(client):
    clip = [b64(png_bytes(seed=1, size=(40, 40))), b64(png_bytes(seed=2, size=(48, 40)))]
    r = client.post("/v1/classify", json={"labels": LABELS, "video": {"frames": clip}, "method": "tps"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_video", r.text
    assert client.post("/v1/classify", json={"labels": LABELS, "video": {"frames": clip}}).status_code == 200


def test_augmix_views_are_reproducible_and_change_the_answer(client):
    image = [b64(png_bytes(seed=5, size=(64, 52)))]
    common = {"images": image, "method": "tps", "seed": 3}
    augmix = {"views": 16, "lr": 0.5, "augmentation": "augmix"}
    a = only(classify(client, **common, options=augmix))
    assert_same(a, only(classify(client, **common, options=augmix)), atol=0)
    assert differs(a, only(classify(client, **common, options={**augmix, "augmentation": "crop_flip"})))
    r = client.post("/v1/classify", json={"labels": LABELS, **common, "options": {"augmentation": "cutmix"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_options"
    methods = {m["name"]: m["options_schema"]["properties"] for m in client.get("/v1/methods").json()["methods"]}
    for name in ("tpt", "ctpt", "tps", "ttl", "zero", "mta"):
        assert methods[name]["augmentation"]["enum"] == ["crop_flip", "augmix"]


def test_ctx_init_underscores_read_as_spaces(client):
    """As in the official TPT: "a_photo_of_a" is "a photo of a", so zero steps equal zero-shot's simple template."""
    image = [b64(png_bytes(seed=6))]
    zero_shot = only(classify(client, images=image, templates="simple"))
    tuned = classify(client, images=image, method="tpt", options={"steps": 0, "views": 4, "ctx_init": "a_photo_of_a"})
    assert_same(only(tuned), zero_shot)


def test_a_video_file_over_the_pixel_or_aspect_limits_is_refused(settings):
    strict = settings.model_copy(update={"max_image_pixels": 1200})
    with TestClient(create_app(strict), raise_server_exceptions=False) as c:
        wait_ready(c)
        big = c.post("/v1/classify", json={"labels": LABELS, "video": {"file": b64(video_file([(9, 9, 9)] * 2))}})
        assert big.status_code == 422 and big.json()["error"]["code"] == "image_too_large", big.text
        thin = video_file([(9, 9, 9)] * 2, size=(200, 4))  # 800 pixels, 50:1
        r = c.post("/v1/classify", json={"labels": LABELS, "video": {"file": b64(thin)}})
        assert r.status_code == 422 and r.json()["error"]["code"] == "extreme_aspect_ratio", r.text
