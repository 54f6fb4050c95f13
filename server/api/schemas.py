"""Request and response bodies of the HTTP API; the per-image results are the service's own types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.service.results import ModelRef, Result
from server.storage import LabelSet


class VideoIn(BaseModel):
    """One video, classified as one answer: its frames (or a video file), sampled and pooled."""

    model_config = ConfigDict(extra="forbid")

    frames: list[str] | None = Field(
        None, min_length=1, description="The frames in time order: base64 strings or data: URIs (or give file)."
    )
    file: str | None = Field(
        None, description="A video file (MP4, WebM, ...) as base64 or a data: URI; needs PyAV on the server."
    )
    num_frames: int | None = Field(
        None, ge=1, description="Frames to sample (default 8, at most TTA_MAX_FRAMES); sampling 'all' ignores it."
    )
    sampling: Literal["segment", "uniform", "all"] = Field(
        "segment",
        description="segment: the centre frame of num_frames equal segments; uniform: evenly spaced from the first "
        "frame to the last; all: every frame.",
    )
    pooling: Literal["mean", "max"] = Field(
        "mean",
        description="mean: of the frames' embeddings; max: over the frames' logits, class by class (zero_shot only).",
    )

    @field_validator("num_frames", mode="before")
    @classmethod
    def _a_number_not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class AdapterRoute(BaseModel):
    """ConDU's routing: each image uses the adapters whose class prototypes are closest to it."""

    model_config = ConfigDict(extra="forbid")

    route: Literal["auto"] = Field(..., description="'auto': pick adapters per image by prototype similarity.")
    top_k: int = Field(1, ge=0, le=16, description="At most this many adapters per image (0: the frozen model only).")
    min_sim: float = Field(
        0.0, ge=-1, le=1, description="An adapter less similar than this (cosine to its nearest prototype) is not used."
    )
    group: str | None = Field(None, description="Route among this adapter group's only (default: all your adapters).")


class ClassifyRequest(BaseModel):
    """JSON body of ``POST /v1/classify``; the multipart form carries the same fields."""

    # Its examples are the request body's, in server/api/openapi.py: real images, so they work as they are.
    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(
        None, min_length=1, description="Base64 strings or data: URIs, one per image; or send video."
    )
    video: VideoIn | None = Field(None, description="One video instead of images: one result, its frames pooled.")
    labels: list[str] | None = Field(None, description="Class names; or use label_set.")
    label_set: str | None = Field(None, description="Name of a registered label set, instead of labels.")
    templates: list[str] | str | None = Field(
        None, description="Prompt templates with {} for the label, or a named set: simple, openai_imagenet, ensemble7."
    )
    top_k: int | None = Field(None, ge=1, description="Predictions returned per image (default: server setting).")
    method: str | None = Field(None, description="Test-time method; GET /v1/methods lists them.")
    options: dict[str, Any] | None = Field(None, description="The method's options; see /v1/methods.")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Seeds the augmented views: the same request and seed give the same result.",
    )
    compare: bool = Field(False, description="Also return the zero-shot predictions beside the adapted ones.")
    abstain_below: float | None = Field(
        None, ge=0, le=1, description="Abstain (no label) when the calibrated confidence is below this."
    )
    confidence_gate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Do not adapt an image whose calibrated zero-shot margin (top-1 minus top-2 "
        "probability) is at least this; it is answered zero-shot with adaptation.skipped = 'confident'. "
        "Default: the server's TTA_CONFIDENCE_GATE.",
    )

    session: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Keep online state across your requests with this id (zero_shot only): each label set's answers "
        "adapt to the stream. Nothing is kept without it; GET/DELETE /v1/sessions/{id} show and reset it.",
    )
    session_method: str | None = Field(
        None,
        description="The session's online method, 'tda' or 'stats' (default: TTA_SESSION_METHOD); see /v1/methods.",
    )
    adapter: str | AdapterRoute | None = Field(
        None,
        description="Serve through a few-shot adapter: 'NAME' (its newest version) or 'NAME@vN'; or route each image "
        'to its closest adapters: {"route": "auto", "top_k": 1, "min_sim": 0.5, "group": null}. See Adapters.',
    )
    adapter_alpha: Annotated[float, Field(ge=0, le=1)] | Literal["class_distance"] | None = Field(
        None,
        description="How far from the frozen model toward the adapter, in feature space: 0 gives exactly zero-shot, "
        '1 (default) the adapter; or "class_distance": APEX\'s rule, each class weighted by its distance to the '
        "adapter's training labels (zero_shot, one named adapter).",
    )

    @field_validator("top_k", "seed", "abstain_below", "confidence_gate", "adapter_alpha", mode="before")
    @classmethod
    def _a_number_not_a_boolean(cls, value: object) -> object:
        # JSON's true is 1 to a lax validator: `confidence_gate: false` would skip every adaptation.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class ClassifyResponse(BaseModel):
    request_id: str
    model: ModelRef
    method: str
    results: list[Result]
    timings: dict[str, float] = Field(
        ..., description="Seconds spent per stage: decode, tokenize, queue, encode, classify (or adapt), total."
    )


class LabelSetIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "animals",
                    "labels": ["cat", "dog", "bird"],
                    "templates": "ensemble7",
                    "descriptions": {"cat": ["a small furry pet with whiskers"]},
                }
            ]
        },
    )

    name: str = Field(..., description="1-64 characters: letters, digits, '.', '_' and '-'; starts alphanumeric.")
    labels: list[str]
    templates: list[str] | str | None = Field(None, description="Templates to use by default with this set.")
    descriptions: dict[str, list[str]] | None = Field(
        None,
        description="Per-label descriptive phrases. Each method can mix them into its class embeddings "
        "(options.descriptions.mix; TPS does by default) and TPT and C-TPT can keep their tuned classes near "
        "them (options.descriptions.consistency).",
    )


class LabelSetOut(BaseModel):
    name: str
    labels: list[str]
    templates: list[str] | None
    descriptions: dict[str, list[str]] | None
    created_at: float
    source: str = Field(..., description="'user' (stored, survives restarts) or 'model' (ships with the model).")

    @classmethod
    def of(cls, label_set: LabelSet) -> LabelSetOut:
        return cls(
            name=label_set.name,
            labels=list(label_set.labels),
            templates=list(label_set.templates) if label_set.templates is not None else None,
            descriptions=label_set.descriptions,
            created_at=label_set.created_at,
            source=label_set.source,
        )


class LabelSetList(BaseModel):
    label_sets: list[LabelSetOut]


class CalibrationIn(BaseModel):
    """JSON body of ``POST /v1/label-sets/{name}/calibration``; the multipart form carries the same fields."""

    # Its example is the request body's, in server/api/openapi.py: real images, so it works as it is.
    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(..., min_length=1, description="Base64 strings or data: URIs, one per image.")
    labels: list[str] = Field(..., description="The true label of each image, in order; each in the label set.")
    methods: list[str] | None = Field(
        None, description="Methods to calibrate (default zero_shot, which also serves methods without their own)."
    )


class CalibrationFit(BaseModel):
    state: str = Field(..., description="running, fitted or failed.")
    methods: list[str]
    images: int
    done: int = Field(..., description="Images classified so far, over all methods.")
    total: int
    elapsed_s: float
    remaining_s: float | None = Field(None, description="Estimated from the pace so far (null once ended).")
    error: str | None = None


class HeldOut(BaseModel):
    images: int = Field(..., description="Images of the held-out half.")
    accuracy: float = Field(..., description="Accuracy of the method's answers on them, percent.")
    ece: dict[str, float] = Field(
        ...,
        description="ECE (15 bins, percent) on the held-out half: raw softmax, the calibration in use before, and "
        "a calibration fitted on the other half.",
    )


class FittedCalibration(BaseModel):
    method: str
    applies: bool = Field(..., description="Fitted for this label set and this model (false: either has changed).")
    fitted_at: float
    images: int = Field(..., description="Labelled images the stored calibration was fitted on.")
    held_out: HeldOut


