"""benchmarks/accuracy.py: direct and through a live server it measures the same thing, and writes its reports."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from benchmarks import accuracy
from benchmarks._lib.data import synthetic_subsets
from benchmarks._lib.runners import DirectRunner, ServerRunner
from tests.support.apps import PATIENCE_S
from tests.support.servers import free_port, start, wait_served

ARGS = [
    "--shifts",
    "clean,control,gaussian_noise,style",
    "--max-samples",
    "16",
    "--bootstrap",
    "50",
    "--threads",
    "1",
    "--methods",
    "zero_shot,tps,zero",
    "--batch-size",
    "8",
]


def test_direct_and_server_runs_agree_and_write_reports(tiny_model_dir, tmp_path):
    direct = accuracy.main(["--model", f"local-dir:{tiny_model_dir}", "--out", str(tmp_path / "direct"), *ARGS])
    port = free_port()
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port)], tmp_path)
    try:
        wait_served(f"http://127.0.0.1:{port}", proc)
        served = accuracy.main(["--server", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "server"), *ARGS])
    finally:
        proc.terminate()
        proc.wait(PATIENCE_S)
    assert [r["shift"] for r in direct["rows"] if r["method"] == "zero_shot"] == [
        "clean",
        "control",
        "gaussian_noise-3",
        "style-3",
        "corruptions (pooled)",
    ]
    assert {r["method"] for r in direct["rows"]} == {"zero_shot", "tps", "zero"}
    for a, b in zip(direct["rows"], served["rows"], strict=True):
        assert (a["shift"], a["method"], a["n"]) == (b["shift"], b["method"], b["n"])
        assert a["top1"] == b["top1"]
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
        assert a["ece"] == pytest.approx(b["ece"], abs=1e-3)
    out = tmp_path / "direct"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == direct["rows"] and "zero_shot" in saved["reliability"]
    assert "| clean | zero_shot | 16 |" in (out / "results.md").read_text()
    assert "| gaussian_noise-3 | tps | 16 |" in (out / "results.md").read_text()
    with Image.open(out / "accuracy.png") as png:
        assert png.size[0] > 500 and png.size[1] > 300


def test_folder_data_with_class_names(tiny_model_dir, tmp_path):
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        folder = tmp_path / "data" / f"c{k}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 20), colour).save(folder / f"{i}.png")
    (tmp_path / "names.txt").write_text("red thing\nblue thing\n")
    result = accuracy.main(
        [
            "--model",
            f"local-dir:{tiny_model_dir}",
            "--data",
            str(tmp_path / "data"),
            "--class-names",
            str(tmp_path / "names.txt"),
            "--bootstrap",
            "20",
            "--methods",
            "zero_shot",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert [(r["shift"], r["n"]) for r in result["rows"]] == [("data", 6.0)]


def test_blurred_control_rows_and_unknown_shifts(tiny_model_dir, tmp_path):
    result = accuracy.main(
        [
            "--model",
            f"local-dir:{tiny_model_dir}",
            "--shifts",
            "gaussian_noise,gaussian_noise+blur",
            "--methods",
            "zero_shot",
            "--max-samples",
            "8",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    shifts = [r["shift"] for r in result["rows"]]
    # The blurred row is a control: it is not pooled into the corruption average.
    assert shifts == ["gaussian_noise-3", "gaussian_noise-3+blur", "corruptions (pooled)"]
    assert result["rows"][2]["n"] == 8
    with pytest.raises(SystemExit, match="unknown shift"):
        accuracy.main(["--model", f"local-dir:{tiny_model_dir}", "--shifts", "rain", "--out", str(tmp_path)])


def test_the_harness_and_the_http_api_give_identical_answers_on_the_demo_model(tmp_path):
    """One classify pipeline: in this process through the service, and over HTTP, image for image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the served process runs on one thread too: same reductions, same bits
    subsets = synthetic_subsets(["clean", "gaussian_noise"], [3], 6, seed=0)
    port = free_port()
    proc = start(["--port", str(port), "--torch-threads", "1"], tmp_path)  # the built-in demo model
    direct = DirectRunner("demo", None, "cpu", batch_size=4, seed=3)
    try:
        wait_served(f"http://127.0.0.1:{port}", proc)
        served = ServerRunner(f"http://127.0.0.1:{port}", batch_size=4, seed=3)
        for method in ("zero_shot", "tps", "ttl"):
            for subset in subsets:
                a = direct.run(subset, method, {})
                b = served.run(subset, method, {})
                assert torch.equal(a.pred, b.pred), (method, subset.name)
                assert torch.equal(a.logits, b.logits), (method, subset.name, (a.logits - b.logits).abs().max())
                assert torch.equal(a.probs, b.probs) and torch.equal(a.scores, b.scores)
        served.close()
    finally:
        direct.close()
        proc.terminate()
        proc.wait(PATIENCE_S)
        torch.set_num_threads(threads)
