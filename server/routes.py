"""HTTP routes. Handlers parse and validate, hand work to the engine, and shape responses."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import OptionsError, get_method, method_names
from adapters.losses import entropy
from server.backbone import Backbone
from server.engine import Engine
from server.errors import BadRequest, ClientClosed, InvalidInput, NotReady, TTAError, UnsupportedMediaType
from server.images import decode_base64, decode_image, to_uint8_tensor
from server.inputs import (
    ClassifyInput,
    check_image_count,
    parse_form,
    parse_json_body,
    resolve_templates,
    validate_descriptions,
    validate_label_set_name,
    validate_labels,
)
from server.jobs import JobOutput
from server.metrics import Metrics
from server.schemas import (
    Adaptation,
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    LabelSetIn,
    LabelSetList,
    LabelSetOut,
    Prediction,
    Result,
    ZeroShotView,
)
from server.settings import Settings
from server.store import LabelSet, Store
from server.templates import TEMPLATE_SETS

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart body.",
        404: "Unknown label set.",
        413: "Body larger than TTA_MAX_BODY_BYTES.",
        415: "Neither application/json nor multipart/form-data.",
        422: "Invalid input: each problem has its own error code.",
        429: "Queue full; retry after the Retry-After header's seconds.",
        503: "The model is still loading.",
        504: "The request did not finish within its deadline (TTA_REQUEST_TIMEOUT_S or X-Request-Timeout).",
    }.items()
}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "One or more image files (repeat the field)."},
        "labels": {"type": "array", "items": {"type": "string"},
                   "description": "Repeat the field, or send one JSON list."},
        "label_set": {"type": "string"},
        "templates": {"type": "string", "description": "A named set, or a JSON list of templates."},
        "top_k": {"type": "integer", "minimum": 1},
        "method": {"type": "string"},
        "options": {"type": "string", "description": "The method's options as a JSON object."},
    },
}

_CLASSIFY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ClassifyRequest"},
                "examples": {
                    "labels": {"summary": "Labels inline",
                               "value": {"images": ["<base64 PNG or data:image/png;base64,...>"],
                                         "labels": ["red star", "blue circle", "green square"], "top_k": 2}},
                    "label_set": {"summary": "A registered label set",
                                  "value": {"images": ["<base64>"], "label_set": "demo-shapes",
                                            "templates": "simple"}},
                },
            },
            "multipart/form-data": {
                "schema": _MULTIPART_SCHEMA,
                "encoding": {"image": {"contentType": "image/*"}},
            },
        },
    }
}


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


# -- classify ---------------------------------------------------------------------------------------
async def _read_input(request: Request, settings: Settings) -> ClassifyInput:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1,
                                      max_fields=settings.max_labels + settings.max_templates + 16,
                                      max_part_size=settings.max_body_bytes)
        except StarletteHTTPException as exc:
            raise BadRequest(f"malformed multipart body: {exc.detail}", code="invalid_form") from exc
        try:
            return await parse_form(form)
        finally:
            await form.close()
    if ctype in ("application/json", ""):
        return parse_json_body(await request.body())
    raise UnsupportedMediaType(
        f"content type {ctype!r} is not accepted; send application/json or multipart/form-data",
    )


ORIGINAL_SIDE_FACTOR = 4  # views are cropped from the image with its short side capped at 4x the model's input


def _decode_all(images: list[bytes | str], backbone: Backbone, settings: Settings,
                keep_originals: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Decode, check and preprocess every image. Runs on the decode thread pool.

    Returns the base views [N, 3, H, W] and, for methods that make augmented views, each decoded image
    as a uint8 tensor [3, H0, W0]. A crop keeps at least 8% of the area, so capping the short side at
    four times the model's input loses no detail a view could show, and bounds the cost of a 40 MP upload.
    """
    tensors, originals = [], []
    cap = ORIGINAL_SIDE_FACTOR * max(backbone.image_size)
    for i, item in enumerate(images):
        data = decode_base64(item, i) if isinstance(item, str) else item
        image = decode_image(data, i, settings.max_image_pixels)
        tensors.append(backbone.preprocess(image))
        if keep_originals:
            if min(image.size) > cap:
                scale = cap / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            originals.append(to_uint8_tensor(image))  # [3, H0, W0]
    return torch.stack(tensors), (originals if keep_originals else None)


