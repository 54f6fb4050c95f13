"""Calibration on the user's own data: a confidence model fitted on labelled images of one label set.

``POST /v1/label-sets/{name}/calibration`` sends labelled images (each with its label in the set). A fit
runs in the background: each method named runs on the images through the classify pipeline, in requests
of ``TTA_MAX_IMAGES_PER_REQUEST`` images (``TTA_ADAPT_MAX_BATCH`` for adapted methods) that take their
turn in the engine's lanes beside live traffic, retried when served zero-shot for overload; then a
``ConfidenceModel`` is fitted (on a thread) to the images' zero-shot logits and whether each answer was
right. It is first fitted on half of the images and measured on the other half (the held-out ECE
before and after that ``GET`` shows), then refitted on all of them and stored with the label set.

Later requests on that label set use it: for their method if it was fitted for it, else the label
set's ``zero_shot`` fit, else the label-free default. It holds for the label set and the model it was
fitted with (their fingerprints): a label set deleted and created again, or another model, ignores it;
deleting the label set deletes it. A fit in progress is lost if the server restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import method_names
from server.engine import Engine
from server.errors import Conflict, InvalidInput, NotReady, Overloaded, TTAError
from server.service.calibration import FittedCalibrations
from server.service.classify import ClassifyRequest, ClassifyService
from server.service.confidence import ConfidenceModel
from server.service.decoding import ImageInput
from server.service.label_sets import LabelSets, fingerprint
from server.settings import Settings
from server.storage import CalibrationRecord, LabelSet

log = logging.getLogger("ttaserve.calibration")

MIN_IMAGES = 20  # fewer cannot both fit a model and measure it on a held-out half
OVERLOAD_RETRIES = 120  # a chunk answered zero-shot for overload is tried again, this many times at most
SEED = 0  # the views of adapted methods, for a fit that can be repeated
# How near a label set's fit stays to the label-free model's weights (its level is free). Chosen on the demo
# model's design families (noise, weather, style; 200 images to fit, 300 to score): mean ECE 6.2 with no
# prior, 5.9 at 0.01, 6.2 at 0.05, 7.0 at 0.2, 8.2 at 1.0.
PRIOR_STRENGTH = 0.01


def _ece(confidence: torch.Tensor, right: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error in percent over equal-width confidence bins."""
    index = torch.bucketize(confidence.clamp(1e-6, 1), torch.linspace(0, 1, bins + 1)[1:-1], right=True)
    gap = torch.zeros(bins).scatter_add_(0, index, confidence - right)
    return 100 * float(gap.abs().sum() / len(right))


@dataclass
class Fit:
    """A fit in progress (or just ended) for one label set."""

    label_set: str
    methods: list[str]
    images: int
    owner: str = ""  # who started it: its calibration is theirs
    state: str = "running"  # running, fitted or failed
    done: int = 0  # images classified so far, over all methods
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None

    def describe(self) -> dict[str, Any]:
        total = self.images * len(self.methods)
        elapsed = (self.ended_at or time.time()) - self.started_at
        remaining = elapsed / self.done * (total - self.done) if self.done and self.state == "running" else None
        return {
            "state": self.state,
            "methods": self.methods,
            "images": self.images,
            "done": self.done,
            "total": total,
            "elapsed_s": round(elapsed, 3),
            "remaining_s": round(remaining, 3) if remaining is not None else None,
            "error": self.error,
        }


