"""Reading a classify request off HTTP: a JSON or multipart body, and the ``X-Request-Timeout`` header,
turned into the service's ``ClassifyRequest``. Each problem raises a typed error with its own code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.schemas import CalibrationIn, VideoIn
from server.api.schemas import ClassifyRequest as ClassifyBody
from server.clip.templates import PLACEHOLDER
from server.errors import BadRequest, InvalidInput, UnsupportedMediaType
from server.service.adapters import AdapterChoice
from server.service.classify import ClassifyRequest
from server.service.decoding import ImageInput
from server.service.video import VideoInput
from server.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout"
Body = TypeVar("Body", bound=BaseModel)
_VIDEO_FORM_FIELDS = {"frame", "video", "num_frames", "sampling", "pooling"}
_FORM_FIELDS = _VIDEO_FORM_FIELDS | {
    "image",
    "labels",
    "label_set",
    "templates",
    "top_k",
    "method",
    "options",
    "seed",
    "compare",
    "abstain_below",
    "confidence_gate",
    "session",
    "session_method",
    "adapter",
    "adapter_alpha",
}


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _form(request: Request, settings: Settings, max_files: int) -> FormData:
    try:
        return await request.form(
            max_files=max_files + 1,
            max_fields=settings.max_labels + settings.max_templates + max_files + 16,
            max_part_size=settings.max_body_bytes,
        )
    except StarletteHTTPException as exc:
        raise BadRequest(f"malformed multipart body: {exc.detail}", code="invalid_form") from exc


def _unsupported(ctype: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"content type {ctype!r} is not accepted; send application/json or multipart/form-data")


async def read_classify(request: Request, settings: Settings) -> ClassifyRequest:
    """The request's body (JSON with base64 images, or multipart with image files) and deadline header."""
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        form = await _form(request, settings, max(settings.max_images_per_request, settings.max_frames))
        try:
            images, body, video = await parse_form(form)
        finally:
            await form.close()
    elif ctype in ("application/json", ""):
        images, body = parse_json_body(await request.body())
        video = _video(body.video.frames, body.video.file, body) if body.video is not None else None
    else:
        raise _unsupported(ctype)
    return ClassifyRequest(
        images=images,
        video=video,
        labels=body.labels,
        label_set=body.label_set,
        templates=body.templates,
        top_k=body.top_k,
        method=body.method,
        options=body.options,
        seed=body.seed,
        compare=body.compare,
        abstain_below=body.abstain_below,
        confidence_gate=body.confidence_gate,
        session=body.session,
        session_method=body.session_method,
        adapter=_adapter_choice(body),
        timeout_s=read_timeout(request.headers.get(TIMEOUT_HEADER)),
    )


def _adapter_choice(body: ClassifyBody) -> AdapterChoice | None:
    """The request's ``adapter`` and ``adapter_alpha`` for the service; alpha alone is refused there."""
    alpha = body.adapter_alpha
    if body.adapter is None:
        return None if alpha is None else AdapterChoice(alpha=alpha)
    if isinstance(body.adapter, str):
        return AdapterChoice(ref=body.adapter, alpha=1.0 if alpha is None else alpha)
    route = body.adapter
    return AdapterChoice(
        top_k=route.top_k, min_sim=route.min_sim, group=route.group, alpha=1.0 if alpha is None else alpha
    )


async def read_calibration(
    request: Request, settings: Settings
) -> tuple[list[ImageInput], list[str], list[str] | None]:
    """A calibration's labelled images: JSON (base64 images, one label each) or multipart (image files and
    ``labels`` in the same order, as repeated fields or one JSON list), and optionally the methods."""
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        form = await _form(request, settings, settings.max_calibration_images)
        try:
            unknown = sorted({k for k in form if k not in ("image", "labels", "methods")})
            if unknown:
                raise InvalidInput(
                    f"unknown form field(s) {', '.join(unknown)}; accepted: image, labels, methods", code="invalid_form"
                )
            images = await _uploads(form)
            texts = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in ("labels", "methods")}
            methods = _json_list_or_values(texts["methods"], "methods") or None
            return images, _json_list_or_values(texts["labels"], "labels"), methods
        finally:
            await form.close()
    if ctype not in ("application/json", ""):
        raise _unsupported(ctype)
    body = _validated(CalibrationIn, _loads(await request.body()))
    return list(body.images), body.labels, body.methods


async def _uploads(form: FormData, field: str = "image") -> list[ImageInput]:
    return [*await _upload_bytes(form, field)]


async def _upload_bytes(form: FormData, field: str) -> list[bytes]:
    images: list[bytes] = []
    for item in form.getlist(field):
        if not isinstance(item, UploadFile):
            raise InvalidInput(
                f"form field {field!r} must be a file upload (curl -F {field}=@file)", code="invalid_form"
            )
        images.append(await item.read())
    if not images:
        raise InvalidInput(f"no images: add one or more {field!r} file fields", code="no_images")
    return images