def _resolve_classes(req: ClassifyRequest, request: Request, settings: Settings
                     ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...] | None]:
    """Labels, templates and, for a label set with descriptions, each label's descriptions."""
    if req.labels is not None and req.label_set is not None:
        raise InvalidInput("give labels or label_set, not both", code="labels_and_label_set")
    if req.label_set is not None:
        label_set = _store(request).get_label_set(req.label_set)
        described = label_set.descriptions
        descriptions = tuple(tuple(described.get(label, ())) for label in label_set.labels) if described else None
        return (label_set.labels, resolve_templates(req.templates, settings, fallback=label_set.templates),
                descriptions)
    return validate_labels(req.labels, settings), resolve_templates(req.templates, settings), None


def _predictions(logits: torch.Tensor, temperature: float, labels: tuple[str, ...],
                 order: torch.Tensor | None, top_k: int) -> tuple[list[Prediction], torch.Tensor]:
    """[C] logits -> the top_k predictions (ranked by ``order`` or by probability) and calibrated probabilities."""
    raw = logits.softmax(-1)  # [C]
    calibrated = (logits / temperature).softmax(-1)  # [C]
    ranked = order if order is not None else torch.argsort(calibrated, descending=True, stable=True)
    preds = [Prediction(label=labels[j], probability=float(calibrated[j]), raw_probability=float(raw[j]),
                        logit=float(logits[j])) for j in ranked[:top_k].tolist()]
    return preds, calibrated


def _results(output: JobOutput, labels: tuple[str, ...], top_k: int, method: str, req: ClassifyRequest,
             calibration: dict[str, float], seed: int | None, metrics: Metrics) -> list[Result]:
    results = []
    for i in range(output.logits.shape[0]):
        logits = output.logits[i]  # [C]
        report = output.reports[i] if output.reports else None
        zs_logits = report.zero_shot_logits if report else logits
        skipped = output.skipped or (report.skipped if report else None)
        # An image answered zero-shot is calibrated as zero-shot, whatever method was asked for.
        temperature = calibration.get("zero_shot" if skipped else method, 1.0)
        preds, _ = _predictions(logits, temperature, labels, report.order if report else None, top_k)
        zs_preds, _ = _predictions(zs_logits, calibration.get("zero_shot", 1.0), labels, None, top_k)
        confidence = preds[0].probability
        abstained = req.abstain_below is not None and confidence < req.abstain_below
        entropy_before, entropy_after = float(entropy(zs_logits)), float(entropy(logits))
        adaptation = Adaptation(
            method=method,
            steps=report.steps if report else 0,
            views=report.views if report else 1,
            selected_views=report.selected_views if report else 1,
            entropy_before=entropy_before,
            entropy_after=entropy_after,
            zero_shot_label=zs_preds[0].label,
            changed=zs_preds[0].label != preds[0].label,
            seconds=report.seconds if report else output.timings.get("classify", 0.0),
            seed=seed if report else None,
            agreement=report.extra.get("agreement") if report else None,
            skipped=skipped,
            batch_images=report.batch_images if report else 1,
            memory_bytes=report.memory_bytes if report else None,
        )
        metrics.confidence.labels(method=method).observe(confidence)
        if report and not skipped:
            metrics.adapt_duration.labels(method=method).observe(report.seconds)
            metrics.entropy_reduction.labels(method=method).observe(entropy_before - entropy_after)
            if adaptation.changed:
                metrics.prediction_changed.labels(method=method).inc()
        results.append(Result(
            label=None if abstained else preds[0].label,
            confidence=confidence,
            entropy=float(entropy(logits / temperature)),
            abstained=abstained,
            predictions=preds,
            adaptation=adaptation,
            zero_shot=ZeroShotView(label=zs_preds[0].label, confidence=zs_preds[0].probability, predictions=zs_preds)
            if req.compare else None,
        ))
    return results


@router.post("/v1/classify", response_model=ClassifyResponse, tags=["classify"], responses=_ERRORS,
             openapi_extra=_CLASSIFY_OPENAPI, summary="Classify images zero-shot or with test-time adaptation")
