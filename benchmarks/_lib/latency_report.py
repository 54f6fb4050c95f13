"""The adaptation latency benchmark's rows, tables and target checks (see benchmarks/adaptation_latency.py)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Setup:
    """One row of a table: latencies of one setup, its throughput and memory."""

    method: str
    setup: str  # "reference", "ours", "http c4", "forward base view", ...
    seconds: list[float] = field(default_factory=list)  # per image (per request, for http)
    wall_s: float | None = None  # http: first request sent to last answer
    concurrency: int = 1
    peak_mib: float | None = None
    rise_mib: float | None = None  # GPU: peak above what was allocated before (per in-flight request at c1)
    skipped: int = 0  # http: answers the server gave zero-shot instead (adaptation.skipped)
    estimate_mib: float | None = None  # http: the server's estimate of one image's activations (memory_bytes)

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p95(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(0.95 * len(ordered)) - 1))]

    @property
    def images_per_s(self) -> float:
        return len(self.seconds) / (self.wall_s if self.wall_s is not None else sum(self.seconds))

    def note_memory(self, peak: float | None, rise: float | None = None) -> None:
        if peak is not None:
            self.peak_mib = max(self.peak_mib or 0.0, peak)
        if rise is not None:
            self.rise_mib = max(self.rise_mib or 0.0, rise)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "setup": self.setup,
            "n": len(self.seconds),
            "p50_s": self.p50,
            "p95_s": self.p95,
            "images_per_s": self.images_per_s,
            "concurrency": self.concurrency,
            "peak_mib": self.peak_mib,
            "rise_mib": self.rise_mib,
            "estimate_mib": self.estimate_mib,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def summarize(setups: list[Setup], references: dict[str, Setup], forwards: dict[str, Setup]) -> list[dict[str, Any]]:
    """Each setup's figures with its ratios: p50 and img/s over the method's reference (a), p50 over the
    forward pass alone (zero-shot: the base view; ZERO: the views). None where there is no such baseline."""
    rows = []
    for s in setups:
        ref, fwd = references.get(s.method), forwards.get(s.method)
        row = s.summary()
        row["p50_over_reference"] = s.p50 / ref.p50 if ref is not None and s is not ref else None
        row["images_per_s_over_reference"] = (
            s.images_per_s / ref.images_per_s if ref is not None and s is not ref else None
        )
        row["p50_over_forward"] = s.p50 / fwd.p50 if fwd is not None and s is not fwd else None
        rows.append(row)
    return rows


def print_table(
    c: int, rows: list[dict[str, Any]], checks: dict[str, dict[str, Any]], http_agree: dict[str, str], memory_note: str
) -> None:
    print(f"\n== C = {c} classes ==  (peak memory: {memory_note})")
    head = (
        f"{'method':10s} {'setup':18s} {'p50 ms':>10s} {'p95 ms':>10s} {'img/s':>8s} {'peak MiB':>9s} "
        f"{'+MiB':>7s} {'est MiB':>8s} {'p50/(a)':>8s} {'img/s/(a)':>10s} {'p50/fwd':>8s}"
    )
    print(head)
    print("-" * len(head))

    def ratio(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"

    for r in rows:
        skipped = f"  ({r['skipped']} answered zero-shot: adaptation skipped)" if r["skipped"] else ""
        print(
            f"{r['method']:10s} {r['setup']:18s} {1000 * r['p50_s']:10.1f} {1000 * r['p95_s']:10.1f} "
            f"{r['images_per_s']:8.3f} {fmt_mib(r['peak_mib']):>9s} {fmt_mib(r['rise_mib']):>7s} "
            f"{fmt_mib(r['estimate_mib']):>8s} "
            f"{ratio(r['p50_over_reference'], 8, 3)} {ratio(r['images_per_s_over_reference'], 10, 2)} "
            f"{ratio(r['p50_over_forward'], 8, 2)}{skipped}"
        )
    for method, check in checks.items():
        extra = f", explained (rounding or ZERO tie): {check['explained']}" if check["explained"] else ""
        bad = f", UNEXPLAINED: {check['unexplained']}" if check["unexplained"] else ""
        far = "" if check["max_logit_diff"] <= check["tolerance"] else " BEYOND ROUNDING"
        distinct = f"{check['distinct_classes']} distinct class{'es' if check['distinct_classes'] != 1 else ''}"
        print(
            f"top-1 agreement {method:5s} (a) vs (b): {check['agree']}/{check['images']} ({distinct}; "
            f"max |logit diff| {check['max_logit_diff']:.2e}, tolerance {check['tolerance']:.0e}{far})"
            f"{extra}{bad}; (a) vs (c): {http_agree.get(method, '-')}"
        )


def targets(results: dict[int, dict[str, Any]], device: torch.device) -> list[str]:
    """The issue's speed targets, checked on whatever this run measured."""
    lines = []

    def row(c: int, method: str, setup: str) -> dict[str, Any] | None:
        for r in results.get(c, {}).get("setups", []):
            if r["method"] == method and r["setup"] == setup:
                return r
        return None

    def http_rows(c: int, method: str) -> list[dict[str, Any]]:
        rows = [
            r for r in results.get(c, {}).get("setups", []) if r["method"] == method and r["setup"].startswith("http")
        ]
        return sorted(rows, key=lambda r: r["concurrency"])

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    gpu = device.type == "cuda"
    c_tpt = 1000 if gpu else 100
    ref = row(c_tpt, "tpt", "reference")
    https = http_rows(c_tpt, "tpt")
    if ref and https:
        c1, top = https[0], https[-1]
        speedup = ref["p50_s"] / c1["p50_s"]
        lines.append(
            f"TPT C={c_tpt}: reference p50 / server c{c1['concurrency']} p50 = {speedup:.2f}x "
            f"(target >= 3x on CPU): {verdict(speedup >= 3)}"
        )
        gain = top["images_per_s"] / ref["images_per_s"]
        want = 10 if gpu else 4
        lines.append(
            f"TPT C={c_tpt}: server c{top['concurrency']} img/s / reference img/s = {gain:.2f}x "
            f"(target >= {want}x at c16): {verdict(gain >= want)}"
        )
        if gpu:
            lines.append(
                f"TPT C=1000 single request p50 {1000 * c1['p50_s']:.1f} ms (target < 100 ms): "
                f"{verdict(c1['p50_s'] < 0.1)}"
            )
            ours = row(c_tpt, "tpt", "ours")
            if ours and ours["rise_mib"] is not None:
                lines.append(
                    f"TPT C=1000 memory per in-flight request (ours, above the resident model): "
                    f"{ours['rise_mib']:,.0f} MiB (target < 4096): {verdict(ours['rise_mib'] < 4096)}"
                )
            if top["rise_mib"] is not None:
                per = top["rise_mib"] / top["concurrency"]
                lines.append(
                    f"TPT C=1000 server at c{top['concurrency']}: {per:,.0f} MiB per in-flight request "
                    f"(nvidia-smi rise / concurrency): {verdict(per < 4096)}; the server's estimate per "
                    f"image: {fmt_mib(top['estimate_mib'])} MiB"
                )
    for c in sorted(results):
        fwd_base, fwd_views = row(c, "zero_shot", "forward base view"), row(c, "zero", "forward views")
        zs = http_rows(c, "zero_shot")
        if fwd_base and zs:
            ratio = zs[0]["p50_s"] / fwd_base["p50_s"]
            lines.append(
                f"zero-shot C={c}: server c{zs[0]['concurrency']} p50 / base-view forward p50 = {ratio:.2f} "
                f"(target <= 1.3): {verdict(ratio <= 1.3)}"
            )
        ours = row(c, "zero", "ours")
        if fwd_views and ours:
            ratio = ours["p50_s"] / fwd_views["p50_s"]
            lines.append(
                f"ZERO C={c}: ours p50 / views forward p50 = {ratio:.2f} (target <= 1.3): {verdict(ratio <= 1.3)}"
            )
        zero_http = http_rows(c, "zero")
        if fwd_views and zero_http:
            ratio = zero_http[0]["p50_s"] / fwd_views["p50_s"]
            lines.append(
                f"ZERO C={c}: server c{zero_http[0]['concurrency']} p50 / views forward p50 = {ratio:.2f} "
                f"(target <= 1.3): {verdict(ratio <= 1.3)}"
            )
    return lines


# -- the run --------------------------------------------------------------------------------------
