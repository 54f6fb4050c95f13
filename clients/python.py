"""A small synchronous Python client for TTAServe's HTTP API (httpx; no torch import).

    from clients import Client
    with Client("http://127.0.0.1:8000") as tta:
        result = tta.classify(["photo.jpg"], labels=["cat", "dog"])
        print(result["results"][0]["label"])

Images may be paths, bytes or PIL images. A 429 or 503 answer is retried after its Retry-After
header, up to ``retries`` times; every other error raises ``ApiError`` with the server's code.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ImageLike = str | Path | bytes | Any  # Any: a PIL.Image.Image


class ApiError(Exception):
    """An error answer from the server: HTTP status, the stable ``code`` and the message."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


def _image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image: pass a path, bytes or a PIL image")


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 60.0, retries: int = 3):
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code in (429, 503) and attempt < self.retries:
                time.sleep(float(response.headers.get("retry-after", "1")))
                continue
            if response.status_code >= 400:
                try:
                    error = response.json()["error"]
                except (ValueError, KeyError, TypeError):
                    error = {"code": "http_error", "message": response.text, "request_id": None}
                raise ApiError(response.status_code, error["code"], error["message"], error.get("request_id"))
            return response
        raise AssertionError("unreachable")

    def classify(
        self,
        images: list[ImageLike],
        labels: list[str] | None = None,
        *,
        label_set: str | None = None,
        templates: list[str] | str | None = None,
        top_k: int | None = None,
        method: str | None = None,
        options: dict[str, Any] | None = None,
        seed: int | None = None,
        compare: bool = False,
        abstain_below: float | None = None,
        confidence_gate: float | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Classify images (sent as multipart uploads); returns the response body.

        ``timeout_s`` is sent as ``X-Request-Timeout``: the server gives up (504) and stops the work
        after that many seconds, if it is shorter than the server's own deadline.
        """
        files = [
            ("image", (f"image{i}", _image_bytes(img), "application/octet-stream")) for i, img in enumerate(images)
        ]
        data: dict[str, Any] = {}
        if labels is not None:
            data["labels"] = json.dumps(list(labels))  # one field, whatever the label count
        if label_set is not None:
            data["label_set"] = label_set
        if templates is not None:
            data["templates"] = templates if isinstance(templates, str) else json.dumps(list(templates))
        if top_k is not None:
            data["top_k"] = str(top_k)
        if method is not None:
            data["method"] = method
        if options is not None:
            data["options"] = json.dumps(options)
        if seed is not None:
            data["seed"] = str(seed)
        if compare:
            data["compare"] = "true"
        if abstain_below is not None:
            data["abstain_below"] = str(abstain_below)
        if confidence_gate is not None:
            data["confidence_gate"] = str(confidence_gate)
        headers = {"X-Request-Timeout": str(timeout_s)} if timeout_s is not None else {}
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/classify", files=files, data=data, headers=headers
        ).json()

    def create_label_set(
        self,
        name: str,
        labels: list[str],
        templates: list[str] | str | None = None,
        descriptions: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        body = {"name": name, "labels": labels, "templates": templates, "descriptions": descriptions}
        return self._request("POST", "/v1/label-sets", json=body).json()  # type: ignore[no-any-return]

    def label_sets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/label-sets").json()["label_sets"]  # type: ignore[no-any-return]

    def delete_label_set(self, name: str) -> None:
        self._request("DELETE", f"/v1/label-sets/{name}")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["models"]  # type: ignore[no-any-return]

    def methods(self) -> dict[str, Any]:
        return self._request("GET", "/v1/methods").json()  # type: ignore[no-any-return]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float, alive: Callable[[], bool] = lambda: True, poll_s: float = 0.1) -> bool:
        """Poll ``/readyz`` until the model is loaded (True), or ``alive()`` (the server process, say) turns
        False or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            if self.ready():
                return True
            time.sleep(poll_s)
        return False