async def classify(request: Request) -> ClassifyResponse:
    """Classify one or more images against labels (or a label set).

    Send JSON with base64 images, or multipart/form-data with repeated ``image`` file fields.
    """
    settings, engine, metrics = _settings(request), _engine(request), _metrics(request)
    started = time.monotonic()
    method_label, outcome = "invalid", "error"
    metrics.inflight.inc()
    try:
        parsed = await _read_input(request, settings)
        req = parsed.request
        method_name = req.method or settings.default_method
        if method_name not in method_names():
            raise InvalidInput(f"unknown method {method_name!r}; known methods: {', '.join(method_names())}",
                               code="unknown_method")
        method_label = method_name
        try:
            options = get_method(method_name).parse_options(req.options)
        except OptionsError as exc:
            raise InvalidInput(str(exc), code="invalid_options") from exc
        check_image_count(len(parsed.images), settings)
        labels, templates, descriptions = _resolve_classes(req, request, settings)
        if req.top_k is not None and req.top_k > settings.max_top_k:
            raise InvalidInput(f"top_k={req.top_k}; the limit is {settings.max_top_k}", code="invalid_top_k")
        top_k = min(req.top_k or settings.default_top_k, len(labels))

        adaptive = method_name != "zero_shot"
        if adaptive:
            _check_method_limits(options, settings)
        timeout_s = _timeout(request, settings)
        # Before decoding: a request that will be refused costs no decode.
        engine.check_capacity((method_name, options, len(parsed.images), len(labels)) if adaptive else None,
                              timeout_s)
        t0 = time.monotonic()
        backbone = engine.backbone
        assert backbone is not None
        images, originals = await asyncio.get_running_loop().run_in_executor(
            request.app.state.decode_pool, _decode_all, parsed.images, backbone, settings, adaptive)
        decode_s = time.monotonic() - t0
        remaining = timeout_s - (time.monotonic() - started)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        calibration = request.app.state.calibration
        gate = req.confidence_gate if req.confidence_gate is not None else settings.confidence_gate
        output = await _until_disconnect(request, engine.classify(
            images, labels, templates, method_name, options, max(remaining, 0.001), originals=originals, seed=seed,
            gate=gate if adaptive else None, gate_temperature=calibration.get("zero_shot", 1.0),
            descriptions=descriptions))
        timings = {"decode": decode_s, **output.timings}
        for stage, seconds in timings.items():
            metrics.stage_duration.labels(stage=stage).observe(seconds)
        timings["total"] = time.monotonic() - started
        metrics.images.labels(method=method_name).inc(len(parsed.images))
        outcome = "success"
        return ClassifyResponse(
            request_id=request.state.request_id,
            model={"id": backbone.spec.display, "pretrained": backbone.spec.pretrained, "demo": backbone.spec.is_demo},
            method=method_name,
            results=_results(output, labels, top_k, method_name, req, calibration, seed if adaptive else None,
                             metrics),
            timings=timings,
        )
    except TTAError as exc:
        outcome = {429: "rejected", 503: "rejected", 504: "timeout", 499: "cancelled"}.get(
            exc.status, "client_error" if exc.status < 500 else "error")
        raise
    finally:
        metrics.inflight.dec()
        metrics.requests.labels(method=method_label, outcome=outcome).inc()
        metrics.request_duration.labels(method=method_label).observe(time.monotonic() - started)


TIMEOUT_HEADER = "X-Request-Timeout"
DISCONNECT_POLL_S = 0.1


