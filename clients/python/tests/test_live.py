"""The client against a live server (``TTASERVE_URL``): every method, sync and async, with typed answers."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest
from ttaserve_client import ApiError, AsyncClient, Client, array_png
from ttaserve_client.models import Classification

from tests.conftest import Pixels

COLOURS = ["red", "green", "blue"]


def test_no_torch_numpy_or_pil_was_imported():
    import ttaserve_client.cli  # noqa: F401  (the command line too)

    assert not {"torch", "numpy", "PIL", "server"} & set(sys.modules)


def test_classify_paths_bytes_and_arrays_with_typed_results(server_url, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(array_png(Pixels(16, 16, 1)))
    with Client(server_url) as tta:
        assert tta.ready()
        answer = tta.classify([path, array_png(Pixels(8, 8, 2)), Pixels(12, 10, 3)], labels=COLOURS, top_k=2)
        assert isinstance(answer, Classification) and answer.request_id and answer.method
        assert [len(r.predictions) for r in answer.results] == [2, 2, 2]
        for result in answer.results:
            assert result.label in COLOURS and 0 < result.confidence <= 1 and 0 <= result.none_of_these <= 1
            assert result.predictions[0].label == result.label and result.adaptation.method == answer.method
        assert answer.timings["total"] > 0


def test_label_sets_calibration_and_errors(server_url):
    name = f"colours-{uuid.uuid4().hex[:8]}"
    with Client(server_url) as tta:
        created = tta.create_label_set(name, COLOURS, templates="simple")
        assert created.name == name and created.labels == COLOURS and created.source == "user"
        assert name in [s.name for s in tta.label_sets()] and tta.label_set(name).labels == COLOURS
        answer = tta.classify([Pixels(8, 8, 4)], label_set=name, compare=True, method="tps", options={"views": 4})
        assert answer.results[0].zero_shot is not None and answer.results[0].adaptation.views == 4

        images = [Pixels(8, 8, seed) for seed in range(24)]
        started = tta.calibrate(name, images, [COLOURS[i % 3] for i in range(24)])
        assert started.label_set == name and started.fit is not None and started.fit.images == 24
        seen: list[str] = []
        done = tta.wait_calibration(name, poll_s=0.05, progress=lambda s: seen.append(s.fit.state if s.fit else ""))
        assert done.fit is not None and done.fit.state == "fitted" and seen[-1] == "fitted"
        (fitted,) = done.calibrations
        assert (fitted.method, fitted.images, fitted.applies) == ("zero_shot", 24, True)
        assert set(fitted.held_out.ece) == {"raw", "before", "after"}
        tta.delete_calibration(name)
        assert tta.calibration(name).calibrations == []

        tta.delete_label_set(name)
        with pytest.raises(ApiError) as refused:
            tta.classify([Pixels(8, 8, 0)], label_set=name)
        assert (refused.value.status, refused.value.code) == (404, "unknown_label_set") and refused.value.request_id
        with pytest.raises(ApiError) as refused:
            tta.classify([Pixels(8, 8, 0)], labels=COLOURS, timeout_s=-1)
        assert (refused.value.status, refused.value.code) == (400, "invalid_timeout")
        with pytest.raises(ValueError, match="labels or label_set"):
            tta.classify([Pixels(8, 8, 0)])


def test_discovery(server_url):
    with Client(server_url) as tta:
        (model,) = tta.models()
        assert model.ready is True and model.embed_dim and model.device
        methods = tta.methods()
        assert methods.default in [m.name for m in methods.methods]
        assert {"zero_shot", "tpt", "tps"} <= {m.name for m in methods.methods}
        assert methods.methods[0].limits["max_images_per_request"] >= 1


def test_the_async_client_has_the_same_methods_and_runs_requests_concurrently(server_url):
    async def run() -> list[Classification]:
        async with AsyncClient(server_url) as tta:
            assert await tta.ready()
            assert "zero_shot" in [m.name for m in (await tta.methods()).methods]
            assert (await tta.models())[0].ready
            name = f"async-{uuid.uuid4().hex[:8]}"
            await tta.create_label_set(name, COLOURS)
            try:
                assert (await tta.label_set(name)).labels == COLOURS
                return list(
                    await asyncio.gather(*(tta.classify([Pixels(8, 8, s)], label_set=name, seed=s) for s in range(6)))
                )
            finally:
                await tta.delete_label_set(name)

    answers = asyncio.run(run())
    assert len({a.request_id for a in answers}) == 6
    assert all(a.results[0].label in COLOURS for a in answers)


def test_sessions_keep_state_until_reset(server_url):
    session = f"cam-{uuid.uuid4().hex[:8]}"
    with Client(server_url) as tta:
        first = tta.classify([Pixels(8, 8, 1), Pixels(8, 8, 2)], labels=COLOURS, session=session, session_method="tda")
        report = first.results[-1].session
        assert report is not None and (report.id, report.session_method, report.requests) == (session, "tda", 1)
        second = tta.classify([Pixels(8, 8, 3)], labels=COLOURS, session=session, session_method="tda")
        assert second.results[0].session is not None and second.results[0].session.requests == 2
        held = tta.session(session)
        assert held.requests == 2 and held.states[0].images == 3 and 0 < held.bytes <= held.max_bytes
        assert tta.classify([Pixels(8, 8, 3)], labels=COLOURS).results[0].session is None
        tta.delete_session(session)
        with pytest.raises(ApiError) as refused:
            tta.session(session)
        assert (refused.value.status, refused.value.code) == (404, "session_not_found")
        assert tta.methods().sessions is not None


def artifact(fingerprint: str, dim: int, labels: list[str], tilt: float) -> bytes:
    """An adapter artifact made without torch or numpy: a text adapter (W = I + tilt on the first row, b = 0)
    with one-hot label features and prototypes. Its values say nothing; what the server does with them does."""
    import json
    import struct

    def eye(n: int, extra: float = 0.0) -> list[float]:
        return [(1.0 if i == j else 0.0) + (extra if i == 0 else 0.0) for i in range(n) for j in range(n)]

    one_hot = [1.0 if j == i % dim else 0.0 for i in range(len(labels)) for j in range(dim)]
    tensors = {
        "label_features": ([len(labels), dim], one_hot),
        "prototypes": ([len(labels), dim], one_hot),
        "text.bias": ([dim], [0.0] * dim),
        "text.weight": ([dim, dim], eye(dim, tilt)),
    }
    card = {"type": "apex", "parts": ["text_adapter"], "base_model": fingerprint, "labels": labels, "format": 1}
    header: dict[str, object] = {"__metadata__": {"ttaserve.adapter": json.dumps(card)}}
    body, offset = b"", 0
    for name, (shape, values) in tensors.items():
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        body, offset = body + data, offset + len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


def test_adapters_upload_serve_merge_download_and_delete(server_url):
    name = f"colours-{uuid.uuid4().hex[:8]}"
    with Client(server_url) as tta:
        model = tta.models()[0]
        assert model.fingerprint and model.embed_dim
        first = tta.upload_adapter(artifact(model.fingerprint, model.embed_dim, COLOURS, 0.5), name, group=name)
        second = tta.upload_adapter(artifact(model.fingerprint, model.embed_dim, COLOURS, -0.5), f"{name}-b", name)
        assert (first.ref, first.version, first.parts) == (f"{name}@v1", 1, ["text_adapter"])
        assert {a.ref for a in tta.adapters().adapters} >= {first.ref, second.ref}
        images = [Pixels(8, 8, 1), Pixels(8, 8, 2)]
        served = tta.classify(images, labels=COLOURS, adapter=name, compare=True)
        report = served.results[0].adapter
        assert report is not None and (report.adapter, report.alpha) == (first.ref, 1.0)
        frozen = tta.classify(images, labels=COLOURS, adapter=first.ref, adapter_alpha=0.0)
        plain = tta.classify(images, labels=COLOURS)
        assert [r.predictions for r in frozen.results] == [r.predictions for r in plain.results]
        routed = tta.classify(images, labels=COLOURS, adapter={"route": "auto", "group": name})
        assert all(r.adapter is not None and r.adapter.routed is not None for r in routed.results)
        merged = tta.merge_adapters(name, "emr")
        assert merged.unified.ref == f"{name}.merged@v1" and len(merged.members) == 2
        assert tta.download_adapter(first.ref)[:8] == artifact(model.fingerprint, model.embed_dim, COLOURS, 0.5)[:8]
        tta.delete_adapter(name)
        with pytest.raises(ApiError) as gone:
            tta.adapter(name)
        assert (gone.value.status, gone.value.code) == (404, "unknown_adapter")
        with pytest.raises(ApiError) as foreign:
            tta.upload_adapter(artifact("0" * 16, model.embed_dim, COLOURS, 0.5), name)
        assert (foreign.value.status, foreign.value.code) == (409, "adapter_base_model")


def test_the_async_client_serves_through_an_adapter(server_url):
    name = f"async-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        async with AsyncClient(server_url) as tta:
            model = (await tta.models())[0]
            assert model.fingerprint and model.embed_dim
            stored = await tta.upload_adapter(artifact(model.fingerprint, model.embed_dim, COLOURS, 0.5), name)
            answer = await tta.classify([Pixels(8, 8, 1)], labels=COLOURS, adapter=stored.ref)
            assert answer.results[0].adapter is not None and answer.results[0].adapter.adapter == stored.ref
            assert [a.ref for a in (await tta.adapters()).adapters if a.name == name] == [stored.ref]
            await tta.delete_adapter(stored.ref)

    asyncio.run(go())