class Recalibration:
    """Fits confidence models on label sets' labelled images, in the background, through the classify pipeline."""

    def __init__(
        self,
        settings: Settings,
        label_sets: LabelSets,
        fitted: FittedCalibrations,
        classifier: ClassifyService,
        engine: Engine,
    ):
        self.settings = settings
        self.label_sets = label_sets
        self.fitted = fitted
        self.classifier = classifier
        self.engine = engine
        self._fits: dict[tuple[str, str], Fit] = {}  # (owner, label set) -> its fit
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self, name: str, *, owner: str = "") -> dict[str, Any]:
        """What ``GET /v1/label-sets/{name}/calibration`` shows to ``owner``: the fit in progress, and what is
        fitted."""
        label_set = self.label_sets.get(name, owner=owner)
        fit = self._fits.get((owner, name))
        return {
            "label_set": name,
            "fit": fit.describe() if fit else None,
            "calibrations": self.fitted.describe(label_set, owner),
        }

    def drop(self, name: str, *, owner: str = "") -> None:
        """Delete what ``owner`` fitted for a label set: its answers go back to the label-free default."""
        label_set = self.label_sets.get(name, owner=owner)
        fit = self._fits.get((owner, name))
        if fit is not None and fit.state == "running":
            raise Conflict(f"a calibration of {name!r} is running; wait for it to end", code="calibration_running")
        self.fitted.store.delete_calibrations(name, owner)
        self.fitted.forget(label_set, owner)
        self._fits.pop((owner, name), None)

    # -- fitting ---------------------------------------------------------------------------------
    def start(
        self,
        name: str,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        methods: Sequence[str] | None = None,
        *,
        owner: str = "",
    ) -> dict[str, Any]:
        """Check the request and start fitting, for ``owner``, in the background; returns what ``describe`` shows."""
        label_set = self.label_sets.get(name, owner=owner)
        methods = list(dict.fromkeys(methods or ["zero_shot"]))
        unknown = [m for m in methods if m not in method_names()]
        if unknown:
            raise InvalidInput(
                f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(method_names())}",
                code="unknown_method",
            )
        if len(images) != len(labels):
            raise InvalidInput(
                f"{len(images)} images and {len(labels)} labels: give each image its label", code="unlabelled_images"
            )
        if len(images) < MIN_IMAGES:
            raise InvalidInput(
                f"{len(images)} labelled images; a calibration needs at least {MIN_IMAGES}", code="too_few_images"
            )
        if len(images) > self.settings.max_calibration_images:
            raise InvalidInput(
                f"{len(images)} images; the limit is {self.settings.max_calibration_images} "
                "(TTA_MAX_CALIBRATION_IMAGES)",
                code="too_many_images",
            )
        index = {label: i for i, label in enumerate(label_set.labels)}
        missing = sorted({" ".join(str(label).split()) for label in labels} - set(index))
        if missing:
            raise InvalidInput(
                f"labels not in label set {name!r}: {', '.join(map(repr, missing[:5]))}", code="unknown_label"
            )
        if not self.engine.ready:
            raise NotReady("the model is still loading; retry shortly", retry_after_s=1)
        running = self._fits.get((owner, name))
        if running is not None and running.state == "running":
            raise Conflict(f"a calibration of {name!r} is already running", code="calibration_running")
        truth = torch.tensor([index[" ".join(str(label).split())] for label in labels])
        fit = self._fits[owner, name] = Fit(name, methods, len(images), owner)
        task = asyncio.get_running_loop().create_task(self._fit(fit, label_set, list(images), truth))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self.describe(name, owner=owner)

    async def _fit(self, fit: Fit, label_set: LabelSet, images: list[ImageInput], truth: torch.Tensor) -> None:
        try:
            for method in fit.methods:
                anchors, answers, raw = await self._classify(fit, label_set, method, images)
                record = await asyncio.get_running_loop().run_in_executor(
                    None, self._fitted, fit, label_set, method, anchors, answers, raw, truth
                )
                self.fitted.keep(record)
            fit.state = "fitted"
            log.info("calibrated label set %s for %s on %d images", label_set.name, ", ".join(fit.methods), fit.images)
        except TTAError as exc:
            fit.state, fit.error = "failed", exc.message
            log.warning("calibration of label set %s failed: %s", label_set.name, exc.message)
        except Exception as exc:
            fit.state, fit.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("calibration of label set %s failed", label_set.name)
        finally:
            fit.ended_at = time.time()

    async def _classify(
        self, fit: Fit, label_set: LabelSet, method: str, images: list[ImageInput]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's zero-shot logits [N, C], the method's answer [N] and its raw confidence [N]."""
        index = {label: i for i, label in enumerate(label_set.labels)}
        c = len(label_set.labels)
        anchors, answers, raw = [], [], []
        # Short requests take their turn in the lanes between live ones; adapted ones stack at most this many.
        step = self.settings.max_images_per_request if method == "zero_shot" else self.settings.adapt_max_batch
        for start in range(0, len(images), step):
            request = ClassifyRequest(
                images=images[start : start + step],
                label_set=label_set.name,
                top_k=c,
                method=method,
                seed=SEED + start,
                compare=True,
                monitor=False,
                owner=fit.owner,
            )
            for _ in range(OVERLOAD_RETRIES):
                answer = await self.classifier.classify(request)
                # Served zero-shot because the lane was busy: not the method's answer. Yield to live traffic.
                if not any(r.adaptation.skipped == "overload" for r in answer.results):
                    break
                await asyncio.sleep(max(1.0, float(self.settings.retry_after_s)))
            else:
                raise Overloaded(
                    f"the adaptation lane stayed over its budget for {OVERLOAD_RETRIES} tries; "
                    "calibrate when the server is less busy",
                    code="queue_full",
                )
            for result in answer.results:
                assert result.zero_shot is not None  # compare=True
                row = torch.zeros(c)
                for p in result.zero_shot.predictions:
                    row[index[p.label]] = p.logit
                anchors.append(row)
                answers.append(index[result.predictions[0].label])
                raw.append(result.predictions[0].raw_probability)
            fit.done += len(answer.results)
        return torch.stack(anchors), torch.tensor(answers), torch.tensor(raw)

    def _fitted(
        self,
        fit: Fit,
        label_set: LabelSet,
        method: str,
        anchors: torch.Tensor,
        answers: torch.Tensor,
        raw: torch.Tensor,
        truth: torch.Tensor,
    ) -> CalibrationRecord:
        """Fit on half, measure on the other half, refit on all: the record to keep."""
        n = len(truth)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
        half, rest = order[: n // 2], order[n // 2 :]
        right = (answers == truth).float()
        before = self.fitted.model(method, label_set, fit.owner)
        data = f"label set {label_set.name}, {method}"
        prior, strength = self.fitted.calibration.label_free, PRIOR_STRENGTH
        trial = ConfidenceModel.fit(anchors[half], truth[half], data, answers[half], prior, strength)
        held_out = {
            "images": len(rest),
            "accuracy": round(100 * float(right[rest].mean()), 2),
            "ece": {
                "raw": round(_ece(raw[rest], right[rest]), 2),
                "before": round(_ece(before.predict(anchors[rest], answers[rest]), right[rest]), 2),
                "after": round(_ece(trial.predict(anchors[rest], answers[rest]), right[rest]), 2),
            },
        }
        model = ConfidenceModel.fit(anchors, truth, data, answers, prior, strength)
        backbone = self.engine.backbone
        return CalibrationRecord(
            label_set.name,
            method,
            fingerprint(label_set),
            backbone.fingerprint if backbone else "",
            model.to_dict(),
            {"images": n, "held_out": held_out},
            owner=fit.owner,
        )

    def cancel(self) -> None:
        """Cancel the fits still running (the server is stopping); they are lost, as documented."""
        for task in list(self._tasks):
            task.cancel()
