"""``Client`` and ``AsyncClient``: the same methods, over httpx, with typed answers.

    from ttaserve_client import Client
    with Client("http://127.0.0.1:8000") as tta:
        answer = tta.classify(["photo.jpg"], labels=["cat", "dog"])
        print(answer.results[0].label, answer.results[0].confidence)

    async with AsyncClient(url, api_key=key) as tta:  # a server with API keys: sent as Authorization: Bearer
        answer = await tta.classify([...], label_set="animals", method="tpt")

Each method sends one ``Call`` (``calls.py``: what to send, how to read the answer, whether sending it twice is
harmless); the two classes differ only in how they wait. Errors raise ``ApiError`` (status, code,
message, request id) or ``ConnectionFailed``; see ``retry.py`` for what is tried again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from ttaserve_client.adapters import Adapters, AsyncAdapters
from ttaserve_client.calls import Call, Calls, Video, reads, reads_label_sets, reads_model_infos, reads_nothing
from ttaserve_client.errors import ApiError, ConnectionFailed
from ttaserve_client.images import ImageLike, VideoLike
from ttaserve_client.models import (
    Calibration,
    Classification,
    LabelSet,
    Methods,
    ModelInfo,
    Session,
)
from ttaserve_client.retry import RETRY_STATUSES, RetryPolicy
from ttaserve_client.training import AsyncJobs, Jobs

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"


class _Base:
    def __init__(self, base_url: str, timeout_s: float, retries: int | RetryPolicy, api_key: str | None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries)
        # Sent with every request; the key itself is kept nowhere else (not in repr or errors).
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _outcome(self, call: Call[T], attempt: int, response: httpx.Response | None, error: Exception | None) -> float:
        """Seconds to wait before trying ``call`` again; raises when it must not be tried again."""
        last = attempt >= self.policy.retries
        if response is not None:
            if response.status_code in RETRY_STATUSES and not last:
                return self.policy.wait_s(attempt, response.headers.get("retry-after"))
            raise ApiError.of(response)
        connect = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
        broke = isinstance(error, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))
        if not last and (connect or (broke and call.idempotent)):
            return self.policy.wait_s(attempt)
        raise ConnectionFailed(f"{call.method} {self.base_url}{call.path}: {type(error).__name__}: {error}") from error


class Client(Adapters, Jobs, _Base):
    """Synchronous client. ``retries`` (or a ``RetryPolicy``) bounds the tries after the first; ``api_key`` is
    sent as ``Authorization: Bearer KEY`` to a server with API keys."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout_s: float = 60.0,
        retries: int | RetryPolicy = 3,
        *,
        api_key: str | None = None,
    ):
        super().__init__(base_url, timeout_s, retries, api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=self._headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.kwargs)
            except httpx.TransportError as error:
                time.sleep(self._outcome(call, attempt, None, error))
            else:
                if response.status_code < 400:
                    return call.read(response)
                time.sleep(self._outcome(call, attempt, response, None))
            attempt += 1

    def classify(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[str] | None = None,
        *,
        label_set: str | None = None,
        templates: Sequence[str] | str | None = None,
        top_k: int | None = None,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        compare: bool = False,
        abstain_below: float | None = None,
        confidence_gate: float | None = None,
        timeout_s: float | None = None,
        session: str | None = None,
        session_method: str | None = None,
        adapter: str | Mapping[str, Any] | None = None,
        adapter_alpha: float | str | None = None,
    ) -> Classification:
        """Classify images (paths, bytes, PIL images or uint8 arrays) against ``labels`` or a ``label_set``.

        ``timeout_s`` is sent as ``X-Request-Timeout``: the server answers 504 and stops the work after
        that many seconds, when it is shorter than the server's own deadline. ``session`` keeps online state
        across the requests that name it (zero_shot only; ``session_method`` tda or stats): see ``session``
        and ``delete_session``. A request with a session is not sent again after a broken connection.
        ``adapter`` answers through a stored adapter (``"NAME"``, ``"NAME@vN"``) or routes among them
        (``{"route": "auto", "top_k": 1, "min_sim": 0.0}``); ``adapter_alpha`` blends it toward zero-shot.
        """
        args = (labels, label_set, templates, top_k, method, options, seed, compare, abstain_below, confidence_gate)
        call = Calls.classify(images, *args, timeout_s, None, session, session_method, adapter, adapter_alpha)
        return self.send(call)

    def classify_video(
        self,
        video: VideoLike,
        labels: Sequence[str] | None = None,
        *,
        num_frames: int | None = None,
        sampling: str | None = None,
        pooling: str | None = None,
        label_set: str | None = None,
        templates: Sequence[str] | str | None = None,
        top_k: int | None = None,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        compare: bool = False,
        abstain_below: float | None = None,
        confidence_gate: float | None = None,
        timeout_s: float | None = None,
    ) -> Classification:
        """Classify one video: a folder of frames, a video file (path or bytes), or its frames in time order.

        The answer has one result. ``sampling`` ("segment", "uniform" or "all") picks ``num_frames``
        frames (the server's default 8); ``pooling`` ("mean" or "max") pools them. A video file needs
        PyAV on the server.
        """
        args = (labels, label_set, templates, top_k, method, options, seed, compare, abstain_below, confidence_gate)
        clip = Video(video, num_frames, sampling, pooling)
        return self.send(Calls.classify((), *args, timeout_s, video=clip))

    def label_sets(self) -> list[LabelSet]:
        return self.send(Call("GET", "/v1/label-sets", reads_label_sets))

    def label_set(self, name: str) -> LabelSet:
        return self.send(Call("GET", f"/v1/label-sets/{name}", reads(LabelSet)))

    def create_label_set(
        self,
        name: str,
        labels: Sequence[str],
        templates: Sequence[str] | str | None = None,
        descriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> LabelSet:
        return self.send(Calls.create_label_set(name, labels, templates, descriptions))

    def delete_label_set(self, name: str) -> None:
        self.send(Call("DELETE", f"/v1/label-sets/{name}", reads_nothing))

    def calibrate(
        self,
        label_set: str,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        methods: Sequence[str] | None = None,
    ) -> Calibration:
        """Start a calibration of ``label_set`` on labelled images (each image's true label, in order).

        The fit runs in the server's background; ``calibration`` shows its progress, ``wait_calibration``
        waits for it to end."""
        return self.send(Calls.calibrate(label_set, images, labels, methods))

    def calibration(self, label_set: str) -> Calibration:
        return self.send(Call("GET", f"/v1/label-sets/{label_set}/calibration", reads(Calibration)))

    def wait_calibration(
        self,
        label_set: str,
        poll_s: float = 0.5,
        progress: Callable[[Calibration], None] | None = None,
    ) -> Calibration:
        """Poll until the label set's fit has ended (fitted or failed); ``progress`` sees every poll."""
        while True:
            status = self.calibration(label_set)
            if progress is not None:
                progress(status)
            if status.fit is None or status.fit.state != "running":
                return status
            time.sleep(poll_s)

    def delete_calibration(self, label_set: str) -> None:
        self.send(Call("DELETE", f"/v1/label-sets/{label_set}/calibration", reads_nothing))

    def session(self, session_id: str) -> Session:
        """What a session of yours holds per label set, its bytes and when it expires."""
        return self.send(Call("GET", f"/v1/sessions/{session_id}", reads(Session)))

    def delete_session(self, session_id: str) -> None:
        """Reset a session of yours: its next request starts from zero-shot."""
        self.send(Call("DELETE", f"/v1/sessions/{session_id}", reads_nothing))

    def models(self) -> list[ModelInfo]:
        return self.send(Call("GET", "/v1/models", reads_model_infos))

    def methods(self) -> Methods:
        return self.send(Call("GET", "/v1/methods", reads(Methods)))

    def ready(self) -> bool:
        """True once the model is loaded and warm (``/readyz`` answers 200); never raises."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float, alive: Callable[[], bool] = lambda: True, poll_s: float = 0.1) -> bool:
        """Poll ``/readyz`` until ready (True), or until ``alive()`` turns False or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            if self.ready():
                return True
            time.sleep(poll_s)
        return False


class AsyncClient(AsyncAdapters, AsyncJobs, _Base):
    """The same methods as ``Client``, awaited: many requests in flight from one event loop."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout_s: float = 60.0,
        retries: int | RetryPolicy = 3,
        *,
        api_key: str | None = None,
    ):
        super().__init__(base_url, timeout_s, retries, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, headers=self._headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.kwargs)
            except httpx.TransportError as error:
                await asyncio.sleep(self._outcome(call, attempt, None, error))
            else:
                if response.status_code < 400:
                    return call.read(response)
                await asyncio.sleep(self._outcome(call, attempt, response, None))
            attempt += 1

    async def classify(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[str] | None = None,
        *,
        label_set: str | None = None,
        templates: Sequence[str] | str | None = None,
        top_k: int | None = None,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        compare: bool = False,
        abstain_below: float | None = None,
        confidence_gate: float | None = None,
        timeout_s: float | None = None,
        session: str | None = None,
        session_method: str | None = None,
        adapter: str | Mapping[str, Any] | None = None,
        adapter_alpha: float | str | None = None,
    ) -> Classification:
        """See ``Client.classify``."""
        args = (labels, label_set, templates, top_k, method, options, seed, compare, abstain_below, confidence_gate)
        call = Calls.classify(images, *args, timeout_s, None, session, session_method, adapter, adapter_alpha)
        return await self.send(call)

    async def classify_video(
        self,
        video: VideoLike,
        labels: Sequence[str] | None = None,
        *,
        num_frames: int | None = None,
        sampling: str | None = None,
        pooling: str | None = None,
        label_set: str | None = None,
        templates: Sequence[str] | str | None = None,
        top_k: int | None = None,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        compare: bool = False,
        abstain_below: float | None = None,
        confidence_gate: float | None = None,
        timeout_s: float | None = None,
    ) -> Classification:
        """See ``Client.classify_video``."""
        args = (labels, label_set, templates, top_k, method, options, seed, compare, abstain_below, confidence_gate)
        clip = Video(video, num_frames, sampling, pooling)
        return await self.send(Calls.classify((), *args, timeout_s, video=clip))

    async def label_sets(self) -> list[LabelSet]:
        return await self.send(Call("GET", "/v1/label-sets", reads_label_sets))

    async def label_set(self, name: str) -> LabelSet:
        return await self.send(Call("GET", f"/v1/label-sets/{name}", reads(LabelSet)))

    async def create_label_set(
        self,
        name: str,
        labels: Sequence[str],
        templates: Sequence[str] | str | None = None,
        descriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> LabelSet:
        return await self.send(Calls.create_label_set(name, labels, templates, descriptions))

    async def delete_label_set(self, name: str) -> None:
        await self.send(Call("DELETE", f"/v1/label-sets/{name}", reads_nothing))

    async def calibrate(
        self,
        label_set: str,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        methods: Sequence[str] | None = None,
    ) -> Calibration:
        """See ``Client.calibrate``."""
        return await self.send(Calls.calibrate(label_set, images, labels, methods))

    async def calibration(self, label_set: str) -> Calibration:
        return await self.send(Call("GET", f"/v1/label-sets/{label_set}/calibration", reads(Calibration)))

    async def wait_calibration(
        self,
        label_set: str,
        poll_s: float = 0.5,
        progress: Callable[[Calibration], None] | None = None,
    ) -> Calibration:
        """See ``Client.wait_calibration``."""
        while True:
            status = await self.calibration(label_set)
            if progress is not None:
                progress(status)
            if status.fit is None or status.fit.state != "running":
                return status
            await asyncio.sleep(poll_s)

    async def delete_calibration(self, label_set: str) -> None:
        await self.send(Call("DELETE", f"/v1/label-sets/{label_set}/calibration", reads_nothing))

    async def session(self, session_id: str) -> Session:
        """See ``Client.session``."""
        return await self.send(Call("GET", f"/v1/sessions/{session_id}", reads(Session)))

    async def delete_session(self, session_id: str) -> None:
        """See ``Client.delete_session``."""
        await self.send(Call("DELETE", f"/v1/sessions/{session_id}", reads_nothing))

    async def models(self) -> list[ModelInfo]:
        return await self.send(Call("GET", "/v1/models", reads_model_infos))

    async def methods(self) -> Methods:
        return await self.send(Call("GET", "/v1/methods", reads(Methods)))

    async def ready(self) -> bool:
        """See ``Client.ready``."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
