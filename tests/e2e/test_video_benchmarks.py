"""The moving-shapes video set and the two benchmarks of issue 15 (video accuracy, AugMix views) run end to end."""

from __future__ import annotations

import json

import torch

from benchmarks import augmix_views, video_accuracy
from benchmarks._lib import moving_shapes, synthetic


def test_moving_shapes_are_reproducible_moving_videos_of_seen_classes():
    videos, labels = moving_shapes.make_videos("clean", 6, n_frames=5, seed=1)
    again, same = moving_shapes.make_videos("clean", 6, n_frames=5, seed=1)
    assert torch.equal(labels, same) and all(torch.equal(a, b) for a, b in zip(videos, again, strict=True))
    assert set(labels.tolist()) <= set(synthetic.SEEN)
    for video in videos:
        assert video.shape == (5, 3, 64, 64) and video.min() >= 0 and video.max() <= 1
        assert torch.equal(video, torch.round(video * 255) / 255)  # on the 8-bit grid: PNG-exact
        assert not torch.equal(video[0], video[-1])  # the object moves
    noisy, _ = moving_shapes.make_videos("noise", 6, n_frames=5, seed=1)
    dropped, _ = moving_shapes.make_videos("dropout", 6, n_frames=5, seed=1)
    assert all(not torch.equal(a, b) for a, b in zip(videos, noisy, strict=True))
    # Dropout replaces half the frames (rounded down) of a video and leaves the others as rendered; the first
    # video of a seed is drawn alike in every variant before that.
    replaced = [not torch.equal(a, b) for a, b in zip(videos[0], dropped[0], strict=True)]
    assert sum(replaced) == 5 // 2


def test_the_video_benchmark_reports_every_column_per_variant(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "video.json"
    report = video_accuracy.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--videos", "2", "--frames", "3", "--methods", "tps,zero",
         "--views", "4", "--out", str(out)]
    )  # fmt: skip
    columns = ["middle frame", "mean", "max", "tps", "zero"]
    assert list(report["accuracy"]) == list(moving_shapes.VARIANTS)
    for row in report["accuracy"].values():
        assert list(row) == columns and all(v in (0.0, 50.0, 100.0) for v in row.values())
    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]
    printed = capsys.readouterr().out
    assert "| variant (2 videos x 3 frames) | middle frame | mean | max | tps | zero |" in printed
    assert "| ms per video |" in printed


def test_the_augmix_benchmark_runs_each_method_both_ways(tiny_model_dir, tmp_path, capsys):
    report = augmix_views.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--max-samples", "4", "--shifts", "clean", "--methods", "zero",
         "--views", "4", "--batch-size", "4", "--out", str(tmp_path / "augmix.json")]
    )  # fmt: skip
    assert list(report["accuracy"]["clean"]) == ["zero_shot", "zero crop_flip", "zero augmix"]
    assert report["seconds"]["augmix"] > 0 and report["seconds"]["crop_flip"] > 0
    assert "| shift (4 images) | zero-shot | zero | zero +AugMix |" in capsys.readouterr().out
