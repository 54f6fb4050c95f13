"""Calibrated confidence for every answer: what a probability we return means, under shift too.

Every method's answer is calibrated label-free by default (``server.service.confidence``): the
confidence of an image's label is the model's probability that this label is right, read off the
zero-shot prediction of the image (adapted methods are anchored to it, as CoTS anchors an adapted
model to its zero-shot confidence: adaptation sharpens the softmax without making it more often
right); it is at least 1/C, as the top of a C-way choice. The label's probability is that confidence,
the others follow by a per-image temperature,
and the order of the labels is the method's own: calibration moves confidence, never the label.

Beside the calibrated distribution (which sums to 1) each label gets its own score: the probability
that the image shows it, as if it were the answer. Scores need not sum to 1, and one minus the
highest is the probability that no label fits ("none of these").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from server.clip.card import ModelCard
from server.engine import Engine
from server.errors import ConfigError
from server.service.confidence import ConfidenceModel, temper
from server.service.label_sets import LabelSets, fingerprint
from server.service.results import Prediction
from server.storage import CalibrationRecord, LabelSet, Store

LOG_T_RANGE = (math.log(0.05), math.log(20.0))


@dataclass(frozen=True)
class Calibrated:
    """One image's calibrated answer."""

    predictions: list[Prediction]  # the top_k, in the method's order
    confidence: float  # the probability that the first is right: its score, at least 1/C; its probability
    probabilities: torch.Tensor  # [C] the calibrated distribution
    none_of_these: float  # 1 - the highest label score


class Calibration:
    """How one model's answers become calibrated confidence."""

    def __init__(self, label_free: ConfidenceModel, source: str = "default"):
        self.label_free = label_free
        self.source = source  # "default" (shipped) or "model card" (fitted on the model's own images)

    @classmethod
    def from_card(cls, card: ModelCard) -> Calibration:
        """The card's own confidence model, or the shipped default; ConfigError for a malformed one."""
        if card.confidence is None:
            return cls(ConfidenceModel.default())
        try:
            return cls(ConfidenceModel.from_dict(card.confidence), "model card")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the model card's confidence entry is not a confidence model: {exc}") from exc

    def describe(self) -> dict[str, object]:
        """What /v1/models says about calibration."""
        model = self.label_free
        return {"kind": "label-free", "source": self.source, "images": model.images, "data": model.data}

    @staticmethod
    def calibrate(
        model: ConfidenceModel,
        logits: torch.Tensor,
        anchor: torch.Tensor,
        labels: tuple[str, ...],
        order: torch.Tensor | None,
        top_k: int,
    ) -> Calibrated:
        """Calibrate one image's answer with ``model`` (the label-free one, or one fitted for its label set).

        Args:
            logits: [C] the method's final logits.
            anchor: [C] the image's zero-shot logits (the base view, unadapted), which confidence reads.
            order: [C] the method's ranking when it is not the logits' (ZERO's vote), else None.
        """
        ranked = order if order is not None else torch.argsort(logits, descending=True, stable=True)
        top = ranked[:1]
        scores = model.scores(anchor[None].float())[0]  # [C]
        confidence = scores[top]  # [1] the answer's own score
        probabilities = temper(logits[None], confidence, top)[0]  # [C]
        raw = logits.float().softmax(-1)  # [C]
        predictions = [
            Prediction(
                label=labels[j],
                probability=float(probabilities[j]),
                raw_probability=float(raw[j]),
                score=float(scores[j]),
                logit=float(logits[j]),
            )
            for j in ranked[:top_k].tolist()
        ]
        return Calibrated(predictions, float(probabilities[top]), probabilities, 1.0 - float(scores.max()))

    @staticmethod
    def margin(model: ConfidenceModel, anchor: torch.Tensor) -> float:
        """The calibrated top-1 minus top-2 probability of a zero-shot answer (what the confidence gate reads)."""
        if anchor.shape[-1] < 2:
            return 1.0
        probabilities = temper(anchor[None], model.predict(anchor[None].float()))[0]
        top = probabilities.topk(2).values
        return float(top[0] - top[1])


