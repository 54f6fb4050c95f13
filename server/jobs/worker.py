"""``python -m server.jobs.worker --job ID``: run one training job in a process of its own, then exit.

The server's job runner (``server.service.job_runner``) starts it with the server's settings in the
environment, after marking the job ``running``. The worker opens the same store (the SQLite file of the
data directory, in WAL mode, or the PostgreSQL of ``TTA_DATABASE_URL``), loads the same model and
measures its fingerprint, trains (``server.service.training``) while writing progress to the job (at most
every ``PROGRESS_EVERY_S``, and always the first and the last step), publishes the adapter through the
registry's checks (``server.service.adapters.publish``: the record and its bytes in one store call, with
``job:<id>`` as its source) and marks the job ``succeeded`` with ``{"adapter": "name@vN"}``. An error
marks it ``failed`` with the message. SIGTERM (a cancel, or the server closing) stops it between steps
without writing an end: the runner, which knows why it asked, writes ``cancelled`` or ``failed``. A job
cancelled from elsewhere (another replica) is noticed at the next progress write.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import torch

from adapters import Stopped
from server.clip.backbone import load_backbone
from server.clip.spec import resolve_model
from server.errors import ConfigError, TTAError
from server.logs import configure_logging
from server.service.adapters import publish
from server.service.training import TrainInputs, TrainPlan, train
from server.settings import Settings
from server.storage import Store, open_store

log = logging.getLogger("ttaserve.worker")

PROGRESS_EVERY_S = 0.25


class StopFlag:
    """Set by SIGTERM or by the job no longer being ``running``; asked between steps."""

    def __init__(self) -> None:
        self.requested = False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def check(self) -> None:
        if self.requested:
            raise Stopped("asked to stop")


class Reporter:
    """Writes the job's progress: stage, step, steps, loss, elapsed_s, eta_s and the worker's pid."""

    def __init__(self, store: Store, job_id: str, stop: StopFlag, every_s: float = PROGRESS_EVERY_S):
        self.store = store
        self.job_id = job_id
        self.stop = stop
        self.every_s = every_s
        self.progress: dict[str, Any] = {"pid": os.getpid()}
        self.last = -math.inf

    def stage(self, stage: str) -> None:
        self.progress["stage"] = stage
        self.write()

    def step(self, step: int, steps: int, loss: float, elapsed_s: float) -> None:
        now = time.monotonic()
        if step not in (1, steps) and now - self.last < self.every_s:
            return
        self.progress.update(
            step=step,
            steps=steps,
            loss=loss if math.isfinite(loss) else None,
            elapsed_s=round(elapsed_s, 3),
            eta_s=round(elapsed_s / step * (steps - step), 3),
        )
        self.write()

    def write(self) -> None:
        self.last = time.monotonic()
        job = self.store.update_job(self.job_id, progress=dict(self.progress))
        if job.state != "running":  # cancelled by a runner that is not our parent
            self.stop.requested = True


def finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """The metrics with NaN and infinities as None: JSON answers cannot carry them."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def run(store: Store, settings: Settings, job_id: str, stop: StopFlag) -> int:
    """Run the job; 0 when it ended (or was stopped), 1 when it failed."""
    job = store.job(job_id, owner=None)
    if job.state != "running":
        log.warning("job %s is %s, not running: nothing to do", job_id, job.state)
        return 0
    reporter = Reporter(store, job_id, stop)
    try:
        reporter.stage("loading the model")
        plan = TrainPlan.from_dict(job.spec)
        inputs = TrainInputs.from_bytes(store.job_inputs(job_id))
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        backbone = load_backbone(settings, resolve_model(settings))
        fingerprint = backbone.measure_fingerprint()
        stop.check()
        reporter.stage("training")
        adapter = train(backbone, plan, inputs, settings, progress=reporter.step, stop=stop)
        reporter.stage("publishing")
        stop.check()
        spec = job.spec
        record = publish(
            store,
            adapter.to_bytes(),
            spec["name"],
            fingerprint,
            owner=job.owner,
            group=spec.get("group"),
            source=f"job:{job_id}",
        )
        reporter.progress["stage"] = "done"
        store.update_job(
            job_id,
            state="succeeded",
            progress=dict(reporter.progress),
            result={"adapter": record.ref, "metrics": finite(adapter.card.metrics)},
        )
        log.info("job %s: published %s", job_id, record.ref)
        return 0
    except Stopped as exc:
        log.info("job %s stopped: %s", job_id, exc)
        return 0
    except (TTAError, ConfigError) as exc:
        message = exc.message if isinstance(exc, TTAError) else str(exc)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
    store.update_job(job_id, state="failed", error=message)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.jobs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--job", required=True, help="The id of a running job to train.")
    args = parser.parse_args(argv)
    settings = Settings(_env_file=None)  # the runner passes everything in the environment
    configure_logging(settings.log_level, settings.log_format)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.on_signal)
    store = open_store(settings)
    try:
        return run(store, settings, args.job, stop)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