def _timeout(request: Request, settings: Settings) -> float:
    """The request's deadline in seconds: ``X-Request-Timeout`` when it is shorter than the server's."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return settings.request_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}",
                         code="invalid_timeout")
    return min(value, settings.request_timeout_s)


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work`` (the engine's job); if the client disconnects first, cancel it and raise ClientClosed.

    Cancelling the await marks the job cancelled, so the engine drops it before it runs or stops it
    between adaptation steps.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TTAError):
                    await task
                raise ClientClosed("the client closed the connection before the answer was ready")
    finally:
        if not task.done():
            task.cancel()


def _check_method_limits(options: Any, settings: Settings) -> None:
    views = getattr(options, "views", 1)
    if views > settings.max_views:
        raise InvalidInput(f"options.views={views}; the limit is {settings.max_views} (TTA_MAX_VIEWS)",
                           code="invalid_options")
    steps = getattr(options, "steps", 0)
    if steps > settings.max_steps:
        raise InvalidInput(f"options.steps={steps}; the limit is {settings.max_steps} (TTA_MAX_STEPS)",
                           code="invalid_options")


# -- label sets -------------------------------------------------------------------------------------
@router.post("/v1/label-sets", status_code=201, response_model=LabelSetOut, tags=["label sets"],
             responses={k: _ERRORS[k] for k in (400, 422)} | {409: {"model": ErrorBody, "description": "Name taken."}})
def create_label_set(body: LabelSetIn, request: Request) -> dict[str, Any]:
    """Register a label set; it is stored durably and survives restarts."""
    settings = _settings(request)
    name = validate_label_set_name(body.name)
    labels = validate_labels(body.labels, settings)
    templates = resolve_templates(body.templates, settings) if body.templates is not None else None
    descriptions = validate_descriptions(body.descriptions, labels)
    return _store(request).create_label_set(LabelSet(name, labels, templates, descriptions)).to_dict()


@router.get("/v1/label-sets", response_model=LabelSetList, tags=["label sets"])
def list_label_sets(request: Request) -> dict[str, Any]:
    return {"label_sets": [s.to_dict() for s in _store(request).list_label_sets()]}


@router.get("/v1/label-sets/{name}", response_model=LabelSetOut, tags=["label sets"],
            responses={404: _ERRORS[404]})
def get_label_set(name: str, request: Request) -> dict[str, Any]:
    return _store(request).get_label_set(name).to_dict()


@router.delete("/v1/label-sets/{name}", status_code=204, tags=["label sets"],
               responses={404: _ERRORS[404], 409: {"model": ErrorBody, "description": "Built into the model."}})
def delete_label_set(name: str, request: Request) -> Response:
    _store(request).delete_label_set(name)
    return Response(status_code=204)


# -- discovery --------------------------------------------------------------------------------------
@router.get("/v1/models", tags=["discovery"])
def list_models(request: Request) -> dict[str, Any]:
    """The loaded model (one per process), with its device, precision and shape."""
    engine = _engine(request)
    if engine.backbone is None:
        spec = request.app.state.spec
        return {"models": [{"id": spec.display, "pretrained": spec.pretrained, "demo": spec.is_demo, "ready": False}]}
    info = engine.backbone.info()
    info["ready"] = engine.ready
    info["label_sets"] = sorted(_store(request).builtin)
    info["calibration"] = {m: {"temperature": request.app.state.calibration.get(m, 1.0),
                               "fitted": m in request.app.state.calibration} for m in method_names()}
    return {"models": [info]}


@router.get("/v1/methods", tags=["discovery"])
def list_methods(request: Request) -> dict[str, Any]:
    """Every test-time method with its options schema and the server limits that bound a request."""
    s = _settings(request)
    limits = {
        "max_images_per_request": s.max_images_per_request,
        "max_labels": s.max_labels,
        "max_templates": s.max_templates,
        "max_top_k": s.max_top_k,
        "max_image_pixels": s.max_image_pixels,
        "max_body_bytes": s.max_body_bytes,
        "request_timeout_s": s.request_timeout_s,
        "max_views": s.max_views,
        "max_steps": s.max_steps,
    }
    methods = [{"name": name, "summary": get_method(name).summary, "options_schema": get_method(name).options_schema(),
                "limits": limits} for name in method_names()]
    return {"default": s.default_method, "template_sets": {k: list(v) for k, v in TEMPLATE_SETS.items()},
            "methods": methods}


# -- operations -------------------------------------------------------------------------------------
@router.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """Liveness: the process answers. Does not look at the model."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses={503: _ERRORS[503]})
def readyz(request: Request) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and a warm-up pass has run; 503 before and while stopping."""
    engine = _engine(request)
    if engine.ready:
        return {"status": "ready"}
    if engine.load_error is not None:
        raise NotReady(f"the model failed to load: {engine.load_error}", code="load_failed")
    raise NotReady("the model is loading", headers={"Retry-After": "1"})


@router.get("/metrics", tags=["operations"], include_in_schema=True)
def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    m = _metrics(request)
    engine = _engine(request)
    m.queue_depth.set(engine.queue_depth)
    m.adapt_pending.set(engine.pending_s)
    backbone = engine.backbone
    if backbone is not None and backbone.device.type == "cuda":
        m.gpu_memory_allocated.set(torch.cuda.memory_allocated(backbone.device))
        m.gpu_memory_peak.set(max(engine.gpu_peak_bytes, torch.cuda.max_memory_allocated(backbone.device)))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