class FittedCalibrations:
    """The confidence models fitted on label sets' labelled images, kept in the store, applied where they hold.

    Each belongs to the owner (API key name, '' without keys) that fitted it, and applies to that owner's
    requests only: two owners calibrating one shipped label set keep two calibrations.

    The records are read from the store at each use (one indexed read), never remembered: with replicas
    sharing a database (TTA_DATABASE_URL), a calibration fitted, replaced or dropped through one replica
    applies, or stops applying, on every other at its next request. Only the parsed confidence model is
    kept, under its record's version (when it was fitted, and for which label set and model), so a record
    replaced elsewhere is parsed afresh.
    """

    def __init__(self, store: Store, label_sets: LabelSets, calibration: Calibration, engine: Engine):
        self.store = store
        self.label_sets = label_sets
        self.calibration = calibration
        self.engine = engine
        # (owner, label set, method) -> (its record's version, its parsed model)
        self._models: dict[tuple[str, str, str], tuple[tuple[float, str, str], ConfidenceModel]] = {}

    def _records(self, owner: str, label_set: str) -> dict[str, CalibrationRecord]:
        """Method -> what ``owner`` fitted for ``label_set``, as the store holds it now."""
        return {record.method: record for record in self.store.calibrations(label_set, owner)}

    def _applies(self, record: CalibrationRecord, label_set: LabelSet) -> bool:
        backbone = self.engine.backbone
        return (
            record.label_set_fingerprint == fingerprint(label_set)
            and backbone is not None
            and record.model_fingerprint == backbone.fingerprint
        )

    def model(self, method: str, label_set: LabelSet | None, owner: str = "") -> ConfidenceModel:
        """The confidence model for ``method``'s answers on ``label_set`` (None: labels sent inline), as fitted
        by ``owner`` (each owner fits its own, the model's shipped label sets too)."""
        return self.models(method, label_set, owner)[0]

    def models(
        self, method: str, label_set: LabelSet | None, owner: str = ""
    ) -> tuple[ConfidenceModel, ConfidenceModel]:
        """``model`` of ``method`` and of ``zero_shot`` (what an image answered zero-shot is calibrated with),
        from one read of the store: a request's answers all use one snapshot of its calibrations."""
        if label_set is None:
            return self.calibration.label_free, self.calibration.label_free
        records = self._records(owner, label_set.name)
        wanted = {name: records[name] for name in (method, "zero_shot") if name in records}
        applies = {name: r for name, r in wanted.items() if self._applies(r, label_set)}
        return self._first(applies, (method, "zero_shot"), owner, label_set), self._first(
            applies, ("zero_shot",), owner, label_set
        )

    def _first(
        self, records: dict[str, CalibrationRecord], names: tuple[str, ...], owner: str, label_set: LabelSet
    ) -> ConfidenceModel:
        """The parsed model of the first of ``names`` with a record that applies, else the label-free one."""
        for name in names:
            record = records.get(name)
            if record is not None:
                key = (owner, label_set.name, name)
                version = (record.created_at, record.label_set_fingerprint, record.model_fingerprint)
                parsed = self._models.get(key)
                if parsed is None or parsed[0] != version:
                    parsed = self._models[key] = (version, ConfidenceModel.from_dict(record.model))
                return parsed[1]
        return self.calibration.label_free

    def keep(self, record: CalibrationRecord) -> None:
        """Store a fitted calibration and apply it from now on."""
        self.store.save_calibration(record)
        self._models.pop((record.owner, record.label_set, record.method), None)

    def forget(self, label_set: LabelSet, owner: str | None = None) -> None:
        """Drop the parsed models of what ``owner`` (default: the label set's) fitted for a label set (the store
        has deleted it, or is told to)."""
        key = (label_set.owner if owner is None else owner, label_set.name)
        self._models = {k: v for k, v in self._models.items() if k[:2] != key}

    def describe(self, label_set: LabelSet, owner: str = "") -> list[dict[str, Any]]:
        """Each calibration ``owner`` fitted for a label set, whether it applies, and its held-out figures."""
        return [
            {
                "method": method,
                "applies": self._applies(record, label_set),
                "fitted_at": record.created_at,
                **record.report,
            }
            for method, record in sorted(self._records(owner, label_set.name).items())
        ]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [0.05, 20] minimising the NLL of softmax(logits / T): a grid, then golden-section refinement.

    Args:
        logits: [N, C] a method's final logits on labelled images.
        labels: [N] the true class indices.
    """

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    grid = torch.linspace(*LOG_T_RANGE, 121).tolist()
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)
