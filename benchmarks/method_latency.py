"""Per-request latency of each test-time method, called directly as the server's engine calls it.

One image per request, each method at its defaults (64 views, 1 step), on one model, methods
interleaved image by image so machine load hits them alike. Prints p50/p95 per method and the ratio
to zero-shot on one image (its single forward pass) and to ``zero`` (the 64-view forward pass with
no training), which separates the cost of the views from the cost of adapting.

    python -m benchmarks.method_latency --model demo --threads 2 --images 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adapters import get_method, method_names
from benchmarks._lib import synthetic
from benchmarks._lib.data import tensors_to_pil
from server.clip import load_backbone
from server.engine.adaptation import adapt_image, image_seed
from server.engine.classes import ClassFeatures
from server.service.decoding import to_uint8_tensor
from server.settings import Settings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    backbone = load_backbone(Settings(model=args.model, pretrained=args.pretrained, device=args.device, _env_file=None))
    methods = method_names() if args.methods == "all" else args.methods.split(",")
    batch = synthetic.make_split("test_seen", args.images, seed=1)
    images = tensors_to_pil(batch.images)
    labels = tuple(synthetic.CLASS_NAMES)
    classes = ClassFeatures(backbone, 2**20).get(labels, tuple(synthetic.TEMPLATES)).clone()
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    print(
        f"model={backbone.spec.display} device={backbone.device} threads={args.threads} images={args.images} "
        f"classes={len(labels)}",
        flush=True,
    )
    for i, image in enumerate([images[0], *images]):  # the first image warms every method up, unrecorded
        original, base = to_uint8_tensor(image), backbone.preprocess(image)
        for method in methods:
            impl = get_method(method)
            options = impl.parse_options({})
            started = time.perf_counter()
            if method == "zero_shot":
                impl.predict(backbone.encode_images(base[None]), classes, backbone.logit_scale, options)
            else:
                adapt_image(
                    backbone,
                    impl,
                    options,
                    original,
                    base,
                    classes,
                    labels,
                    torch.Generator().manual_seed(image_seed(0, i)),
                )
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                seconds[method].append(time.perf_counter() - started)
    result = {}
    base_zs = statistics.median(seconds["zero_shot"]) if "zero_shot" in seconds else None
    base_zero = statistics.median(seconds["zero"]) if "zero" in seconds else None
    print(f"{'method':10s} {'p50 ms':>8s} {'p95 ms':>8s} {'x zero_shot':>12s} {'x zero (64 views)':>18s}")
    for method, values in seconds.items():
        p50, p95 = statistics.median(values), percentile(values, 0.95)
        result[method] = {"p50_s": p50, "p95_s": p95}
        vs_zs = f"{p50 / base_zs:12.1f}" if base_zs else f"{'-':>12s}"
        vs_zero = f"{p50 / base_zero:18.2f}" if base_zero else f"{'-':>18s}"
        print(f"{method:10s} {1000 * p50:8.1f} {1000 * p95:8.1f} {vs_zs} {vs_zero}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