def read_timeout(raw: str | None) -> float | None:
    """``X-Request-Timeout`` in seconds (the service keeps the shorter of it and the server's), or None."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}", code="invalid_timeout")
    return value


def _loads(raw: bytes | str, what: str = "the body") -> Any:
    """JSON, or a 400 that says why: not JSON, or nested past what the parser can follow."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise BadRequest(f"{what} is nested too deeply to parse", code="invalid_json") from exc


def _video(frames: Sequence[ImageInput] | None, file: bytes | str | None, body: ClassifyBody) -> VideoInput:
    """The service's video from its frames or file and the body's sampling settings (defaults without ``video``)."""
    settings = body.video or VideoIn()
    return VideoInput(
        frames=frames,
        file=file,
        num_frames=settings.num_frames,
        sampling=settings.sampling,
        pooling=settings.pooling,
    )


def parse_json_body(body: bytes) -> tuple[list[ImageInput], ClassifyBody]:
    data = _loads(body)
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    if isinstance(data.get("images"), list) and not data["images"]:
        raise InvalidInput("no images: send at least one", code="no_images")
    video = data.get("video")
    if isinstance(video, dict) and isinstance(video.get("frames"), list) and not video["frames"]:
        raise InvalidInput("video.frames is empty: send at least one frame", code="no_images")
    request = _validated(ClassifyBody, data)
    return list(request.images or []), request


def _json_list_or_values(values: list[str], field: str) -> list[str]:
    """A repeated form field, or one field holding a JSON list."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"form field {field!r} looks like JSON but is not: {exc}", code="invalid_form") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise InvalidInput(f"form field {field!r} must be a JSON list of strings", code="invalid_form")
        return parsed
    return values


async def parse_form(form: FormData) -> tuple[list[ImageInput], ClassifyBody, VideoInput | None]:
    """Images (``image`` files), or one video: ``frame`` files or a ``video`` file, with its form fields."""
    unknown = sorted({k for k in form if k not in _FORM_FIELDS})
    if unknown:
        raise InvalidInput(
            f"unknown form field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_FORM_FIELDS))}",
            code="invalid_form",
        )
    is_video = any(k in form for k in ("frame", "video"))
    images = [] if is_video and "image" not in form else await _uploads(form)
    frames = await _uploads(form, "frame") if "frame" in form else None
    video_files = await _upload_bytes(form, "video") if "video" in form else []
    if len(video_files) > 1:
        raise InvalidInput(f"form field 'video' given {len(video_files)} times; send one video", code="invalid_form")
    data: dict[str, Any] = {"images": ["<multipart>"]}
    files = {"image", "frame", "video"}
    texts = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in _FORM_FIELDS - files}
    if texts["labels"]:
        data["labels"] = _json_list_or_values(texts["labels"], "labels")
    video: dict[str, Any] = {}
    singles = ("label_set", "method", "top_k", "seed", "compare", "abstain_below", "confidence_gate", "session")
    for single in (*singles, "session_method", "adapter", "adapter_alpha", "num_frames", "sampling", "pooling"):
        if len(texts[single]) > 1:
            raise InvalidInput(f"form field {single!r} given {len(texts[single])} times", code="invalid_form")
        if texts[single]:
            (video if single in _VIDEO_FORM_FIELDS else data)[single] = texts[single][0]
    if video and not is_video:
        raise InvalidInput(
            f"form field(s) {', '.join(sorted(video))} describe a video: add 'frame' files or a 'video' file",
            code="invalid_form",
        )
    if is_video:
        data["video"] = video
    if texts["templates"]:
        values = texts["templates"]
        is_named = len(values) == 1 and not values[0].lstrip().startswith("[") and PLACEHOLDER not in values[0]
        data["templates"] = values[0] if is_named else _json_list_or_values(values, "templates")
    if isinstance(data.get("adapter"), str) and data["adapter"].lstrip().startswith("{"):
        try:
            data["adapter"] = json.loads(data["adapter"])
        except (ValueError, RecursionError) as exc:
            raise BadRequest(
                f"form field 'adapter' must be a name or a JSON object: {exc}", code="invalid_form"
            ) from exc
    if texts["options"]:
        try:
            data["options"] = json.loads(texts["options"][0])
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"form field 'options' must be a JSON object: {exc}", code="invalid_form") from exc
    body = _validated(ClassifyBody, data)
    if not is_video:
        return images, body, None
    return images, body, _video(frames, video_files[0] if video_files else None, body)


def _validated(schema: type[Body], data: Any) -> Body:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInput(
            f"{where}: {first.get('msg')}" if where else str(first.get("msg")), code="validation_error"
        ) from exc
