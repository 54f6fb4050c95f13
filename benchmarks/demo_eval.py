"""Zero-shot top-1 of a `local-dir:` model on the synthetic suite: clean, held-out and every shift.

Prints top-1 per split and per shift and severity, and the zero-shot temperature fitted on the
validation split (``server.service.calibration.fit_temperature``); the demo model's builder
(``benchmarks/assets/train_demo_model.py``) writes the same figures into its model card.

python -m benchmarks.demo_eval --model server/models/demo --max-samples 500 [--all-severities]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from benchmarks._lib import shifts, synthetic
from server.service.calibration import fit_temperature


def raw_logits(model, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Model logits (logit_scale * cosine) for normalised images [N, 3, H, W] vs classes [C, D]."""
    img = F.normalize(model.encode_image(images), dim=-1)  # [N, D]
    return model.logit_scale.exp() * img @ F.normalize(text_features, dim=-1).T  # [N, C]


@torch.no_grad()
def class_embeddings(model, tokenizer, labels: list[str], templates: list[str]) -> torch.Tensor:
    """Template-ensembled class embeddings: mean of normalised template embeddings; [C, D]."""
    per_template = [
        F.normalize(model.encode_text(tokenizer([t.format(c) for c in labels])), dim=-1) for t in templates
    ]  # T x [C, D]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


@torch.no_grad()
def zero_shot_logits(
    model, images: torch.Tensor, classes: torch.Tensor, mean, std, batch_size: int = 256
) -> torch.Tensor:
    """Logits for images in [0, 1] [N, 3, H, W]; normalised with the folder's mean/std; [N, C]."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return torch.cat(
        [
            raw_logits(model, (images[i : i + batch_size] - m) / s, classes)
            for i in range(0, images.shape[0], batch_size)
        ]
    )


def load_folder(path: Path):
    """(model, tokenizer, preprocess config) as the server loads them."""
    model = open_clip.create_model(f"local-dir:{path}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    pre = json.loads((Path(path) / "open_clip_config.json").read_text())["preprocess_cfg"]
    return model, tokenizer, pre


def evaluate_folder(
    path: Path, max_samples: int = 500, seed: int = 0, severities=(3,), names: list[str] | None = None
) -> dict:
    """Accuracy on clean val/test, held-out and each shift x severity, plus the fitted temperature."""
    model, tokenizer, pre = load_folder(path)
    classes = class_embeddings(model, tokenizer, synthetic.CLASS_NAMES, synthetic.TEMPLATES)
    acc = lambda logits, y: (logits.argmax(1) == y).float().mean().item()  # noqa: E731
    run = lambda x: zero_shot_logits(model, x, classes, pre["mean"], pre["std"])  # noqa: E731
    val = synthetic.make_split("val", max_samples, seed)
    val_logits = run(val.images)
    t = fit_temperature(val_logits, val.labels)
    test = synthetic.make_split("test_seen", max_samples, seed)
    held = synthetic.make_split("test_heldout", max_samples, seed)
    out = {
        "val": acc(val_logits, val.labels),
        "clean": acc(run(test.images), test.labels),
        "heldout": acc(run(held.images), held.labels),
        "temperature": t,
        "logit_scale": model.logit_scale.exp().item(),
        "nll_raw": F.cross_entropy(val_logits, val.labels).item(),
        "nll_cal": F.cross_entropy(val_logits / t, val.labels).item(),
        "shifts": {},
        "max_samples": max_samples,
        "seed": seed,
    }
    out["control"] = acc(run(shifts.control(test.images)), test.labels)
    for name in names or list(shifts.SHIFTS):
        for sev in severities:
            x = shifts.apply(name, test.images, sev, seed=seed, masks=test.masks)
            out["shifts"][f"{name}@{sev}"] = acc(run(x), test.labels)
    corr = [v for k, v in out["shifts"].items() if k.endswith("@3") and k.split("@")[0] in shifts.CORRUPTIONS]
    out["avg_drop"] = out["clean"] - sum(corr) / len(corr) if corr else float("nan")
    return out


def print_table(r: dict) -> None:
    """Plain-text table of an evaluate_folder result."""
    print(f"{'split':<24}{'top-1 %':>9}{'drop':>8}")
    for name, v in [
        ("clean val (seen)", r["val"]),
        ("clean test (seen)", r["clean"]),
        ("held-out compositions", r["heldout"]),
        ("control (blur 0.8px)", r["control"]),
    ]:
        print(f"{name:<24}{v * 100:9.1f}{(r['clean'] - v) * 100:8.1f}")
    for name, v in r["shifts"].items():
        print(f"{name:<24}{v * 100:9.1f}{(r['clean'] - v) * 100:8.1f}")
    print(
        f"avg drop, corruptions @3: {r['avg_drop'] * 100:.1f} points; temperature {r['temperature']:.4f}; "
        f"logit scale {r['logit_scale']:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("server/models/demo"))
    p.add_argument("--max-samples", type=int, default=500, help="images per split and shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-severities", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sev = [1, 2, 3, 4, 5] if args.all_severities else [3]
    r = evaluate_folder(args.model, args.max_samples, args.seed, sev)
    print_table(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
