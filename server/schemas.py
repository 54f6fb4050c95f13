"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClassifyRequest(BaseModel):
    """JSON body of ``POST /v1/classify``; the multipart form carries the same fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": ["data:image/png;base64,iVBORw0KGgo..."], "labels": ["red star", "blue circle"],
                 "top_k": 2},
                {"images": ["iVBORw0KGgo..."], "label_set": "demo-shapes", "templates": "simple"},
            ]
        },
    )

    images: list[str] = Field(..., min_length=1, description="Base64 strings or data: URIs, one per image.")
    labels: list[str] | None = Field(None, description="Class names; or use label_set.")
    label_set: str | None = Field(None, description="Name of a registered label set, instead of labels.")
    templates: list[str] | str | None = Field(
        None, description="Prompt templates with {} for the label, or a named set: simple, openai_imagenet, ensemble7."
    )
    top_k: int | None = Field(None, ge=1, description="Predictions returned per image (default: server setting).")
    method: str | None = Field(None, description="Test-time method; GET /v1/methods lists them.")
    options: dict[str, Any] | None = Field(None, description="The method's options; see /v1/methods.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Seeds the augmented views: the same request and seed give the same result.")
    compare: bool = Field(False, description="Also return the zero-shot predictions beside the adapted ones.")
    abstain_below: float | None = Field(
        None, ge=0, le=1, description="Abstain (no label) when the calibrated confidence is below this.")
    confidence_gate: float | None = Field(
        None, ge=0, le=1, description="Do not adapt an image whose calibrated zero-shot margin (top-1 minus top-2 "
        "probability) is at least this; it is answered zero-shot with adaptation.skipped = 'confident'. "
        "Default: the server's TTA_CONFIDENCE_GATE.")


class Prediction(BaseModel):
    label: str
    probability: float = Field(..., description="Calibrated probability: softmax(logit / T), T fitted per method.")
    raw_probability: float = Field(..., description="Softmax of the logits as the model gives them.")
    logit: float = Field(..., description="Scaled cosine similarity: the model's logit scale times cos(image, class).")


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
        None, description="ZERO: share of kept views voting for the label (not a probability).")
    skipped: str | None = Field(
        None, description="Why the image was answered zero-shot instead: 'overload' (the adaptation lane was "
        "over its budget), 'confident' (the zero-shot margin passed the confidence gate) or 'memory' (adapting "
        "this image alone needs more than TTA_ADAPT_MEMORY_BYTES).")
    batch_images: int = Field(1, description="Images adapted together in one stacked computation, this one included.")
    memory_bytes: int | None = Field(
        None, description="Estimated bytes of activations adapting this image holds, what the lane weighs against "
        "TTA_ADAPT_MEMORY_BYTES (null when the request was not admitted to the lane).")


class ZeroShotView(BaseModel):
    label: str
    confidence: float
    predictions: list[Prediction]


class Result(BaseModel):
    label: str | None = Field(..., description="The top prediction; null when abstained.")
    confidence: float = Field(..., description="Calibrated probability of the top prediction.")
    entropy: float = Field(..., description="Entropy of the calibrated prediction over all labels, in nats.")
    abstained: bool = Field(False, description="Confidence was below the request's abstain_below.")
    predictions: list[Prediction] = Field(..., description="The top_k predictions, best first.")
    adaptation: Adaptation
    zero_shot: ZeroShotView | None = Field(None, description="With compare=true: the unadapted predictions.")


class ClassifyResponse(BaseModel):
    request_id: str
    model: dict[str, Any]
    method: str
    results: list[Result]
    timings: dict[str, float] = Field(
        ..., description="Seconds spent per stage: decode, queue, encode, classify, total.")


class LabelSetIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "animals", "labels": ["cat", "dog", "bird"], "templates": "ensemble7",
                          "descriptions": {"cat": ["a small furry pet with whiskers"]}}]
        },
    )

    name: str = Field(..., description="1-64 characters: letters, digits, '.', '_' and '-'; starts alphanumeric.")
    labels: list[str]
    templates: list[str] | str | None = Field(None, description="Templates to use by default with this set.")
    descriptions: dict[str, list[str]] | None = Field(
        None, description="Per-label descriptive phrases; TPS averages them into the label's prototype.")


class LabelSetOut(BaseModel):
    name: str
    labels: list[str]
    templates: list[str] | None
    descriptions: dict[str, list[str]] | None
    created_at: float
    source: str = Field(..., description="'user' (stored, survives restarts) or 'model' (ships with the model).")


class LabelSetList(BaseModel):
    label_sets: list[LabelSetOut]


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
