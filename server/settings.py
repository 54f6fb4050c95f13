"""Server configuration: environment variables with the ``TTA_`` prefix, mirrored by CLI flags.

Every field below is settable as ``TTA_<FIELD>`` (for example ``TTA_MAX_BATCH_SIZE=16``) and as
``--<field-with-dashes>`` on ``python -m server``. CLI flags win over the environment, which wins over
a ``.env`` file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / "demo"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_QUERY_PASSWORD_RE = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``, fit for a log."""
    scheme, sep, rest = url.strip().partition("://")
    if sep:
        cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:]
        userinfo, at, hosts = authority.rpartition("@")  # a password may hold an unescaped '@'
        if at and ":" in userinfo:
            authority = f"{userinfo.partition(':')[0]}:***@{hosts}"
        url = f"{scheme}://{authority}{path}"
    return _QUERY_PASSWORD_RE.sub(r"\1***", url)


class Settings(BaseSettings):
    """Everything the server can be told; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="TTA_", env_file=".env", extra="ignore")

    # Model
    model: str | None = Field(
        None,
        description="open_clip model: a built-in name (ViT-B-16-quickgelu), local-dir:PATH or hf-hub:org/repo. "
        "Unset: the built-in demo model.",
    )
    pretrained: str | None = Field(
        None, description="Pretrained tag (openai, laion2b_s34b_b79k, ...) or a local .pt/.safetensors file."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Weights and activations dtype.")
    cache_dir: Path | None = Field(None, description="Where open_clip caches downloaded weights.")
    hf_token: SecretStr | None = Field(None, description="Token for private hf-hub repos (masked in logs).")

    # Network
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 in containers.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line.")
    cors_origins: str = Field(
        "", description="Comma-separated origins a browser may call the API from (* for any). Empty: CORS off."
    )

    # Authentication and rate limits
    api_keys: SecretStr | None = Field(
        None,
        description="API keys that may classify and read: comma-separated NAME:KEY pairs, or @FILE with one "
        "'NAME KEY' or 'NAME:KEY' a line. Unset (with TTA_ADMIN_API_KEYS unset too): no authentication.",
    )
    admin_api_keys: SecretStr | None = Field(
        None,
        description="API keys that may also change state (label sets, calibrations): the same format as TTA_API_KEYS.",
    )
    metrics_require_key: bool = Field(False, description="Whether /metrics asks for an API key (when keys are set).")
    rate_limit_rps: float = Field(
        0.0, ge=0, description="Images per second each API key (each client address without keys) may classify. 0: off."
    )
    rate_limit_burst: float | None = Field(
        None, gt=0, description="Images a key may classify at once beyond its rate. Unset: TTA_MAX_IMAGES_PER_REQUEST."
    )

    # Storage
    data_dir: Path = Field(Path("data"), description="Holds the SQLite store of label sets.")
    database_url: SecretStr | None = Field(
        None,
        description="postgresql://USER:PASSWORD@HOST:PORT/DB: keep label sets and calibrations in PostgreSQL, "
        "shared by many replicas (needs the postgres extra). Unset: SQLite in TTA_DATA_DIR. The password is "
        "never logged.",
    )

    # Request limits
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="Largest request body; larger gets 413.")
    max_images_per_request: int = Field(32, ge=1, description="Most images in one classify request.")
    max_labels: int = Field(1000, ge=1, description="Most labels in one request or label set.")
    max_label_chars: int = Field(200, ge=1, description="Longest label.")
    max_templates: int = Field(100, ge=1, description="Most prompt templates in one request.")
    max_template_chars: int = Field(300, ge=1, description="Longest template, and longest description of a label.")
    max_descriptions: int = Field(
        16, ge=1, description="Most descriptions of one label (a label set holds at most max_labels times this)."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height): the decompression-bomb guard."
    )
    max_aspect_ratio: float = Field(
        20.0,
        ge=1,
        description="Longest side over shortest side of an image: a 1 x 100,000 strip would be resized to "
        "gigabytes on its short side, so it is refused before decoding.",
    )
    max_top_k: int = Field(1000, ge=1, description="Largest top_k a request may ask for.")
    max_views: int = Field(128, ge=1, description="Most augmented views (image included) a method may use per image.")
    max_frames: int = Field(
        32, ge=1, description="Most frames in one video request: frames sent, or sampled from a video file."
    )
    max_steps: int = Field(10, ge=0, description="Most adaptation steps a request may ask for.")
    max_calibration_images: int = Field(
        2000, ge=20, description="Most labelled images in one calibration of a label set."
    )

    # Engine
    max_batch_size: int = Field(32, ge=1, description="Most images encoded in one zero-shot micro-batch.")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, description="How long the first request of a micro-batch waits for company."
    )
    max_queue_size: int = Field(256, ge=1, description="Jobs waiting for the device; beyond it 429.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline; beyond it 504.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and with 503 while draining.")
    first_request_timeout_s: float = Field(
        10.0, gt=0, description="How long a new connection may take to send its first request's headers; then closed."
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection stays open between requests."
    )
    drain_timeout_s: float | None = Field(
        None,
        gt=0,
        description="On SIGTERM, how long requests in flight may take to finish while new ones get 503; then the "
        "process exits. Unset: TTA_REQUEST_TIMEOUT_S + 5.",
    )
    text_cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="One byte budget for the text caches (class features, prompt inputs), keys included.",
    )
    text_budget_s: float = Field(
        10.0,
        gt=0,
        description="Most estimated seconds of class text (label sets not yet cached) the zero-shot lane takes on at "
        "once; beyond it, requests that need more are refused with 429 text_queue_full. An idle lane takes any.",
    )
    decode_threads: int = Field(
        2, ge=1, description="Threads that decode and preprocess images, and tokenize label sets not yet cached."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (unset: torch's default).")

    # The adaptation lane
    adapt_max_batch: int = Field(
        8, ge=1, description="Most images (of one or many requests) adapted together in one stacked computation."
    )
    adapt_budget_s: float | None = Field(
        None,
        gt=0,
        description="Most estimated seconds of adaptation work admitted and unfinished; beyond it, "
        "requests are served zero-shot (adaptation.skipped = overload). Unset: TTA_REQUEST_TIMEOUT_S.",
    )
    adapt_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="Most estimated bytes of activations one stacked adaptation batch may hold; an "
        "image that needs more alone is served zero-shot (adaptation.skipped = memory). Unset: half the memory "
        "free after loading (GPU) or available (CPU).",
    )
    confidence_gate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Skip adaptation of images whose calibrated zero-shot margin (top-1 minus "
        "top-2 probability) is at least this (adaptation.skipped = confident). Unset: never skip.",
    )

    # Monitoring
    accuracy_window: int = Field(
        500, ge=1, description="Images per label set behind tta_estimated_accuracy (mean calibrated confidence)."
    )

    # Online sessions (``session`` on classify requests)
    # tda: the better of the two on the validation streams of benchmarks/session_streams.py (README, Sessions).
    session_method: Literal["stats", "tda"] = Field(
        "tda", description="Online method of a session request that names no session_method."
    )
    session_ttl_s: float = Field(
        3600.0, gt=0, description="A session unused this long is forgotten (its state dropped)."
    )
    session_max_bytes: int = Field(
        4 * 2**20, ge=1, description="Bytes of state one session may hold over its label sets (oldest set dropped)."
    )
    sessions_max_bytes: int = Field(
        256 * 2**20,
        ge=1,
        description="Bytes of state all sessions may hold in memory (least recently used unloaded to the store).",
    )

    # Few-shot adapters
    adapter_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="Bytes of adapters kept loaded in the process (least recently used unloaded past it).",
    )
    job_workers: int = Field(
        1,
        ge=0,
        description="Training jobs run at once, each in a worker process of its own on the same device. 0: this "
        "process runs none (another replica sharing the database does) and leaves running ones alone at start.",
    )
    max_train_images: int = Field(
        2000, ge=1, description="Most images in one training job: support images and anchor images together."
    )
    max_train_steps: int = Field(10_000, ge=1, description="Most optimisation steps a training job may ask for.")

    # Defaults for requests
    default_method: str = Field("zero_shot", description="Method used when a request names none.")
    default_templates: str = Field("simple", description="Template set used when a request names none.")
    default_top_k: int = Field(5, ge=1, description="Predictions per image when a request names no top_k.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("model", "pretrained")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("api_keys", "admin_api_keys", "database_url")
    @classmethod
    def _blank_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @property
    def auth_enabled(self) -> bool:
        return self.api_keys is not None or self.admin_api_keys is not None

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @field_validator(
        "adapt_budget_s",
        "adapt_memory_bytes",
        "drain_timeout_s",
        "confidence_gate",
        "torch_threads",
        "rate_limit_burst",
        mode="before",
    )
    @classmethod
    def _blank_number_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def drain_grace_s(self) -> float:
        """How long a drain waits for the requests in flight."""
        return self.drain_timeout_s if self.drain_timeout_s is not None else self.request_timeout_s + 5

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets replaced by '***', for the start-up log."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url" and value is not None:
                value = redact_url(value.get_secret_value())  # where it points is useful; its password is not
            elif isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def _flag_type(annotation: Any) -> Any:
    """The argparse type for a field annotation (``int | None`` -> int)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        return str
    if annotation in (int, float):
        return annotation
    return str


def build_parser() -> argparse.ArgumentParser:
    """A CLI parser with one flag per settings field; unset flags leave the environment in charge."""
    called = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog="ttaserve" if called == "ttaserve" else "python -m server",
        description="TTAServe: a CLIP test-time adaptation inference server. "
        "Every flag has an environment twin: --max-batch-size <-> TTA_MAX_BATCH_SIZE.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "type": _flag_type(field.annotation)}
        if typing.get_origin(field.annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(field.annotation))
        parser.add_argument(flag, help=f"{field.description} [env: TTA_{name.upper()}]", **kwargs)
    parser.add_argument(
        "--preload-only",
        action="store_true",
        help="Load the model (downloading its weights into --cache-dir if needed) and exit: "
        "the step that bakes weights into a container image.",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Settings from the environment overridden by the flags ``argv`` sets, and the parsed flags."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**overrides), args


def settings_from_args(argv: list[str] | None = None) -> Settings:
    return parse_args(argv)[0]
