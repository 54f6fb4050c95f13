"""Confidence under shift: the server's calibrated confidence against the raw softmax, on shifts it never saw.

The shipped label-free confidence model was fitted on validation images of some shift families
(``--design``, default noise, weather and style: ``benchmarks/assets/calibrate.py --default``). This
tool runs each method through the server's classify pipeline (in this process) on the test split of
the *other* families, held-out compositions and clean images, and prints per method and shift, raw
-> calibrated: top-1 (identical by construction), ECE (15 bins), NLL, Brier, AURC, |mean confidence -
accuracy|, and the accuracy and coverage of the answers given at ``abstain_below`` 0.5, 0.7 and 0.9;
then the same pooled over the held-out shifts, and the targets met or missed. ``--reverse`` also fits
a confidence model on the report families' validation images and reports it on the design families:
the other direction of leave-families-out.

``--user-data SHIFT`` calibrates a label set on ``--user-images`` labelled images of that shift (the
server's ``POST /v1/label-sets/{name}/calibration`` path, in this process) and prints ECE and
|confidence - accuracy| on the rest of the shift: raw, label-free and fitted.

"None of these labels": the label set loses the held-out compositions; images of them (near) and
shapeless colour fields (far) should score high, images of the remaining labels low. It prints the
AUROC of the result's ``none_of_these`` against the baseline, 1 - the maximum softmax (MCM).

    python -m benchmarks.calibration_shift --model demo --methods all --max-samples 200 --seed 0
    python -m benchmarks.calibration_shift --model demo-vit --methods zero_shot --reverse
    python -m benchmarks.calibration_shift --model demo --user-data motion_blur --user-images 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from adapters import method_names
from benchmarks._lib import shifts, synthetic
from benchmarks._lib.data import Subset, synthetic_subsets, tensors_to_pil
from benchmarks._lib.runners import DirectRunner, Outputs
from benchmarks._lib.scoring import aurc, auroc, brier, ece_from, nll, selective
from server.service.confidence import ConfidenceModel

THRESHOLDS = (0.5, 0.7, 0.9)
# The targets on held-out shifts: ECE at most half of raw zero-shot's, |confidence - accuracy|
# within 5 points on each shift, and at abstain_below 0.9 an answered accuracy of at least 0.85.
GAP_TARGET, ANSWERED_TARGET = 5.0, 0.85


def metrics(out: Outputs, labels: torch.Tensor) -> dict[str, float]:
    """Raw and calibrated scores of one method on one set."""
    right = (out.pred == labels).float()
    raw = out.logits.softmax(-1)
    row: dict[str, float] = {"n": float(len(labels)), "top1": 100 * float(right.mean())}
    for kind, probs in (("raw", raw), ("cal", out.probs)):
        confidence = probs.gather(1, out.pred[:, None]).squeeze(1)
        row[f"ece_{kind}"] = 100 * float(ece_from(confidence, right))
        row[f"nll_{kind}"] = float(nll(probs, labels).mean())
        row[f"brier_{kind}"] = float(brier(probs, labels).mean())
        row[f"aurc_{kind}"] = 100 * aurc(confidence, right)
        row[f"conf_{kind}"] = 100 * float(confidence.mean())
        row[f"gap_{kind}"] = abs(row[f"conf_{kind}"] - row["top1"])
        for t in THRESHOLDS:
            row[f"acc{t}_{kind}"], row[f"cov{t}_{kind}"] = selective(confidence, right, t)
    return row


def none_of_these_sets(n: int, seed: int) -> tuple[Subset, Subset, Subset]:
    """(in-set, near, far): clean images of the seen compositions, images of the held-out ones, and
    shapeless colour fields, all against the label set without the held-out compositions."""
    kept = [synthetic.CLASS_NAMES[i] for i in synthetic.SEEN]
    index = {name: i for i, name in enumerate(kept)}
    seen = synthetic.make_split("test_seen", n, seed)
    in_set = torch.tensor([index[synthetic.CLASS_NAMES[int(y)]] for y in seen.labels])
    near = synthetic.make_split("test_heldout", n, seed)
    gen = torch.Generator().manual_seed(seed)
    size = seen.images.shape[-1]
    far = shifts.quantise(
        shifts.plasma(n, size, size, gen) * torch.rand(n, 3, 1, 1, generator=gen)
        + shifts.plasma(n, size, size, gen) * torch.rand(n, 3, 1, 1, generator=gen) * 0.5
    )
    no_label = torch.full((n,), -1)
    return (
        Subset("in-set", tensors_to_pil(seen.images), in_set, kept, synthetic.TEMPLATES, False),
        Subset("near", tensors_to_pil(near.images), no_label, kept, synthetic.TEMPLATES, False),
        Subset("far", tensors_to_pil(far), no_label, kept, synthetic.TEMPLATES, False),
    )


def report_sets(families: list[str], severities: list[int], n: int, seed: int, heldout: bool) -> list[Subset]:
    names = [name for family in families for name in shifts.FAMILIES[family]]
    sets = synthetic_subsets(["clean"], [], n, seed)
    if heldout:
        sets += synthetic_subsets(["heldout"], [], n, seed)
    return sets + synthetic_subsets(names, severities, n, seed)


def fit_on_validation(
    runner: DirectRunner, families: list[str], severities: list[int], n: int, seed: int
) -> ConfidenceModel:
    """A confidence model fitted as the shipped one was, on other families' validation images."""
    names = [name for family in families for name in shifts.FAMILIES[family]]
    sets = synthetic_subsets(["clean"], [], n, seed, split="val") + synthetic_subsets(
        names, severities, n, seed, split="val"
    )
    outs = [runner.run(s, "zero_shot", {}) for s in sets]
    return ConfidenceModel.fit(
        torch.cat([o.logits for o in outs]),
        torch.cat([s.labels for s in sets]),
        f"validation: clean and {', '.join(families)}",
    )


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = (
        f"{'set':18s} {'n':>4s} {'top1':>5s} | {'ECE raw->cal':>12s} | {'NLL':>11s} | {'Brier':>11s} | "
        f"{'AURC':>11s} | {'|conf-acc|':>11s} | " + " | ".join(f"acc@{t} (cov)" for t in THRESHOLDS)
    )
    print(head)
    for r in rows:
        cells = [
            f"{r['set']:18s} {int(r['n']):4d} {r['top1']:5.1f}",
            f"{r['ece_raw']:5.1f}->{r['ece_cal']:5.1f}",
            f"{r['nll_raw']:4.2f}->{r['nll_cal']:4.2f}",
            f"{r['brier_raw']:4.2f}->{r['brier_cal']:4.2f}",
            f"{r['aurc_raw']:4.1f}->{r['aurc_cal']:4.1f}",
            f"{r['gap_raw']:4.1f}->{r['gap_cal']:4.1f}",
        ]
        cells += [
            f"{r[f'acc{t}_cal']:.2f} ({r[f'cov{t}_cal']:.2f})"
            if not math.isnan(r[f"acc{t}_cal"])
            else f"  -  ({r[f'cov{t}_cal']:.2f})"
            for t in THRESHOLDS
        ]
        print(" | ".join(cells))


