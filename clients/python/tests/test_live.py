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
