"""The calibration, tuning and latency tools run end to end on a tiny model and do what they say."""

from __future__ import annotations

import json
import math
import shutil

import torch

from benchmarks import (
    adaptation_latency,
    adapter_routing,
    calibration_shift,
    cli_throughput,
    memory_estimate,
    method_latency,
    session_streams,
    soak,
    tune,
)
from benchmarks._lib.scoring import ece_from
from benchmarks.assets import calibrate
from server.clip.card import read_card
from server.service.calibration import Calibration, fit_temperature
from server.service.confidence import ConfidenceModel, temper
from tests.support.servers import free_port


def test_fit_temperature_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=gen) * 3
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    # The model is over-confident by a factor 2.5: the fitted T must undo it.
    t = fit_temperature(true_logits * 2.5, labels)
    assert math.isclose(t, 2.5, rel_tol=0.08)


def test_a_fitted_confidence_model_is_calibrated_on_fresh_images_of_the_same_kind():
    def sample(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        truth = torch.randn(6000, 10, generator=gen) * torch.rand(6000, 1, generator=gen) * 4
        labels = torch.multinomial(truth.softmax(-1), 1, generator=gen).squeeze(1)
        return truth * 3, labels  # the model says 3x the log-odds it has: over-confident

    logits, labels = sample(0)
    model = ConfidenceModel.fit(logits, labels, "synthetic")
    fresh, truth = sample(1)
    right = (fresh.argmax(-1) == truth).float()
    raw = fresh.softmax(-1).max(-1).values
    assert ece_from(raw, right) > 0.15  # over-confident as made
    assert ece_from(model.predict(fresh), right) < 0.03
    assert torch.equal(temper(fresh, model.predict(fresh)).argmax(-1), fresh.argmax(-1))


def test_calibrate_writes_the_confidence_model_into_the_model_card(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    args = ["--model", f"local-dir:{folder}", "--families", "noise", "--severities", "3", "--max-samples", "24"]
    fitted = calibrate.main([*args, "--threads", "1", "--write"])
    card = read_card(folder)
    assert card.confidence == fitted.to_dict() and fitted.images == 48  # half of 24 clean + 24 x 3 noises
    assert card.label_sets  # the rest of the card is kept
    assert Calibration.from_card(card).describe()["source"] == "model card"
    assert "held-out half" in capsys.readouterr().out


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


def test_the_confidence_under_shift_benchmark_reports_both_directions_and_user_data(tiny_model_dir, tmp_path):
    result = calibration_shift.main(
        [
            "--model",
            f"local-dir:{tiny_model_dir}",
            "--methods",
            "zero_shot,tps",
            "--max-samples",
            "24",
            "--threads",
            "1",
            "--reverse",
            "--user-data",
            "gaussian_noise",
            "--user-images",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    sets = [row["set"] for row in result["held_out"]["zero_shot"]]
    assert sets == [
        "clean",
        "heldout",
        "defocus_blur-3",
        "motion_blur-3",
        "contrast-3",
        "brightness-3",
        "pixelate-3",
        "jpeg-3",
        "hue-3",
        "shifts (pooled)",
    ]
    assert [row["set"] for row in result["reverse"]["tps"]][-2:] == ["style-3", "shifts (pooled)"]
    for row in result["held_out"]["tps"]:
        assert 0 <= row["acc0.9_cal"] <= 1 or math.isnan(row["acc0.9_cal"])
        assert row["ece_cal"] >= 0 and row["aurc_cal"] >= 0
    assert set(result["none_of_these"]["tps"]) == {"near", "far"}
    assert set(result["user_data"]) >= {"raw", "label_free", "fitted"} and result["user_data"]["fit_images"] == 20
    assert len(result["targets"]) == 2 and len(list(tmp_path.glob("*.json"))) == 1


def test_the_cli_throughput_benchmark_runs_tta_classify_beside_the_server(tiny_model_dir, capsys):
    result = cli_throughput.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--images", "12", "--batch", "4", "--concurrency", "2",
         "--rounds", "1", "--threads", "1", "--port", str(free_port())]
    )  # fmt: skip
    assert all(result[key] > 0 for key in ("direct_images_per_s", "http_images_per_s", "cli_images_per_s"))
    printed = capsys.readouterr().out
    assert "12 images in" in printed and "ratios: tta/http" in printed


def test_the_soak_drives_mixed_traffic_and_reports_per_interval(tiny_model_dir, capsys):
    result = soak.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--minutes", "0.05", "--clients", "3", "--interval-s", "1",
         "--label-set-every", "2", "--keys", "2", "--threads", "1", "--port", str(free_port())]
    )  # fmt: skip
    assert result["unexpected_5xx"] == 0 and result["hung"] == 0
    assert sum(result["totals"].values()) >= 3 and result["rows"]
    assert not any(status.endswith((" 401", " 403", " 404")) for status in result["totals"])  # keys, own label sets
    assert {"rss_mib", "fds", "p50_s", "p99_s", "statuses"} <= set(result["rows"][0])
    assert set(result["served_zero_shot"]) == {"overload", "confident", "memory"}
    printed = capsys.readouterr().out
    assert "unexpected 5xx: 0" in printed and "resident memory" in printed


def test_the_session_streams_benchmark_runs_every_stream_and_method_through_sessions(tiny_model_dir, tmp_path, capsys):
    result = session_streams.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--n", "40", "--episodic", "zero_shot", "--threads", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = result["rows"]
    assert {(r["stream"], r["method"]) for r in rows} == {
        (stream, method)
        for stream in ("iid", "correlated", "poisoned")
        for method in ("zero_shot", "session tda", "session stats")
    }
    for row in rows:
        assert 0 <= row["accuracy"] <= 100
        if row["method"].startswith("session"):
            assert 0 < row["bytes"] <= row["state_max_bytes"] <= row["session_max_bytes"]
    assert result["meta"]["crafted"] == 4 and (tmp_path / "results-val-gaussian_noise.json").is_file()
    printed = capsys.readouterr().out
    assert "| poisoned | session tda |" in printed and "worst change against episodic zero-shot" in printed


def test_the_adapter_routing_benchmark_routes_and_merges_through_the_api(tiny_model_dir, capsys):
    results = adapter_routing.main(
        ["--model", f"local-dir:{tiny_model_dir}", "--n", "4", "--val", "4", "--pool", "16", "--seeds", "0",
         "--labels", "all", "--threads", "1"]
    )  # fmt: skip
    (result,) = results
    assert [r["set"] for r in result["routing"]] == ["A classes", "B classes", "seen classes", "noise/blank"]
    for row in result["routing"]:
        assert row["n"] == 4 and row["to_A"] + row["to_B"] + row["base"] == 100
    assert -1 <= result["min_sim"] <= 1
    assert [r["model"] for r in result["merging"]] == [
        "zero-shot", "member A alone", "member B alone", "emr: unified", "emr: A rebuilt", "emr: B rebuilt",
        "ties: unified", "task_arithmetic: unified",
    ]  # fmt: skip
    assert all(0 <= r[k] <= 100 for r in result["merging"] for k in ("A", "B", "seen"))
    emr = [m for m in result["members"] if m["method"] == "emr"]
    assert len(emr) == 2 and all(0 < m["mask_density"] <= 1 and 0 < m["fidelity"] <= 1 for m in emr)
    printed = capsys.readouterr().out
    assert "| test images | n | routed to A % |" in printed and "| emr: A rebuilt |" in printed
    assert "-> min_sim" in printed
