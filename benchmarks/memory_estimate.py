"""The adaptation lane's memory estimate against the memory adapting one image really takes.

For each method and label-set size C, on one loaded model: the bytes ``server.engine.admission.MemoryModel``
estimates for one image (what the lane stacks against ``TTA_ADAPT_MEMORY_BYTES`` and what a result
reports as ``adaptation.memory_bytes``), beside the measured rise of memory while our method adapts
one image, after a warm-up call has filled the caches. On a GPU the rise is
``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the CPU it is the
peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before it,
with glibc told to hand freed blocks back (``release_freed_memory``).
A ratio above 1 means the estimate is conservative: the lane stacks fewer images than would fit.

    python -m benchmarks.memory_estimate --model ViT-B-32 --threads 2 --classes 10,100,300
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import re
from pathlib import Path
from typing import Any

import torch

from adapters import get_method
from benchmarks._lib.latency_inputs import (
    LabelSet,
    add_model_arguments,
    class_names,
    make_samples,
    method_options,
    run_ours,
)
from benchmarks._lib.peaks import CudaPeak, ProcessPeak
from server.clip import load_backbone
from server.clip.probes import ActivationBytes
from server.engine.admission import MemoryModel
from server.settings import Settings

METHODS = ("tpt", "ctpt", "ttl", "tps", "zero", "mta")


def release_freed_memory() -> None:
    """Have glibc serve every allocation over 128 KiB from its own mapping, returned to the OS when freed,
    so the resident set follows the live tensors instead of what the allocator kept from earlier calls."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; also fixes the dynamic threshold


def resident_mib() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def measure_rise_mib(device: torch.device, fn: Any) -> float:
    """MiB the call's memory rose above what was held before it, at its peak."""
    if device.type == "cuda":
        gauge = CudaPeak(device)
        gauge.reset()
        fn()
        torch.cuda.synchronize(device)
        return gauge.rise_mib()
    gauge = ProcessPeak()
    gauge.reset()
    before = resident_mib()
    fn()
    peak = gauge.peak_mib()
    return float("nan") if peak is None else peak - before


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, METHODS)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cpu":
        release_freed_memory()
    pretrained = None if args.pretrained in (None, "", "none") else args.pretrained
    backbone = load_backbone(
        Settings(model=args.model, pretrained=pretrained, device=args.device, precision=args.precision, _env_file=None)
    )
    backbone.warm_up()
    activations = ActivationBytes.measure(backbone)
    model = MemoryModel(activations, budget_bytes=2**62)
    print(
        f"{args.model} on {backbone.device} at {args.precision}: activations kept for a backward pass "
        f"{activations.image / 2**20:.1f} MiB per image, {activations.prompt_token / 2**10:.1f} KiB per prompt "
        f"token; {args.views} views, {args.steps} step(s)",
        flush=True,
    )
    sample = make_samples(backbone, 1, 256)[0]
    rows = []
    print(f"{'method':8s} {'C':>6s} {'estimate MiB':>13s} {'measured MiB':>13s} {'estimate/measured':>18s}")
    for c in args.classes:
        label_set = LabelSet(backbone, class_names(c))
        for name in [m for m in args.methods.split(",") if m]:
            method = get_method(name)
            options = method.parse_options(method_options(name, args.views, args.steps))
            adapt = functools.partial(run_ours, name, options, label_set, sample, 0)
            adapt()  # fills the caches the estimate leaves out
            measured = measure_rise_mib(backbone.device, adapt)
            estimate = model.image_bytes(backbone, method, options, label_set.labels) / 2**20
            rows.append({"method": name, "classes": c, "estimate_mib": estimate, "measured_mib": measured})
            ratio = f"{estimate / measured:18.2f}" if measured > 0 else f"{'n/a':>18s}"
            print(f"{name:8s} {c:6d} {estimate:13,.1f} {measured:13,.1f} {ratio}", flush=True)
    return rows


if __name__ == "__main__":
    main()
