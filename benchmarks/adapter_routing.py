"""Routing among and merging of few-shot adapters, through the server's HTTP API (issue 16's third and fourth
must-shows).

The server runs in this process (``TestClient(create_app(...))``, as the integration tests run it) on the demo
model; everything below goes through ``POST /v1/adapters``, ``POST /v1/classify`` and
``POST /v1/adapter-groups/{group}/merge``. Per seed, two apex adapters are trained with the recipe
``benchmarks/fewshot_adapters.py`` chose for apex on validation (lr 3e-4, 75 steps) and its anchors (the
support images' captions, and the 4 nearest pairs per support image from a pool of captioned train-split
images of seen classes), 10 shots per class, on two disjoint groups of the eight held-out compositions (the
classes the demo model never saw):

- group A: pink hexagon, blue circle, red square, yellow heart;
- group B: cyan diamond, purple star, brown cross, green triangle.

Routing scores an image by its highest cosine with the prototypes of the classes an adapter saw images of
(``train.py`` stores a zero prototype for a label without shots; it once stored the label's text feature,
which two adapters trained against one label set shared, so they tied: RESULTS.md keeps those figures).
Each adapter is trained two ways (``--labels``): ``all``, against the 64 labels as ``fewshot_adapters.py``
does; ``group``, against the group's own 4 labels.

Each group holds two of the four compositions zero-shot gets least right on validation renders (ranked 1st
and 4th for A, 2nd and 3rd for B) and two it already gets right, so each adapter has something to learn and
neither routing nor merging is judged on a group zero-shot has already solved. The eight held-out
compositions have eight distinct colours and eight distinct shapes, so the groups share neither.

Routing (``adapter: {"route": "auto", "top_k": 1, "min_sim": tau, "group": g}``): ``tau`` is chosen on
validation images only. A routed request with ``min_sim: -1`` returns each image's ``best_similarity``;
``tau`` is the midpoint between neighbouring scores that best separates in-group images (A and B classes)
from out-of-group ones (seen classes, in neither group, plus noise and blank images), by the mean of the
two rates. On test images it prints the share routed to A, to B and answered by the frozen model alone,
and 64-way top-1 of the routed answers against zero-shot and each adapter alone.

Merging: the group is merged by each method; the table gives 64-way top-1 on A's, B's and the other
(seen) classes of zero-shot, each member alone, each unified adapter and (emr) each member's reconstruction,
and each member's fidelity, rescaler and mask density from the merge answer.

    python -m benchmarks.adapter_routing --threads 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters.fewshot.artifact import Adapter
from adapters.fewshot.train import Anchors, Pairs, TrainConfig, train_adapter
from benchmarks._lib import synthetic
from benchmarks._lib.data import tensors_to_pil
from benchmarks.fewshot_adapters import class_features, render
from server.api import create_app
from server.clip.backbone import Backbone
from server.settings import Settings

GROUPS = {
    "A": ["pink hexagon", "blue circle", "red square", "yellow heart"],
    "B": ["cyan diamond", "purple star", "brown cross", "green triangle"],
}
RECIPE = TrainConfig(type="apex", lr=3e-4, steps=75)  # fewshot_adapters.py's choice for apex (benchmarks/RESULTS.md)
SHOTS = 10
LABELS = ("all", "group")  # what each adapter is trained against (see train_group)
METHODS = ("emr", "ties", "task_arithmetic")
PER_REQUEST = 32  # the server's default TTA_MAX_IMAGES_PER_REQUEST


@dataclass
class ImageSet:
    """Images of one kind: base64 PNGs for the API, their labels (indices into CLASS_NAMES, -1: none)."""

    name: str
    images: list[str]
    labels: list[int]


def encode_png(images: list[Image.Image]) -> list[str]:
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def class_ids(names: Sequence[str]) -> list[int]:
    return [synthetic.CLASS_NAMES.index(n) for n in names]


def far_images(n: int, seed: int, size: int) -> list[Image.Image]:
    """Half uniform noise, half blank images of one random colour: like no class of either group."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n - n // 2, 3, size, size, generator=gen)
    blank = torch.rand(n // 2, 3, 1, 1, generator=gen).expand(-1, -1, size, size)
    return tensors_to_pil(torch.cat([noise, blank]))


def image_sets(n: int, split: str) -> dict[str, ImageSet]:
    """``n`` images of A's classes, of B's, of seen classes (in neither group) and of noise or blank."""
    offset = {"val": 1000, "test": 2000}[split]
    out = {}
    for k, (name, names) in enumerate(GROUPS.items()):
        batch = render(class_ids(names), n, offset + k)
        out[name] = ImageSet(f"{name} classes", encode_png(tensors_to_pil(batch.images)), batch.labels.tolist())
    seen = synthetic.make_split("val" if split == "val" else "test_seen", n, seed=0)
    out["seen"] = ImageSet("seen classes", encode_png(tensors_to_pil(seen.images)), seen.labels.tolist())
    size = seen.images.shape[-1]
    out["far"] = ImageSet("noise/blank", encode_png(far_images(n, offset + 7, size)), [-1] * n)
    return out


class Api:
    """The calls the benchmark makes, over the in-process app's HTTP interface."""

    def __init__(self, client: TestClient):
        self.client = client

    def upload(self, adapter: Adapter, name: str, group: str) -> str:
        answer = self.client.post(
            "/v1/adapters", params={"name": name, "group": group}, content=adapter.to_bytes(),
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip
        if answer.status_code != 201:
            raise RuntimeError(f"upload answered {answer.status_code}: {answer.text[:500]}")
        return str(answer.json()["ref"])

    def classify(self, images: list[str], adapter: Any = None) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), PER_REQUEST):
            body: dict[str, Any] = {
                "images": images[start : start + PER_REQUEST], "labels": synthetic.CLASS_NAMES,
                "templates": synthetic.TEMPLATES, "top_k": 1,
            }  # fmt: skip
            if adapter is not None:
                body["adapter"] = adapter
            answer = self.client.post("/v1/classify", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"/v1/classify answered {answer.status_code}: {answer.text[:500]}")
            results += answer.json()["results"]
        return results

    def merge(self, group: str, method: str) -> dict[str, Any]:
        answer = self.client.post(
            f"/v1/adapter-groups/{group}/merge", json={"method": method, "name": f"{group}.{method}"}
        )
        if answer.status_code != 201:
            raise RuntimeError(f"merge answered {answer.status_code}: {answer.text[:500]}")
        return dict(answer.json())


