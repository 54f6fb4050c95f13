"""Online sessions against episodic methods on shifted streams of demo images.

One pool of shifted images (a corruption of the synthetic suite at one severity, ``--n`` images) is sent
as three streams, through the server's classify pipeline in this process (``ClassifyService``, as the
HTTP API runs it), in requests of ``--batch-size`` images:

- ``iid``: the pool in random order;
- ``correlated``: runs of up to ``--run`` images of one class, the runs in random order;
- ``poisoned``: the i.i.d. stream with ``--poison`` of its images replaced by crafted ones: images of
  other classes pushed by a targeted PGD (L-inf ``--eps``) on the demo model until zero-shot calls them
  one target class with high confidence. Accuracy is over the clean images, the victims; "pulled" is the
  share of clean images of other classes answered as the target class.

Methods: ``zero_shot`` (episodic), each session method (one fresh session per stream, state kept across
its requests) and ``--episodic`` (the best episodic method affordable here, MTA with 16 views by
default). Episodic methods do not depend on order: they run once per image and are read in each
stream's order. It prints a table of accuracy per stream and method, the change against episodic
zero-shot, each session's drift signal (share of answers that differ from zero-shot's) and its bytes
against its caps; ``--split val`` runs on the validation images (where the default session method
was chosen), ``--split test`` on the test images.

    python -m benchmarks.session_streams --split val --threads 1
    python -m benchmarks.session_streams --split test --threads 1 --shift fog
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.online import ONLINE_METHODS
from benchmarks._lib import shifts, synthetic
from benchmarks._lib.data import tensors_to_pil
from benchmarks._lib.runners import DirectRunner
from server.clip.backbone import Backbone
from server.service import ClassifyRequest

STREAMS = ("iid", "correlated", "poisoned")


def correlated_order(labels: torch.Tensor, run: int, gen: torch.Generator) -> torch.Tensor:
    """Indices in runs of up to ``run`` images of one class, the runs shuffled."""
    chunks: list[torch.Tensor] = []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=gen)]
        chunks += list(members.split(run))
    order = torch.randperm(len(chunks), generator=gen)
    return torch.cat([chunks[i] for i in order])


def craft_poison(
    backbone: Backbone, images: torch.Tensor, target: int, classes: torch.Tensor, eps: float, steps: int = 150
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L-inf attack (Adam on the perturbation, projected): [N, 3, H, W] in [0, 1] -> the images on the
    8-bit grid, and [N] the target's zero-shot probability on them as the server reads them."""
    cfg = backbone.preprocess_cfg
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    model = backbone.model
    goal = torch.full((images.shape[0],), target)
    delta = torch.zeros_like(images, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=0.01)
    for _ in range(steps):
        with torch.enable_grad():
            x = F.interpolate((images + delta).clamp(0, 1), size=backbone.image_size, mode="bilinear")
            feats = F.normalize(model.encode_image((x - mean) / std).float(), dim=-1)  # type: ignore[operator]
            loss = F.cross_entropy(backbone.logit_scale * feats @ classes.T, goal)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
    crafted = shifts.quantise((images + delta.detach()).clamp(0, 1))
    feats = backbone.encode_images(torch.stack([backbone.preprocess(p) for p in tensors_to_pil(crafted)]))
    return crafted, (backbone.logit_scale * feats @ classes.T).softmax(-1)[:, target]


