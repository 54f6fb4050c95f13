"""Typed answers of the TTAServe API, one class per schema of the server's OpenAPI.

A test of the server (``tests/integration/test_client_models.py``) compares these fields with ``/openapi.json``,
so they cannot drift. Fields the server adds later are kept (``extra="allow"``): an older client still
reads a newer server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ModelRef(_Model):
    id: str
    pretrained: str | None
    demo: bool


class Prediction(_Model):
    label: str
    probability: float  # calibrated; the answer's is the probability that it is right
    raw_probability: float  # the model's own softmax
    score: float  # this label's own probability of being right; scores need not sum to 1
    logit: float


class Ensemble(_Model):
    mode: str  # "fixed" or "adaptive"
    difficulty: float | None = None  # the confident views' normalised zero-shot entropy, in [0, 1]
    weight: float  # on the adapted logits
    divergence: float | None = None  # KL(adapted || zero-shot) of the two answers, nats


class Adaptation(_Model):
    method: str
    steps: int
    views: int
    selected_views: int
    entropy_before: float
    entropy_after: float
    zero_shot_label: str
    changed: bool
    seconds: float
    seed: int | None = None
    agreement: float | None = None
    skipped: str | None = None  # "overload", "confident" or "memory": answered zero-shot instead
    batch_images: int = 1
    memory_bytes: int | None = None
    drift: float | None = None  # gradient methods: mean 1 - cos between adapted and frozen features
    ensemble: Ensemble | None = None  # with options.ensemble other than off


class ZeroShotView(_Model):
    label: str
    confidence: float
    predictions: list[Prediction]


class SessionReport(_Model):
    """What the request's session did for one image."""

    id: str
    session_method: str  # tda or stats
    entries: int
    weight: float
    requests: int
    disagreement: float  # share of the session's answers (this label set) that differ from zero-shot's
    reset: str | None = None  # labels_changed or method_changed: the state started afresh


class RoutedAdapter(_Model):
    adapter: str  # NAME@vN
    similarity: float  # cosine of the image's frozen features to the adapter's nearest prototype


class AdapterReport(_Model):
    adapter: str | None  # the named adapter, NAME@vN; None when routed
    alpha: float | str  # adapter_alpha, or "class_distance"
    routed: list[RoutedAdapter] | None = None  # when routed: the adapters used (empty: the frozen model alone)
    best_similarity: float | None = None


class Result(_Model):
    label: str | None  # None when abstained
    confidence: float
    entropy: float
    abstained: bool = False
    none_of_these: float
    predictions: list[Prediction]
    adaptation: Adaptation
    zero_shot: ZeroShotView | None = None
    session: SessionReport | None = None
    adapter: AdapterReport | None = None


class Classification(_Model):
    """The answer to one classify request: one result per image, in order."""

    request_id: str
    model: ModelRef
    method: str
    results: list[Result]
    timings: dict[str, float]


class LabelSet(_Model):
    name: str
    labels: list[str]
    templates: list[str] | None
    descriptions: dict[str, list[str]] | None
    created_at: float
    source: str  # "user" (stored) or "model" (ships with the model)


class CalibrationFit(_Model):
    state: str  # running, fitted or failed
    methods: list[str]
    images: int
    done: int
    total: int
    elapsed_s: float
    remaining_s: float | None = None
    error: str | None = None


class HeldOut(_Model):
    images: int
    accuracy: float
    ece: dict[str, float]  # raw, before, after


class FittedCalibration(_Model):
    method: str
    applies: bool
    fitted_at: float
    images: int
    held_out: HeldOut


class Calibration(_Model):
    """A label set's calibration: the fit in progress (or the last), and what is fitted per method."""

    label_set: str
    fit: CalibrationFit | None = None
    calibrations: list[FittedCalibration] = Field(default_factory=list)


class Method(_Model):
    name: str
    summary: str
    options_schema: dict[str, Any]
    limits: dict[str, Any]


class SessionMethod(_Model):
    name: str
    summary: str


class SessionMethods(_Model):
    default: str
    combines_with: list[str]  # the classify methods a session adapts
    methods: list[SessionMethod]


class Methods(_Model):
    default: str
    template_sets: dict[str, list[str]]
    methods: list[Method]
    sessions: SessionMethods | None = None


class SessionState(_Model):
    """One label set's state in a session."""

    label_set: str | None  # None for labels sent inline
    labels: int
    session_method: str
    requests: int
    images: int
    entries: int
    entries_per_class: dict[str, float]
    bytes: int
    max_bytes: int
    disagreement: float
    last_used: float


class Session(_Model):
    """A session: its label sets' states, bytes against TTA_SESSION_MAX_BYTES, and when it expires unused."""

    id: str
    created_at: float
    last_used: float
    expires_at: float
    requests: int
    waiting: int  # its requests waiting for the one in progress
    bytes: int
    max_bytes: int
    states: list[SessionState]


class ModelInfo(_Model):
    """The loaded model; the fields past ``ready`` are there once it is loaded."""

    id: str
    pretrained: str | None
    demo: bool
    ready: bool
    open_clip_name: str | None = None
    description: str | None = None
    device: str | None = None
    precision: str | None = None
    image_size: list[int] | None = None
    embed_dim: int | None = None
    context_length: int | None = None
    logit_scale: float | None = None
    fingerprint: str | None = None  # adapters and calibrations hold for this model only
    label_sets: list[str] | None = None
    calibration: dict[str, Any] | None = None


class Adapter(_Model):
    """One version of a stored adapter."""

    name: str
    version: int
    ref: str  # NAME@vN
    type: str
    parts: list[str]
    base_model: str  # the fingerprint of the model it was trained on
    labels: list[str]
    group: str | None = None
    source: str
    sha256: str
    bytes: int
    resident: bool  # loaded in the server process now
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: float


class AdapterList(_Model):
    adapters: list[Adapter]
    resident_bytes: int
    cache_bytes: int


class MergedMember(_Model):
    adapter: str
    reconstruction: str | None  # emr: the member rebuilt from the unified adapter, stored as GROUP.MEMBER
    fidelity: float
    mask_density: float
    rescaler: float


class Merge(_Model):
    method: str
    unified: Adapter
    members: list[MergedMember]


class Job(_Model):
    """A training job: what it was asked (``spec``), where it is, what it made (``result``) or why it failed."""

    id: str
    kind: str
    state: str  # queued, running, succeeded, failed, cancelled
    stage: str | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    pid: int | None = None
    result: dict[str, Any] | None = None  # {"adapter": "NAME@vN", "metrics": {...}}
    error: str | None = None
    spec: dict[str, Any]
    created_at: float
    updated_at: float

    @property
    def ended(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")