def accuracy(results: list[dict[str, Any]], labels: list[int]) -> float:
    right = [r["label"] == synthetic.CLASS_NAMES[y] for r, y in zip(results, labels, strict=True) if y >= 0]
    return 100.0 * sum(right) / len(right) if right else float("nan")


def train_group(
    backbone: Backbone, names: list[str], seed: int, pool: Pairs, frozen: torch.Tensor, labels: str
) -> Adapter:
    """10 shots of each of the group's classes, trained with both kinds of anchors, labelled against the group's
    own 4 labels (``labels == "group"``) or against all 64 (``"all"``, as ``fewshot_adapters.py`` trains)."""
    ids = class_ids(names)
    batch = render(ids, 40 * SHOTS, 10_000 + seed)
    idx = torch.cat([(batch.labels == c).nonzero().flatten()[:SHOTS] for c in ids])
    pil = tensors_to_pil(batch.images[idx])
    images = torch.stack([backbone.preprocess(p) for p in pil])
    captions = tuple(batch.captions[int(i)] for i in idx)
    anchors = Anchors(captions=Pairs(images, captions, backbone.encode_prompts(list(captions))), pool=pool)
    config = replace(RECIPE, seed=seed)
    targets = batch.labels[idx].clone()
    if labels == "group":
        targets = torch.tensor([ids.index(int(t)) for t in targets])
        frozen, label_names = frozen[ids], tuple(names)
    else:
        label_names = tuple(synthetic.CLASS_NAMES)
    return train_adapter(
        backbone, images, targets, label_names, frozen, config, base_model=backbone.fingerprint, anchors=anchors
    )


