"""Videos from the Python client and the ``tta classify-video`` command: a folder of frames, a video file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
from PIL import Image
from ttaserve_client import Client

from tests.e2e.test_cli import tta
from tests.support.images import png_bytes

LABELS = ["red", "green", "blue"]


def write_frames(folder: Path, n: int) -> list[bytes]:
    """Frames named frame1.png ... frame{n}.png: name order is not time order past 9 (frame10 < frame2)."""
    folder.mkdir(parents=True)
    frames = [png_bytes(seed=30 + i, size=(40, 32)) for i in range(n)]
    for i, data in enumerate(frames, start=1):
        (folder / f"frame{i}.png").write_bytes(data)
    return frames


def write_video(path: Path, n: int) -> list[bytes]:
    """A lossless video of ``n`` frames; returns its frames as PNGs, decoded back."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height = 40, 32
        for i in range(n):
            pixels = np.zeros((32, 40, 3), np.uint8)
            pixels[:] = (25 * i, 255 - 25 * i, 120)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            buf = io.BytesIO()
            frame.to_image().convert("RGB").save(buf, format="PNG")
            out.append(buf.getvalue())
    return out


def scores(answer) -> dict[str, float]:
    assert len(answer.results) == 1
    return {p.label: p.logit for p in answer.results[0].predictions}


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_the_client_sends_a_folder_of_frames_in_time_order_and_a_video_file(served, tmp_path):
    url, _ = served
    frames = write_frames(tmp_path / "clip", 12)
    clip = write_video(tmp_path / "clip.mkv", 10)
    with Client(url) as client:
        folder = scores(client.classify_video(tmp_path / "clip", LABELS, num_frames=3, sampling="uniform", top_k=3))
        # frame1, frame7, frame12 by time: uniform picks indices 0, 6 (5.5 rounds up), 11 of 12.
        picked = [frames[0], frames[6], frames[11]]
        assert close(folder, scores(client.classify_video(picked, LABELS, sampling="all", top_k=3)))
        as_images = [Image.open(io.BytesIO(f)) for f in picked]  # PIL images work as frames too
        assert close(folder, scores(client.classify_video(as_images, LABELS, sampling="all", top_k=3)))

        from_file = scores(client.classify_video(tmp_path / "clip.mkv", LABELS, num_frames=2, top_k=3))
        # segment sampling of 10 frames into 2: the centres of frames 0-4 and 5-9, frames 2 and 7.
        assert close(from_file, scores(client.classify_video([clip[2], clip[7]], LABELS, sampling="all", top_k=3)))
        as_bytes = (tmp_path / "clip.mkv").read_bytes()
        assert close(from_file, scores(client.classify_video(as_bytes, LABELS, num_frames=2, top_k=3)))
        adapted = client.classify_video(clip[:3], LABELS, method="tps", seed=0, options={"views": 4})
        assert adapted.results[0].adaptation.method == "tps" and adapted.results[0].adaptation.views == 4


def test_tta_classify_video_writes_one_row_per_video(served, tmp_path):
    url, _ = served
    write_frames(tmp_path / "clip", 4)
    write_video(tmp_path / "clip.mkv", 6)
    done = tta("--server", url, "classify-video", tmp_path / "clip", tmp_path / "clip.mkv",
               "--labels", ",".join(LABELS), "--num-frames", "3", "--pooling", "max", "--format", "jsonl")  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]) for r in rows] == [tmp_path / "clip", tmp_path / "clip.mkv"]
    assert all(r["label"] in LABELS for r in rows)
    assert "2 videos in" in done.stderr
    (tmp_path / "empty").mkdir()
    refused = tta("--server", url, "classify-video", tmp_path / "empty", "--labels", "a,b", check=False)
    assert refused.returncode == 2 and "no image files" in refused.stderr
    over = tta("--server", url, "classify-video", tmp_path / "clip", "--labels", "a,b", "--num-frames", "999",
               check=False)  # fmt: skip
    assert over.returncode == 1 and "too_many_frames" in over.stderr + over.stdout
