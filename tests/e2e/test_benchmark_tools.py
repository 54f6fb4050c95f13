"""The calibration, tuning and latency tools run end to end on a tiny model and do what they say."""

from __future__ import annotations

import json
import math
import shutil

import torch

from benchmarks import adaptation_latency, memory_estimate, method_latency, tune
from benchmarks.assets import calibrate
from benchmarks.assets.calibrate import fit_temperature


def test_fit_temperature_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=gen) * 3
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    # The model is over-confident by a factor 2.5: the fitted T must undo it.
    t = fit_temperature(true_logits * 2.5, labels)
    assert math.isclose(t, 2.5, rel_tol=0.08)


def test_calibrate_writes_temperatures_into_the_model_folder(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    fitted = calibrate.main(
        [
            "--model",
            f"local-dir:{folder}",
            "--methods",
            "zero_shot,tps",
            "--max-samples",
            "24",
            "--threads",
            "1",
            "--options",
            'tps={"views": 8}',
            "--write",
        ]
    )
    meta = json.loads((folder / "ttaserve.json").read_text())
    assert set(meta["calibration"]) == {"zero_shot", "tps"}
    assert meta["calibration"]["tps"]["temperature"] == fitted["tps"]["temperature"] > 0
    assert meta["calibration"]["tps"]["options"] == {"views": 8}
    assert meta["label_sets"]  # the rest of the file is kept
    assert "ECE" in capsys.readouterr().out


def test_tune_and_latency_report_every_method(tiny_model_dir, capsys):
    chosen = tune.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--methods", "tps", "--max-samples", "8", "--threads", "1"]
    )
    assert set(chosen) == {"tps"} and chosen["tps"]["lr"] in tune.LRS and chosen["tps"]["steps"] in tune.STEPS
    assert "--options 'tps=" in capsys.readouterr().out
    result = method_latency.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--methods", "zero_shot,zero,tps", "--images", "2", "--threads", "1"]
    )
    assert set(result) == {"zero_shot", "zero", "tps"}
    assert all(r["p95_s"] >= r["p50_s"] > 0 for r in result.values())


def test_adaptation_latency_runs_reference_ours_and_server_side_by_side(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "adaptation_latency.json"
    adaptation_latency.main(
        [
            "--model",
            f"local-dir:{tiny_model_dir}",
            "--classes",
            "5",
            "--images",
            "2",
            "--views",
            "8",
            "--concurrency",
            "1,2",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["agreement_ok"]
    result = saved["results"]["5"]
    # Every method: the published loop and ours predict the same class on both images, and so does the server.
    assert set(result["agreement"]) == set(adaptation_latency.METHODS)
    for method, check in result["agreement"].items():
        assert check["agree"] == check["images"] == 2 and check["ok"], method
        assert check["max_logit_diff"] < 1e-4, method
        assert f"top-1 agreement {method:5s} (a) vs (b): 2/2 " in printed
        assert result["http_agreement"][method] == "2/2"
    rows = {(r["method"], r["setup"]): r for r in result["setups"]}
    for method in adaptation_latency.METHODS:
        for setup in ("ours", "http c1", "http c2"):
            row = rows[(method, setup)]
            assert row["p95_s"] >= row["p50_s"] > 0 and row["images_per_s"] > 0
            assert row["p50_over_reference"] > 0 and row["images_per_s_over_reference"] > 0
        assert rows[(method, "reference")]["p50_over_reference"] is None
        assert rows[(method, "http c1")]["estimate_mib"] > 0  # the server's memory estimate per image
    assert rows[("zero", "ours")]["p50_over_forward"] > 0
    assert rows[("zero_shot", "http c2")]["p50_over_forward"] > 0
    assert "p50/(a)" in printed and "targets (reported, not enforced)" in printed


def test_memory_estimate_sets_the_lanes_estimate_beside_the_measured_rise(tiny_model_dir, capsys):
    rows = memory_estimate.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--classes", "5,40", "--views", "8", "--threads", "1"]
    )
    printed = capsys.readouterr().out
    assert {(r["method"], r["classes"]) for r in rows} == {(m, c) for m in memory_estimate.METHODS for c in (5, 40)}
    by = {(r["method"], r["classes"]): r for r in rows}
    assert all(r["estimate_mib"] > 0 and r["measured_mib"] == r["measured_mib"] for r in rows)  # not NaN
    assert by[("tpt", 40)]["estimate_mib"] > by[("tpt", 5)]["estimate_mib"]  # prompts kept grow with the classes
    assert by[("tps", 40)]["estimate_mib"] == by[("tps", 5)]["estimate_mib"]
    assert "estimate/measured" in printed and "per prompt token" in printed