def choose_threshold(inside: list[float], outside: list[float]) -> tuple[float, float, float]:
    """The midpoint between neighbouring scores that maximises (share of ``inside`` at or above it + share of
    ``outside`` below it) / 2; with its two shares (in %)."""
    scores = sorted(set(inside + outside))
    candidates = [scores[0] - 1e-6] + [(a + b) / 2 for a, b in itertools.pairwise(scores)]
    best = (-1.0, 0.0, 0.0, 0.0)
    for tau in candidates:
        tpr = sum(s >= tau for s in inside) / len(inside)
        tnr = sum(s < tau for s in outside) / len(outside)
        if (tpr + tnr) / 2 > best[0]:
            best = ((tpr + tnr) / 2, tau, 100 * tpr, 100 * tnr)
    return best[1], best[2], best[3]


def routed_to(results: list[dict[str, Any]]) -> list[str | None]:
    """Each result's routed adapter (its name), or None when the frozen model answered alone."""
    return [r["adapter"]["routed"][0]["adapter"].split("@")[0] if r["adapter"]["routed"] else None for r in results]


def run_seed(api: Api, backbone: Backbone, seed: int, val: dict[str, ImageSet], test: dict[str, ImageSet],
             pool: Pairs, frozen: torch.Tensor, labels: str) -> dict[str, Any]:  # fmt: skip
    group = f"{labels}{seed}"
    started = time.monotonic()
    refs = {}
    for name, names in GROUPS.items():
        refs[name] = api.upload(train_group(backbone, names, seed, pool, frozen, labels), f"{group}-{name}", group)
    trained_s = time.monotonic() - started

    # min_sim on validation images only: each image's best similarity, with nothing cut.
    probe = {"route": "auto", "top_k": 1, "min_sim": -1.0, "group": group}
    best = {k: [float(r["adapter"]["best_similarity"]) for r in api.classify(s.images, probe)] for k, s in val.items()}
    inside, outside = best["A"] + best["B"], best["seen"] + best["far"]
    tau, val_in, val_out = choose_threshold(inside, outside)
    print(
        f"labels {labels}, seed {seed}: trained A and B in {trained_s:.1f}s; validation best similarity: in-group "
        f"min {min(inside):.3f} median {statistics.median(inside):.3f}; seen classes median "
        f"{statistics.median(best['seen']):.3f} max {max(best['seen']):.3f}; noise/blank max {max(best['far']):.3f}"
        f" -> min_sim {tau:.3f} (val: {val_in:.1f}% in-group at or above, {val_out:.1f}% out-of-group below)"
    )

    route = {"route": "auto", "top_k": 1, "min_sim": tau, "group": group}
    routing = []
    for images in test.values():
        answers = api.classify(images.images, route)
        to = routed_to(answers)
        row = {
            "set": images.name, "n": len(to),
            "to_A": 100 * to.count(f"{group}-A") / len(to), "to_B": 100 * to.count(f"{group}-B") / len(to),
            "base": 100 * to.count(None) / len(to), "routed_acc": accuracy(answers, images.labels),
            "zero_shot_acc": accuracy(api.classify(images.images), images.labels),
        }  # fmt: skip
        for name, ref in refs.items():
            row[f"{name}_acc"] = accuracy(api.classify(images.images, ref), images.labels)
        routing.append(row)

    scored = {k: test[k] for k in ("A", "B", "seen")}

    def scores(adapter: Any) -> dict[str, float]:
        return {k: accuracy(api.classify(s.images, adapter), s.labels) for k, s in scored.items()}

    merging: list[dict[str, Any]] = [{"model": "zero-shot", **scores(None)}]
    merging += [{"model": f"member {name} alone", **scores(ref)} for name, ref in refs.items()]
    members: list[dict[str, Any]] = []
    for method in METHODS:
        answer = api.merge(group, method)
        merging.append({"model": f"{method}: unified", **scores(answer["unified"]["ref"])})
        for name, member in zip(GROUPS, answer["members"], strict=True):
            if member["reconstruction"] is not None:
                merging.append({"model": f"{method}: {name} rebuilt", **scores(member["reconstruction"])})
            members.append({"method": method, "member": name, **{k: member[k] for k in
                            ("fidelity", "rescaler", "mask_density")}})  # fmt: skip
    return {"labels": labels, "seed": seed, "min_sim": tau, "val_in": val_in, "val_out": val_out, "routing": routing,
            "merging": merging, "members": members}  # fmt: skip