def scored(
    stream: str,
    method: str,
    pred: torch.Tensor,
    truth: torch.Tensor,
    victims: torch.Tensor,
    target: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy over the clean images (``victims``), and the share of clean images of other classes than
    ``target`` answered as it."""
    others = victims & (truth != target)
    return {
        "stream": stream,
        "method": method,
        "accuracy": 100 * float(((pred == truth) & victims).sum()) / int(victims.sum()),
        "pulled": 100 * float(((pred == target) & others).sum()) / max(int(others.sum()), 1),
        **(extra or {}),
    }


class Streams:
    """Sends streams through the classify service of a ``DirectRunner``'s runtime, one request at a time."""

    def __init__(self, runner: DirectRunner, batch_size: int, seed: int):
        self.runtime = runner.runtime
        self.loop = asyncio.new_event_loop()
        self.batch_size = batch_size
        self.seed = seed

    def run(
        self,
        images: list[Any],
        method: str = "zero_shot",
        options: dict[str, Any] | None = None,
        session: str | None = None,
        session_method: str | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Each image's answer (class index), and per image its session report (with a session)."""
        index = {name: i for i, name in enumerate(synthetic.CLASS_NAMES)}
        preds, reports = [], []
        for start in range(0, len(images), self.batch_size):
            request = ClassifyRequest(
                images=images[start : start + self.batch_size],
                labels=synthetic.CLASS_NAMES,
                templates=synthetic.TEMPLATES,
                top_k=1,
                method=method,
                options=options or None,
                seed=self.seed + start,
                session=session,
                session_method=session_method,
                monitor=False,
            )
            answer = self.loop.run_until_complete(self.runtime.classifier.classify(request))
            for result in answer.results:
                preds.append(index[result.predictions[0].label])
                reports.append(result.session.model_dump() if result.session else {})
        return torch.tensor(preds), reports

    def close(self) -> None:
        self.loop.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--shift", default="gaussian_noise", help=f"one of {', '.join(shifts.SHIFTS)}")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000, help="images per stream")
    parser.add_argument("--run", type=int, default=10, help="longest run of one class in the correlated stream")
    parser.add_argument("--poison", type=float, default=0.1, help="share of the poisoned stream that is crafted")
    parser.add_argument("--eps", type=float, default=16 / 255, help="L-inf budget of the crafted images")
    parser.add_argument("--target", type=int, default=0, help="the class the crafted images pull toward")
    parser.add_argument("--episodic", default="mta", help="the episodic method to compare (besides zero_shot)")
    parser.add_argument("--episodic-options", default=None, help='its options, JSON (default: {"views": 16})')
    parser.add_argument("--batch-size", type=int, default=8, help="images per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/session_streams"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    clean, labels = shifts.make_shifted(args.shift, args.severity, args.n, args.seed, args.split)
    runner = DirectRunner(args.model, None, "cpu", args.batch_size, args.seed)
    streams = Streams(runner, args.batch_size, args.seed)
    backbone = runner.runtime.engine.backbone
    assert backbone is not None
    gen = torch.Generator().manual_seed(args.seed)

    # The crafted images: images of other classes than the target, from a pool the streams never show,
    # attacked; the most confidently wrong ones are kept.
    n_poison = round(args.poison * args.n)
    extra, extra_labels = shifts.make_shifted(args.shift, args.severity, 3 * n_poison, args.seed + 1, args.split)
    sources = (extra_labels != args.target).nonzero().squeeze(1)[: 2 * n_poison]
    with torch.no_grad():
        prompts = backbone.encode_prompts([t.format(c) for c in synthetic.CLASS_NAMES for t in synthetic.TEMPLATES])
    classes = F.normalize(prompts.view(len(synthetic.CLASS_NAMES), len(synthetic.TEMPLATES), -1).mean(1), dim=-1)
    attacked, confidence = craft_poison(backbone, extra[sources], args.target, classes, args.eps)
    kept = confidence.argsort(descending=True)[:n_poison]
    poison, sources = attacked[kept], sources[kept]
    pool = tensors_to_pil(torch.cat([clean, poison]))
    pool_labels = torch.cat([labels, extra_labels[sources]])
    is_poison = torch.cat([torch.zeros(args.n, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])

    iid = torch.randperm(args.n, generator=gen)
    poisoned = iid.clone()
    slots = torch.randperm(args.n, generator=gen)[:n_poison]  # the crafted images replace clean ones here
    poisoned[slots] = torch.arange(args.n, args.n + n_poison)
    orders = {"iid": iid, "correlated": correlated_order(labels, args.run, gen), "poisoned": poisoned}

    methods = list(dict.fromkeys(["zero_shot", args.episodic]))
    options = json.loads(args.episodic_options) if args.episodic_options else {"views": 16}
    episodic_options = {args.episodic: options} if args.episodic != "zero_shot" else {}
    print(
        f"model {runner.description}; {args.split} split, {args.shift}-{args.severity}, {args.n} images per stream, "
        f"{n_poison} crafted (target {synthetic.CLASS_NAMES[args.target]!r}, eps {args.eps * 255:.0f}/255); "
        f"requests of {args.batch_size}; episodic {args.episodic} {episodic_options.get(args.episodic, {})}",
        flush=True,
    )
    answers: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for method in methods:
        t0 = time.perf_counter()
        answers[method], _ = streams.run(pool, method, episodic_options.get(method))
        seconds[method] = time.perf_counter() - t0
        print(f"  {method}: {seconds[method]:.0f} s", flush=True)
    crafted = answers["zero_shot"][is_poison]
    print(
        f"  crafted images answered {synthetic.CLASS_NAMES[args.target]!r} by zero-shot: "
        f"{100 * (crafted == args.target).float().mean():.0f}%, its probability on them: mean "
        f"{float(confidence[kept].mean()):.2f}, least {float(confidence[kept].min()):.2f}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    settings = runner.runtime.settings
    for stream in STREAMS:
        order = orders[stream]
        truth, victims = pool_labels[order], ~is_poison[order]
        rows.extend(scored(stream, method, answers[method][order], truth, victims, args.target) for method in methods)
        for online in ONLINE_METHODS:
            t0 = time.perf_counter()
            session = f"{stream}-{online}"
            pred, reports = streams.run([pool[i] for i in order], session=session, session_method=online)
            described = runner.runtime.sessions.describe("", session)
            state = described["states"][0]
            rows.append(
                scored(
                    stream,
                    f"session {online}",
                    pred,
                    truth,
                    victims,
                    args.target,
                    {
                        "disagreement": 100 * state["disagreement"],
                        "bytes": state["bytes"],
                        "state_max_bytes": state["max_bytes"],
                        "session_max_bytes": settings.session_max_bytes,
                        "seconds": time.perf_counter() - t0,
                        "last_weight": reports[-1]["weight"],
                    },
                )
            )
            print(f"  {stream} / session {online}: {rows[-1]['seconds']:.0f} s", flush=True)
    streams.close()
    runner.close()

    base = {r["stream"]: r["accuracy"] for r in rows if r["method"] == "zero_shot"}
    lines = [
        (
            "| stream | method | top-1 % | vs zero-shot | pulled to target % | differs from zero-shot % "
            "| bytes (state max / session cap) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        memory = f"{r['bytes']:,} ({r['state_max_bytes']:,} / {r['session_max_bytes']:,})" if "bytes" in r else "-"
        differs = f"{r['disagreement']:.1f}" if "disagreement" in r else "-"
        delta = r["accuracy"] - base[r["stream"]]
        lines.append(
            f"| {r['stream']} | {r['method']} | {r['accuracy']:.1f} | {delta:+.1f} | {r['pulled']:.1f} | {differs} "
            f"| {memory} |"
        )
    table = "\n".join(lines)
    meta = {
        "model": runner.description,
        "split": args.split,
        "shift": f"{args.shift}-{args.severity}",
        "n": args.n,
        "crafted": n_poison,
        "crafted_hit_target": float((crafted == args.target).float().mean()),
        "crafted_target_probability": float(confidence[kept].mean()),
        "target": synthetic.CLASS_NAMES[args.target],
        "default_session_method": settings.session_method,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{args.split}-{args.shift}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table)
    worst = {
        name: min(r["accuracy"] - base[r["stream"]] for r in rows if r["method"] == f"session {name}")
        for name in ONLINE_METHODS
    }
    print(
        "worst change against episodic zero-shot over the streams: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in worst.items())
    )
    print(f"default session method (TTA_SESSION_METHOD): {settings.session_method}; {meta['seconds']:.0f} s in all")
    print(f"wrote {path}")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