class CalibrationOut(BaseModel):
    label_set: str
    fit: CalibrationFit | None = Field(None, description="The last fit started, while it runs and after.")
    calibrations: list[FittedCalibration] = Field(..., description="What is fitted, per method.")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="What went wrong, one code per problem (see the README's error table).")
    message: str
    request_id: str | None = Field(..., description="The request's X-Request-ID.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str = Field(..., description="'ok' (/healthz) or 'ready' (/readyz).")


class ModelCalibration(BaseModel):
    kind: str = Field(..., description="'label-free': the confidence model used without a label set's own.")
    source: str
    images: int = Field(..., description="Images the confidence model was fitted on.")
    data: str = Field(..., description="What they were.")


class ModelInfo(BaseModel):
    """The loaded model. Until it is loaded only ``id``, ``pretrained``, ``demo`` and ``ready`` are given."""

    id: str
    pretrained: str | None
    demo: bool
    ready: bool = Field(..., description="Loaded and warmed up: /readyz answers 200.")
    open_clip_name: str | None = None
    description: str | None = None
    device: str | None = Field(None, description="cpu, cuda:0, ...")
    precision: str | None = Field(None, description="fp32, fp16 or bf16.")
    image_size: list[int] | None = Field(None, description="Height and width the model reads, pixels.")
    embed_dim: int | None = None
    context_length: int | None = Field(None, description="Tokens per prompt.")
    logit_scale: float | None = None
    fingerprint: str | None = Field(
        None, description="A digest of the weights: adapters and calibrations hold for this fingerprint only."
    )
    label_sets: list[str] | None = Field(None, description="The label sets that ship with the model.")
    calibration: ModelCalibration | None = None


class ModelList(BaseModel):
    models: list[ModelInfo] = Field(..., description="One: a process serves one model.")


class Limits(BaseModel):
    """The server limits that bound a request (TTA_* settings)."""

    max_images_per_request: int
    max_labels: int
    max_templates: int
    max_top_k: int
    max_image_pixels: int
    max_body_bytes: int
    request_timeout_s: float
    max_views: int
    max_steps: int
    max_frames: int


class MethodInfo(BaseModel):
    name: str
    summary: str
    options_schema: dict[str, Any] = Field(..., description="JSON Schema of the method's options.")
    limits: Limits


class SessionMethodInfo(BaseModel):
    name: str
    summary: str


class SessionMethods(BaseModel):
    default: str = Field(
        ..., description="The online method of a session request that names none (TTA_SESSION_METHOD)."
    )
    combines_with: list[str] = Field(..., description="The classify methods a session adapts; others answer 422.")
    methods: list[SessionMethodInfo]


class MethodList(BaseModel):
    default: str = Field(..., description="The method of a request that names none (TTA_DEFAULT_METHOD).")
    template_sets: dict[str, list[str]] = Field(..., description="The named template sets, by name.")
    methods: list[MethodInfo]
    sessions: SessionMethods | None = Field(None, description="The online methods of requests with a session.")


class SessionState(BaseModel):
    label_set: str | None = Field(..., description="The label set's name; null for labels sent inline.")
    labels: int
    session_method: str
    requests: int
    images: int
    entries: int = Field(..., description="tda: cached features; stats: images folded into its statistics.")
    entries_per_class: dict[str, float] = Field(..., description="Per label (those with any): what the state holds.")
    bytes: int
    max_bytes: int = Field(..., description="The most bytes this label set's state can reach.")
    disagreement: float = Field(..., description="Share of its answers that differ from zero-shot's.")
    last_used: float


class SessionOut(BaseModel):
    id: str
    created_at: float
    last_used: float
    expires_at: float = Field(..., description="When it is forgotten if unused (last use + TTA_SESSION_TTL_S).")
    requests: int
    waiting: int = Field(..., description="Its requests waiting for the one in progress (they run one at a time).")
    bytes: int = Field(..., description="Bytes of state held over all its label sets.")
    max_bytes: int = Field(..., description="TTA_SESSION_MAX_BYTES.")
    states: list[SessionState] = Field(..., description="One per label set, most recently used first.")


class AdapterOut(BaseModel):
    """One version of a stored adapter."""

    name: str
    version: int
    ref: str = Field(..., description="NAME@vN: how a classify request names this version.")
    type: str = Field(..., description="prompt, apex, lora, or merged.")
    parts: list[str] = Field(..., description="What it changes: prompt (text context), text_adapter, lora (vision).")
    base_model: str = Field(..., description="Fingerprint of the model it was trained on (this server's, or refused).")
    labels: list[str] = Field(..., description="The labels it was trained on.")
    group: str | None = Field(None, description="Its adapter group (merging), if any.")
    source: str = Field(..., description="upload, job:ID or merge:GROUP.")
    sha256: str
    bytes: int = Field(..., description="Size of its artifact.")
    resident: bool = Field(..., description="Loaded in this process now (TTA_ADAPTER_CACHE_BYTES).")
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: float


class AdapterList(BaseModel):
    adapters: list[AdapterOut] = Field(..., description="Every version of your adapters, by name then version.")
    resident_bytes: int = Field(..., description="Bytes of adapters loaded in this process now, any owner's.")
    cache_bytes: int = Field(..., description="TTA_ADAPTER_CACHE_BYTES.")


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["task_arithmetic", "ties", "emr"] = Field(
        "emr", description="emr (ConDU: one unified adapter plus a reconstruction per member), ties or task_arithmetic."
    )
    scale: float | None = Field(
        None, gt=0, le=10, description="task_arithmetic (default 1/sqrt(n) within [0.3, 1]) and ties (default 1)."
    )
    density: float | None = Field(
        None, gt=0, le=1, description="ties: the fraction of each member's entries kept (0.2)."
    )
    name: str | None = Field(None, description="The unified adapter's name (default GROUP.merged).")


class MergedMember(BaseModel):
    adapter: str = Field(..., description="The member, NAME@vN (its newest version in the group).")
    reconstruction: str | None = Field(
        ..., description="emr: the member rebuilt from the unified adapter, stored as GROUP.MEMBER; else null."
    )
    fidelity: float = Field(..., description="Cosine of what now serves the member with its own weight updates.")
    mask_density: float = Field(..., description="emr: the share of update entries its mask keeps; else 1.")
    rescaler: float = Field(..., description="emr: its rescaler; else 1.")


class MergeOut(BaseModel):
    method: str
    unified: AdapterOut
    members: list[MergedMember]