def print_seed(result: dict[str, Any]) -> None:
    seed = f"labels {result['labels']}, seed {result['seed']}"
    print(f"\nrouting, {seed}, min_sim {result['min_sim']:.3f} (top-1 % over the 64 labels):\n")
    print(
        "| test images | n | routed to A % | routed to B % | frozen model alone % | routed | zero-shot | A alone "
        "| B alone |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["routing"]:
        accs = " | ".join(
            "-" if r[k] != r[k] else f"{r[k]:.1f}" for k in ("routed_acc", "zero_shot_acc", "A_acc", "B_acc")
        )
        print(f"| {r['set']} | {r['n']} | {r['to_A']:.1f} | {r['to_B']:.1f} | {r['base']:.1f} | {accs} |")
    print(f"\nmerging, {seed} (top-1 % over the 64 labels):\n")
    print("| model | A classes | B classes | seen classes |")
    print("|---|---|---|---|")
    for r in result["merging"]:
        print(f"| {r['model']} | {r['A']:.1f} | {r['B']:.1f} | {r['seen']:.1f} |")
    print("\n| method | member | fidelity | rescaler | mask density |")
    print("|---|---|---|---|---|")
    for m in result["members"]:
        print(
            f"| {m['method']} | {m['member']} | {m['fidelity']:.3f} | {m['rescaler']:.3f} | {m['mask_density']:.3f} |"
        )


def print_summary(results: list[dict[str, Any]]) -> None:
    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.1f}"

    print(f"\nlabels {results[0]['labels']}, mean over seeds {', '.join(str(r['seed']) for r in results)}:")
    for k, row in enumerate(results[0]["routing"]):
        rows = [r["routing"][k] for r in results]
        print(
            f"routing {row['set']:<12}: to A {mean([r['to_A'] for r in rows])}%, "
            f"to B {mean([r['to_B'] for r in rows])}%, frozen alone {mean([r['base'] for r in rows])}%"
        )
    for k, row in enumerate(results[0]["merging"]):
        rows = [r["merging"][k] for r in results]
        print(
            f"merging {row['model']:<22}: A {mean([r['A'] for r in rows])}  B {mean([r['B'] for r in rows])}  "
            f"seen {mean([r['seen'] for r in rows])}"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n", type=int, default=100, help="test images per set (A, B, seen classes, noise/blank)")
    parser.add_argument("--val", type=int, default=60, help="validation images per set, for min_sim")
    parser.add_argument(
        "--labels", nargs="+", choices=LABELS, default=list(LABELS),
        help="train each adapter against all 64 labels, or its group's 4",
    )  # fmt: skip
    parser.add_argument("--pool", type=int, default=512, help="captioned train-split images the anchors come from")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            model=args.model, device="cpu", data_dir=Path(tmp) / "data", torch_threads=args.threads,
            max_batch_delay_ms=1.0, request_timeout_s=600.0, _env_file=None,
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 600
            while client.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the model did not load within 600 s")
                time.sleep(0.2)
            backbone = client.app.state.runtime.engine.backbone  # type: ignore[attr-defined]
            frozen = class_features(backbone, synthetic.CLASS_NAMES)  # [64, D], what training is labelled against
            pool_batch = synthetic.make_split("train", args.pool, seed=7)
            pool_images = torch.stack([backbone.preprocess(p) for p in tensors_to_pil(pool_batch.images)])
            pool = Pairs(pool_images, tuple(pool_batch.captions), backbone.encode_prompts(pool_batch.captions))
            val, test = image_sets(args.val, "val"), image_sets(args.n, "test")
            print(
                f"model {args.model}: {args.n} test images per set (A, B, seen classes, noise/blank), "
                f"{args.val} validation images per set; {RECIPE.type} lr {RECIPE.lr:g}, {RECIPE.steps} steps, "
                f"{SHOTS} shots per class, caption + retrieved anchors from a pool of {args.pool}"
            )
            results = [
                run_seed(Api(client), backbone, s, val, test, pool, frozen, labels)
                for labels in args.labels
                for s in args.seeds
            ]
    for result in results:
        print_seed(result)
    for labels in args.labels:
        print_summary([r for r in results if r["labels"] == labels])
    print(f"\n{time.monotonic() - started:.0f}s in all")
    return results


if __name__ == "__main__":
    main()
