"""What a classification returns, per image: typed results shared by every caller (HTTP, in-process tools).

These are the JSON shapes of ``POST /v1/classify``'s ``results``; the API wraps them in its response.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """The model that answered."""

    id: str
    pretrained: str | None
    demo: bool


class Prediction(BaseModel):
    label: str
    probability: float = Field(
        ...,
        description="Calibrated probability, label-free by default: the answer's is the probability that it is "
        "right, under shift too; the others follow by a per-image temperature. They sum to 1 over all labels.",
    )
    raw_probability: float = Field(..., description="Softmax of the logits as the model gives them.")
    score: float = Field(
        ...,
        description="This label's own calibrated probability that the image shows it, as if it were the answer. "
        "Scores need not sum to 1: threshold them label by label.",
    )
    logit: float = Field(..., description="Scaled cosine similarity: the model's logit scale times cos(image, class).")


class Ensemble(BaseModel):
    """How the answer blends the adapted and the zero-shot logits (``options.ensemble``)."""

    mode: str = Field(..., description="fixed or adaptive.")
    difficulty: float | None = Field(
        None,
        description="The zero-shot entropy of the most confident views over log C, in [0, 1] (0: the frozen "
        "model is sure); the adaptive weight is sigmoid((difficulty - a) / b) * exp(-divergence / guard).",
    )
    weight: float = Field(..., description="Weight of the adapted logits; the zero-shot ones get 1 - weight.")
    divergence: float | None = Field(
        None,
        description="KL(adapted || zero-shot) between the image's two answers, nats: how far the adapted answer "
        "went beyond what the frozen model supports; the adaptive weight's guard shrinks it by "
        "exp(-divergence / guard).",
    )


class Adaptation(BaseModel):
    method: str
    steps: int = Field(..., description="Optimizer steps (iterations, for forward-only methods) taken.")
    views: int = Field(..., description="Views encoded, the image included.")
    selected_views: int = Field(..., description="Views the loss or vote used.")
    entropy_before: float = Field(..., description="Entropy of the zero-shot prediction, nats.")
    entropy_after: float = Field(..., description="Entropy of the adapted prediction, nats.")
    zero_shot_label: str
    changed: bool = Field(..., description="The adapted label differs from zero-shot's.")
    seconds: float
    seed: int | None = Field(None, description="The seed the views were drawn with.")
    agreement: float | None = Field(
        None, description="ZERO: share of kept views voting for the label (not a probability)."
    )
    skipped: str | None = Field(
        None,
        description="Why the image was answered zero-shot instead: 'overload' (the adaptation lane was "
        "over its budget), 'confident' (the zero-shot margin passed the confidence gate) or 'memory' (adapting "
        "this image alone needs more than TTA_ADAPT_MEMORY_BYTES).",
    )
    batch_images: int = Field(1, description="Images adapted together in one stacked computation, this one included.")
    memory_bytes: int | None = Field(
        None,
        description="Estimated bytes of activations adapting this image holds, what the lane weighs against "
        "TTA_ADAPT_MEMORY_BYTES (null when the request was not admitted to the lane).",
    )
    drift: float | None = Field(
        None,
        description="Gradient methods: mean 1 - cos between the adapted and the frozen features (image features "
        "for TTL, class features for TPT, C-TPT and TPS): how far adaptation moved them.",
    )
    ensemble: Ensemble | None = Field(
        None, description="With options.ensemble other than off: the blend of adapted and zero-shot logits."
    )


class SessionReport(BaseModel):
    """What the request's session did for this image (requests with ``session`` only)."""

    id: str
    session_method: str = Field(..., description="The online method: 'tda' (feature caches) or 'stats'.")
    entries: int = Field(
        ...,
        description="What the session holds for this label set after this image: tda, cached features; "
        "stats, images folded into its per-class statistics.",
    )
    weight: float = Field(
        ...,
        description="How much the session's state weighed on the answer's label: tda, its positive cache "
        "affinity; stats, the statistics' weight n/(n + prior), 0 before any image of it.",
    )
    requests: int = Field(..., description="Requests this label set's state has seen, this one included.")
    disagreement: float = Field(
        ...,
        description="Share of this label set's answers so far that differ from zero-shot's: a drift and poisoning "
        "signal (watch for it climbing).",
    )
    reset: str | None = Field(
        None,
        description="Why the state started afresh on this request: 'labels_changed' (the label set's labels or "
        "templates changed) or 'method_changed' (another session_method).",
    )


class RoutedAdapter(BaseModel):
    adapter: str = Field(..., description="NAME@vN.")
    similarity: float = Field(..., description="Cosine of the image's frozen features to its nearest prototype.")


class AdapterReport(BaseModel):
    """Which few-shot adapter(s) answered this image (requests with ``adapter`` only)."""

    adapter: str | None = Field(..., description="The named adapter, NAME@vN; null when routed.")
    alpha: float | str = Field(
        ..., description='adapter_alpha: 0 is the frozen model, 1 the adapter; or "class_distance" (APEX\'s rule).'
    )
    routed: list[RoutedAdapter] | None = Field(
        None,
        description="When routed: the adapters this image used, most similar first; empty when none cleared "
        "min_sim and the frozen model answered alone.",
    )
    best_similarity: float | None = Field(None, description="When routed: the highest similarity of any candidate.")


class ZeroShotView(BaseModel):
    label: str
    confidence: float
    predictions: list[Prediction]


class Result(BaseModel):
    """One image's answer."""

    label: str | None = Field(..., description="The top prediction; null when abstained.")
    confidence: float = Field(
        ...,
        description="The probability that the label is right (calibrated, label-free by default): the top "
        "prediction's probability, which is its score or 1/C when the score is lower.",
    )
    entropy: float = Field(..., description="Entropy of the calibrated prediction over all labels, in nats.")
    abstained: bool = Field(False, description="Confidence was below the request's abstain_below.")
    none_of_these: float = Field(
        ..., description="The probability that no label fits the image: 1 - the highest label score."
    )
    predictions: list[Prediction] = Field(..., description="The top_k predictions, best first.")
    adaptation: Adaptation
    zero_shot: ZeroShotView | None = Field(None, description="With compare=true: the unadapted predictions.")
    session: SessionReport | None = Field(None, description="With session: what the session's state did.")
    adapter: AdapterReport | None = Field(None, description="With adapter: which adapter(s) answered.")


@dataclass(frozen=True)
class Classification:
    """A classify request's answer: the model, the method, one result per image, seconds per stage."""

    model: ModelRef
    method: str
    results: list[Result]
    timings: dict[str, float]  # decode, tokenize, queue, encode, classify or adapt, total