def evaluate(runner: DirectRunner, methods: list[str], sets: list[Subset], label: str) -> dict[str, Any]:
    """Every method on every set; rows per set and pooled over the shifted ones."""
    results: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        outs = {s.title: runner.run(s, method, {}) for s in sets}
        rows = [{"set": s.title, **metrics(outs[s.title], s.labels)} for s in sets]
        shifted = [s for s in sets if s.title not in ("clean",)]
        pooled = Outputs(
            *(
                torch.cat([getattr(outs[s.title], f) for s in shifted])
                for f in ("logits", "pred", "probs", "scores", "none_of_these")
            )
        )
        rows.append({"set": "shifts (pooled)", **metrics(pooled, torch.cat([s.labels for s in shifted]))})
        print_table(f"{label} / {method} ({time.perf_counter() - started:.0f} s)", rows)
        results[method] = rows
    return results


def targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets on the held-out shifts, met or missed, with by how much."""
    lines = []
    raw_zero_shot = results["zero_shot"][-1]["ece_raw"] if "zero_shot" in results else float("nan")
    for method, rows in results.items():
        pooled = rows[-1]
        per_shift = [r for r in rows[:-1] if r["set"] != "clean"]
        worst_gap = max(per_shift, key=lambda r: r["gap_cal"])
        answered = [r for r in per_shift if not math.isnan(r["acc0.9_cal"])]
        worst_answered = min(answered, key=lambda r: r["acc0.9_cal"]) if answered else None
        ok_ece = pooled["ece_cal"] <= raw_zero_shot / 2
        lines.append(
            f"{method:10s} ECE {pooled['ece_cal']:.1f} vs half of raw zero-shot {raw_zero_shot / 2:.1f}: "
            f"{'met' if ok_ece else 'missed'}; |conf-acc| worst {worst_gap['gap_cal']:.1f} ({worst_gap['set']}), "
            f"{sum(r['gap_cal'] <= GAP_TARGET for r in per_shift)}/{len(per_shift)} shifts within {GAP_TARGET:g}; "
            + (
                f"acc@0.9 worst {worst_answered['acc0.9_cal']:.2f} ({worst_answered['set']}, coverage "
                f"{worst_answered['cov0.9_cal']:.2f}), {sum(r['acc0.9_cal'] >= ANSWERED_TARGET for r in answered)}"
                f"/{len(answered)} answered shifts at >= {ANSWERED_TARGET}"
                if worst_answered
                else "acc@0.9: nothing answered at 0.9"
            )
        )
    return lines


def user_data(runner: DirectRunner, shift: str, n_fit: int, n_rest: int, seed: int) -> dict[str, Any]:
    """Calibrate a label set on ``n_fit`` labelled images of ``shift`` (severity 3), as a user would through the
    API, and score the other ``n_rest``: raw, label-free (inline labels) and fitted (the label set)."""
    (subset,) = synthetic_subsets([shift], [3], n_fit + n_rest, seed)
    names = subset.class_names
    runtime = runner.runtime
    runtime.label_sets.create("user-data", names, subset.templates)
    truth = [names[int(y)] for y in subset.labels[:n_fit]]

    async def calibrate() -> dict[str, Any]:
        runtime.recalibration.start("user-data", subset.images[:n_fit], truth)
        while (status := runtime.recalibration.describe("user-data"))["fit"]["state"] == "running":
            await asyncio.sleep(0.05)
        return status

    status = runner._loop.run_until_complete(calibrate())
    if status["fit"]["state"] != "fitted":
        raise SystemExit(f"the calibration failed: {status['fit']['error']}")
    rest = Subset(f"{shift}-3 rest", subset.images[n_fit:], subset.labels[n_fit:], names, subset.templates, False)
    fitted = runner.run(Subset(**{**vars(rest), "label_set": "user-data"}), "zero_shot", {})
    label_free = runner.run(rest, "zero_shot", {})
    right = (label_free.pred == rest.labels).float()
    out: dict[str, Any] = {"shift": shift, "fit_images": n_fit, "rest_images": n_rest}
    out["accuracy"] = 100 * float(right.mean())
    kinds = {"raw": label_free.logits.softmax(-1), "label_free": label_free.probs, "fitted": fitted.probs}
    for name, probs in kinds.items():
        confidence = probs.gather(1, label_free.pred[:, None]).squeeze(1)
        gap = abs(100 * float(confidence.mean() - right.mean()))
        out[name] = {"ece": 100 * float(ece_from(confidence, right)), "gap": gap}
    scored = ", ".join(f"{name} {out[name]['ece']:.1f} / {out[name]['gap']:.1f}" for name in kinds)
    print(
        f"\ncalibration on user data: {n_fit} labelled images of {shift}-3, scored on {n_rest} others "
        f"(accuracy {out['accuracy']:.1f}%): ECE / |conf-acc| {scored}"
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--methods", default="zero_shot", help="comma-separated, or 'all'")
    parser.add_argument("--design", default="noise,weather,style", help="the families the shipped model saw")
    parser.add_argument("--severities", default="3")
    parser.add_argument("--max-samples", type=int, default=200, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reverse", action="store_true", help="also fit on the report families, report on --design")
    parser.add_argument("--user-data", default=None, metavar="SHIFT", help="calibrate a label set on this shift")
    parser.add_argument("--user-images", type=int, default=200, help="labelled images for --user-data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/calibration_shift"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = method_names() if args.methods == "all" else args.methods.split(",")
    methods = ["zero_shot"] + [m for m in methods if m != "zero_shot"]
    design = args.design.split(",")
    report = [f for f in shifts.FAMILIES if f not in design]
    severities = [int(s) for s in args.severities.split(",")]
    runner = DirectRunner(args.model, None, "cpu", 64, args.seed)
    output: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    try:
        print(f"model {runner.description}; confidence model: {runner.runtime.calibration.describe()}", flush=True)
        if args.user_data:
            output["user_data"] = user_data(runner, args.user_data, args.user_images, args.max_samples, args.seed)
        sets = report_sets(report, severities, args.max_samples, args.seed, heldout=True)
        label = f"shipped model (designed on {', '.join(design)}) on {', '.join(report)} and held-out compositions"
        output["held_out"] = evaluate(runner, methods, sets, label)
        print("\ntargets, held-out families:")
        output["targets"] = targets(output["held_out"])
        print("\n".join(output["targets"]))

        in_set, near, far = none_of_these_sets(args.max_samples, args.seed)
        print("\nnone of these labels (AUROC: ours, baseline 1 - max softmax):")
        output["none_of_these"] = {}
        for method in methods:
            outs = {s.name: runner.run(s, method, {}) for s in (in_set, near, far)}
            row = {}
            for case in ("near", "far"):
                ours = auroc(outs[case].none_of_these, outs["in-set"].none_of_these)
                mcm = [1 - o.logits.softmax(-1).max(-1).values for o in (outs[case], outs["in-set"])]
                row[case] = {"ours": ours, "baseline": auroc(*mcm)}
            output["none_of_these"][method] = row
            print(
                f"{method:10s} near {row['near']['ours']:.3f} (baseline {row['near']['baseline']:.3f})   "
                f"far {row['far']['ours']:.3f} (baseline {row['far']['baseline']:.3f})"
            )

        if args.reverse:
            fitted = fit_on_validation(runner, report, [2, 3], args.max_samples, args.seed)
            runner.runtime.calibration.label_free = fitted
            sets = report_sets(design, severities, args.max_samples, args.seed, heldout=False)
            label = f"fitted on {', '.join(report)} validation images, on {', '.join(design)}"
            output["reverse"] = evaluate(runner, methods, sets, label)
            print("\ntargets, the other direction:")
            output["reverse_targets"] = targets(output["reverse"])
            print("\n".join(output["reverse_targets"]))
    finally:
        runner.close()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', args.model)}-seed{args.seed}.json"
    path.write_text(json.dumps(output, indent=1))
    print(f"\nwrote {path}")
    return output


if __name__ == "__main__":
    main()
