"""What each operation of the API sends and how its answer is read: one ``Call`` per operation, built here
once and sent by both ``Client`` and ``AsyncClient`` (``client.py``), which differ only in how they wait."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from ttaserve_client.images import ImageLike, VideoLike, image_bytes, image_name, video_parts
from ttaserve_client.models import (
    Adapter,
    AdapterList,
    Calibration,
    Classification,
    Job,
    LabelSet,
    Merge,
    ModelInfo,
)

T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    idempotent: bool = True  # safe to send again when the connection broke after sending
    kwargs: dict[str, Any] = field(default_factory=dict)


def form(
    images: Sequence[ImageLike], fields: Mapping[str, Any], files: list[tuple[str, Any]] | None = None
) -> dict[str, Any]:
    """Multipart parts: one ``image`` file per image (or the given ``files``), and each field that is set
    (lists as JSON)."""
    if files is None:
        files = [
            ("image", (image_name(img, i), image_bytes(img), "application/octet-stream"))
            for i, img in enumerate(images)
        ]
    data: dict[str, str] = {}
    for name, value in fields.items():
        if value is None or value is False:
            continue
        if isinstance(value, bool):
            data[name] = "true"
        elif isinstance(value, (list, tuple, dict)):
            data[name] = json.dumps(value)
        else:
            data[name] = str(value)
    return {"files": files, "data": data}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reads(kind: type[T], key: str | None = None) -> Callable[[httpx.Response], T]:
    def read(response: httpx.Response) -> T:
        body = response.json()
        return kind.model_validate(body[key] if key else body)  # type: ignore[attr-defined, no-any-return]

    return read


def reads_label_sets(response: httpx.Response) -> list[LabelSet]:
    return [LabelSet.model_validate(s) for s in response.json()["label_sets"]]


def reads_model_infos(response: httpx.Response) -> list[ModelInfo]:
    return [ModelInfo.model_validate(m) for m in response.json()["models"]]


def reads_jobs(response: httpx.Response) -> list[Job]:
    return [Job.model_validate(j) for j in response.json()["jobs"]]


def reads_nothing(response: httpx.Response) -> None:
    return None


@dataclass(frozen=True)
class Video:
    """A video to classify and how: sent as ``frame`` files or one ``video`` file."""

    video: VideoLike
    num_frames: int | None
    sampling: str | None
    pooling: str | None


class Calls:
    """What each method sends; shared by both clients."""

    @staticmethod
    def classify(
        images: Sequence[ImageLike],
        labels: Sequence[str] | None,
        label_set: str | None,
        templates: Sequence[str] | str | None,
        top_k: int | None,
        method: str | None,
        options: Mapping[str, Any] | None,
        seed: int | None,
        compare: bool,
        abstain_below: float | None,
        confidence_gate: float | None,
        timeout_s: float | None,
        video: Video | None = None,
        session: str | None = None,
        session_method: str | None = None,
        adapter: str | Mapping[str, Any] | None = None,
        adapter_alpha: float | str | None = None,
    ) -> Call[Classification]:
        if not images and video is None:
            raise ValueError("classify needs at least one image")
        if (labels is None) == (label_set is None):
            raise ValueError("pass labels or label_set (one of them)")
        fields: dict[str, Any] = {
            "labels": list(labels) if labels is not None else None,
            "label_set": label_set,
            "templates": templates if isinstance(templates, str) or templates is None else list(templates),
            "top_k": top_k,
            "method": method,
            "options": dict(options) if options is not None else None,
            "seed": seed,
            "compare": compare,
            "abstain_below": abstain_below,
            "confidence_gate": confidence_gate,
            "session": session,
            "session_method": session_method,
            "adapter": dict(adapter) if isinstance(adapter, Mapping) else adapter,
            "adapter_alpha": adapter_alpha,
        }
        if video is not None:
            fields.update(num_frames=video.num_frames, sampling=video.sampling, pooling=video.pooling)
        kwargs = form(images, fields, video_parts(video.video) if video is not None else None)
        if timeout_s is not None:
            kwargs["headers"] = {"X-Request-Timeout": f"{timeout_s:g}"}
        # A session's request changes what the session keeps: sent twice, its images would count twice.
        return Call("POST", "/v1/classify", reads(Classification), idempotent=session is None, kwargs=kwargs)

    @staticmethod
    def create_label_set(
        name: str,
        labels: Sequence[str],
        templates: Sequence[str] | str | None,
        descriptions: Mapping[str, Sequence[str]] | None,
    ) -> Call[LabelSet]:
        body: dict[str, Any] = {"name": name, "labels": list(labels)}
        if templates is not None:
            body["templates"] = templates if isinstance(templates, str) else list(templates)
        if descriptions is not None:
            body["descriptions"] = {k: list(v) for k, v in descriptions.items()}
        return Call("POST", "/v1/label-sets", reads(LabelSet), idempotent=False, kwargs={"json": body})

    @staticmethod
    def calibrate(
        label_set: str, images: Sequence[ImageLike], labels: Sequence[str], methods: Sequence[str] | None
    ) -> Call[Calibration]:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels: give each image its label")
        kwargs = form(images, {"labels": list(labels), "methods": list(methods) if methods else None})
        return Call("POST", f"/v1/label-sets/{label_set}/calibration", reads(Calibration), False, kwargs)

    @staticmethod
    def upload_adapter(artifact: str | Path | bytes, name: str, group: str | None) -> Call[Adapter]:
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        params = {"name": name, **({"group": group} if group is not None else {})}
        kwargs = {"content": data, "params": params, "headers": {"content-type": "application/octet-stream"}}
        return Call("POST", "/v1/adapters", reads(Adapter), idempotent=False, kwargs=kwargs)

    @staticmethod
    def adapters() -> Call[AdapterList]:
        return Call("GET", "/v1/adapters", reads(AdapterList))

    @staticmethod
    def adapter(ref: str) -> Call[Adapter]:
        return Call("GET", f"/v1/adapters/{ref}", reads(Adapter))

    @staticmethod
    def download_adapter(ref: str) -> Call[bytes]:
        return Call("GET", f"/v1/adapters/{ref}/artifact", lambda response: response.content)

    @staticmethod
    def delete_adapter(ref: str) -> Call[None]:
        return Call("DELETE", f"/v1/adapters/{ref}", reads_nothing)

    @staticmethod
    def merge_adapters(
        group: str, method: str, scale: float | None, density: float | None, name: str | None
    ) -> Call[Merge]:
        body = {k: v for k, v in {"method": method, "scale": scale, "density": density, "name": name}.items() if v}
        return Call("POST", f"/v1/adapter-groups/{group}/merge", reads(Merge), idempotent=False, kwargs={"json": body})

    @staticmethod
    def finetune(
        label_set: str,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        name: str,
        group: str | None,
        config: Mapping[str, Any],
        anchors: Mapping[str, Any] | None,
    ) -> Call[Job]:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels: give each image its label")
        support = [{"image": b64(image_bytes(img)), "label": label} for img, label in zip(images, labels, strict=True)]
        body: dict[str, Any] = {"label_set": label_set, "support": support, "name": name, **config}
        if group is not None:
            body["group"] = group
        if anchors is not None:
            body["anchors"] = {
                kind: [{"image": b64(image_bytes(img)), "text": text} for img, text in anchors.get(kind, ())]
                for kind in ("captions", "pool")
            } | ({"retrieve_k": anchors["retrieve_k"]} if "retrieve_k" in anchors else {})
        return Call("POST", "/v1/jobs/finetune", reads(Job), idempotent=False, kwargs={"json": body})

    @staticmethod
    def jobs() -> Call[list[Job]]:
        return Call("GET", "/v1/jobs", reads_jobs)

    @staticmethod
    def job(job_id: str) -> Call[Job]:
        return Call("GET", f"/v1/jobs/{job_id}", reads(Job))

    @staticmethod
    def cancel_job(job_id: str) -> Call[Job]:
        return Call("DELETE", f"/v1/jobs/{job_id}", reads(Job))
