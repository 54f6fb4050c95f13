"""Accuracy and calibration of test-time methods under distribution shift.

Measures any model (the demo model, or any TTA_MODEL form with --pretrained) on any data (the
synthetic shift suite, or ImageFolder-style directories) with any registered methods, either in
this process through the server's classify service or against a running server (--server URL):
the same pipeline, so the two agree image for image. For every (shift, method) it
reports top-1, ECE (15 bins; raw, and of the calibrated probabilities the server returns) and NLL with 95% bootstrap
intervals, and the share of predictions
that differ from zero-shot; then the same pooled over the corruption shifts. It writes
results.json, results.md and accuracy.png (accuracy per shift and method, reliability diagrams).

    python -m benchmarks.accuracy --model demo --max-samples 500
    python -m benchmarks.accuracy --model ViT-B-32 --shifts clean --max-samples 100
    python -m benchmarks.accuracy --model ViT-B-16-quickgelu --pretrained openai \
        --data /data/imagenet-a --class-names /data/imagenet-a/classes.txt
    python -m benchmarks.accuracy --server http://127.0.0.1:8000 --methods zero_shot

Shift rows: ``clean`` (seen compositions), ``control`` (clean with a sigma-0.8 px blur: views made
by random resized crops are resampled, hence low-pass filtered, so on noise a method can win by
denoising rather than adapting; compare against this row), ``heldout`` (unseen compositions), each
corruption at the chosen severities, and ``style`` (unseen backgrounds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adapters import method_names
from benchmarks._lib import shifts as shift_suite
from benchmarks._lib.data import folder_subset, synthetic_subsets
from benchmarks._lib.runners import DirectRunner, ServerRunner
from benchmarks._lib.scoring import reliability, score


def markdown(rows: list[dict[str, Any]], methods: list[str]) -> str:
    lines = [
        (
            "| shift | method | n | top-1 % [95% CI] | ECE % [95% CI] | ECE % calibrated [95% CI] | NLL [95% CI] "
            "| changed % |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        changed = f"{r['changed']:.1f}" if "changed" in r else "-"
        lines.append(
            f"| {r['shift']} | {r['method']} | {int(r['n'])} "
            f"| {r['top1']:.1f} [{r['top1_lo']:.1f}, {r['top1_hi']:.1f}] "
            f"| {r['ece']:.1f} [{r['ece_lo']:.1f}, {r['ece_hi']:.1f}] "
            f"| {r['ece_cal']:.1f} [{r['ece_cal_lo']:.1f}, {r['ece_cal_hi']:.1f}] "
            f"| {r['nll']:.3f} [{r['nll_lo']:.3f}, {r['nll_hi']:.3f}] | {changed} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, Any]], diagrams: dict[str, dict[str, list[float]]], methods: list[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(max(10, 0.55 * len(shifts) * len(methods) + 6), 4.8), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        mine = {r["shift"]: r for r in rows if r["method"] == method}
        vals = [mine[s]["top1"] if s in mine else np.nan for s in shifts]
        lo = [mine[s]["top1"] - mine[s]["top1_lo"] if s in mine else 0 for s in shifts]
        hi = [mine[s]["top1_hi"] - mine[s]["top1"] if s in mine else 0 for s in shifts]
        ax.bar(np.arange(len(shifts)) + k * width, vals, width, yerr=[lo, hi], label=method, capsize=2)
    ax.set_xticks(np.arange(len(shifts)) + 0.4 - width / 2, shifts, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("top-1 %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy per shift (95% bootstrap CI)")
    ax2.plot([0, 1], [0, 1], "k--", lw=0.8)
    for method, d in diagrams.items():
        pts = [(c, a) for c, a, n in zip(d["confidence"], d["accuracy"], d["count"], strict=True) if n > 0]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=method)
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("accuracy")
    ax2.set_title("Reliability, calibrated (corruptions pooled)")
    if diagrams:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for item in items:
        method, _, text = item.partition("=")
        out[method] = json.loads(text)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", help="demo, demo-vit, or any TTA_MODEL form")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--server", default=None, help="measure a running server instead (URL)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=[],
        help="ImageFolder-style directory (repeatable); default: the synthetic shift suite",
    )
    parser.add_argument("--class-names", type=Path, default=None, help="one class name per line, in folder order")
    parser.add_argument("--templates", default=None, help="JSON list of templates for --data (default: CLIP's simple)")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--options", action="append", default=[], metavar="METHOD=JSON", help="a method's options")
    parser.add_argument(
        "--shifts", default="all", help="comma-separated shift names (NAME+blur adds the control's blur), or 'all'"
    )
    parser.add_argument("--severities", default="3", help="comma-separated severities 1-5 for corruptions")
    parser.add_argument("--max-samples", type=int, default=500, help="images per shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    methods = method_names() if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {method_names()}")
    methods = ["zero_shot"] + [m for m in methods if m != "zero_shot"]  # the reference for 'changed'
    options = parse_options(args.options)

    if args.data:
        templates = json.loads(args.templates) if args.templates else ["a photo of a {}."]
        subsets = [folder_subset(d, args.class_names, args.max_samples, args.seed, templates) for d in args.data]
    else:
        names = ["clean", "control", "heldout", *shift_suite.SHIFTS] if args.shifts == "all" else args.shifts.split(",")
        subsets = synthetic_subsets(names, [int(s) for s in args.severities.split(",")], args.max_samples, args.seed)

    runner = (
        ServerRunner(args.server, args.batch_size, args.seed)
        if args.server
        else DirectRunner(args.model, args.pretrained, args.device, args.batch_size, args.seed)
    )
    print(
        f"model: {runner.description}; methods: {', '.join(methods)}; {len(subsets)} subsets x "
        f"{args.max_samples} images",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]] = {
        m: [] for m in methods
    }
    started = time.perf_counter()

    def scored(shift: str, method: str, logits, pred, labels, reference, calibrated) -> dict[str, Any]:
        ref = None if method == "zero_shot" else reference
        raw = score(logits.softmax(-1), labels, ref, args.bootstrap, args.seed, pred=pred)
        cal = score(calibrated, labels, ref, args.bootstrap, args.seed, pred=pred)
        return {
            "shift": shift,
            "method": method,
            **raw,
            "ece_cal": cal["ece"],
            "ece_cal_lo": cal["ece_lo"],
            "ece_cal_hi": cal["ece_hi"],
            "nll_cal": cal["nll"],
        }

    try:
        with tqdm(total=len(subsets) * len(methods), unit="run", dynamic_ncols=True) as bar:
            for subset in subsets:
                reference = None
                for method in methods:
                    bar.set_description(f"{subset.title} / {method}")
                    out = runner.run(subset, method, options.get(method, {}), bar)
                    reference = out.pred if method == "zero_shot" else reference
                    rows.append(scored(subset.title, method, out.logits, out.pred, subset.labels, reference, out.probs))
                    if subset.corruption:
                        pooled[method].append((out.logits, out.pred, subset.labels, reference, out.probs))
                    bar.update()
    finally:
        runner.close()
    diagrams = {}
    for method in methods:
        if pooled[method]:
            logits, pred, labels, ref, probs = (torch.cat([p[k] for p in pooled[method]]) for k in range(5))
            rows.append(scored("corruptions (pooled)", method, logits, pred, labels, ref, probs))
            diagrams[method] = reliability(probs.gather(1, pred[:, None]).squeeze(1), (pred == labels).float())
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, methods)
    meta = {
        "model": runner.description,
        "methods": methods,
        "options": options,
        "max_samples": args.max_samples,
        "severities": args.severities,
        "seed": args.seed,
        "seconds": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "reliability": diagrams}, indent=1))
    (args.out / "results.md").write_text(f"Model: {runner.description}\n\n{table}")
    plot(rows, diagrams, methods, args.out / "accuracy.png")
    print(table)
    print(f"wrote {args.out}/results.json, results.md, accuracy.png in {meta['seconds']:.0f} s")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
