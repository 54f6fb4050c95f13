"""Training jobs through the Python client and ``tta train`` against a live server on the tiny model: submit,
follow, list and cancel a job; train on this machine from a folder of labelled images and upload the result."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from ttaserve_client import AsyncClient, Client
from ttaserve_client.cli import main

from server.api import create_app
from server.settings import Settings
from tests.integration.test_jobs import COLOURS, LONG
from tests.support.apps import PATIENCE_S, wait_for
from tests.support.images import png_bytes
from tests.support.servers import serve_in_thread


def labelled_images(per_label: int = 2) -> tuple[list[bytes], list[str]]:
    images = [
        png_bytes(color=(min(255, r + 9 * i), g, b), size=(36 + i, 40))
        for (r, g, b) in COLOURS.values()
        for i in range(per_label)
    ]
    return images, [label for label in COLOURS for _ in range(per_label)]


@pytest.fixture
def served(settings: Settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_the_client_submits_follows_lists_and_cancels_jobs(served: str) -> None:
    images, labels = labelled_images()
    with Client(served, timeout_s=PATIENCE_S) as tta:
        tta.create_label_set("colours", list(COLOURS))
        queued = tta.finetune("colours", images, labels, "shades", group="g", steps=3, batch_size=6)
        assert queued.state in ("queued", "running") and queued.spec["config"]["steps"] == 3
        seen: list[str] = []
        done = tta.wait_job(queued.id, poll_s=0.05, progress=lambda job: seen.append(job.state))
        assert done.state == "succeeded" and done.result is not None, done
        assert done.result["adapter"] == "shades@v1" and (done.step, done.steps) == (3, 3)
        assert seen[-1] == "succeeded"
        assert tta.adapter("shades").source == f"job:{queued.id}"

        long = tta.finetune("colours", images, labels, "never", steps=LONG)
        wait_for(lambda: (tta.job(long.id).step or 0) >= 1, "a training step")
        assert tta.cancel_job(long.id).state == "cancelled"
        assert [(j.id, j.state) for j in tta.jobs()] == [(queued.id, "succeeded"), (long.id, "cancelled")]
        assert [a.ref for a in tta.adapters().adapters] == ["shades@v1"]


def test_the_async_client_does_the_same(served: str) -> None:
    images, labels = labelled_images()

    async def run() -> None:
        async with AsyncClient(served, timeout_s=PATIENCE_S) as tta:
            await tta.create_label_set("colours", list(COLOURS))
            long = await tta.finetune("colours", images, labels, "never", steps=LONG)
            queued = await tta.finetune("colours", images, labels, "shades", steps=2, batch_size=6)
            assert (await tta.cancel_job(long.id)).state == "cancelled"
            done = await tta.wait_job(queued.id, poll_s=0.05)
            assert done.state == "succeeded" and done.result is not None and done.result["adapter"] == "shades@v1"
            assert [j.id for j in await tta.jobs()] == [long.id, queued.id]
            assert (await tta.job(long.id)).state == "cancelled"

    asyncio.run(run())


def test_tta_train_trains_here_and_uploads_the_artifact(
    served: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = labelled_images()
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "photos" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / label / f"{i}.png").write_bytes(data)
    # The model the server runs, named as the server's settings name it.
    monkeypatch.setenv("TTA_MODEL", str(settings.model))
    monkeypatch.setenv("TTA_DEVICE", "cpu")
    artifact = tmp_path / "kept.safetensors"
    args = ["--server", served, "train", str(tmp_path / "photos"), "--name", "local", "--steps", "3"]
    result = CliRunner().invoke(main, [*args, "--output", str(artifact)])
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)
    assert (stored["ref"], stored["source"], stored["labels"]) == ("local@v1", "upload", sorted(COLOURS))
    assert artifact.is_file() and artifact.stat().st_size == stored["bytes"]
    with Client(served, timeout_s=PATIENCE_S) as tta:
        answer = tta.classify([images[0]], labels=list(COLOURS), adapter="local@v1")
        assert answer.results[0].adapter is not None and answer.results[0].adapter.adapter == "local@v1"

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = CliRunner().invoke(main, ["--server", served, "train", str(empty), "--name", "none"])
    assert failed.exit_code != 0 and "training failed" in failed.output
