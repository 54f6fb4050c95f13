"""The job supervisor of a server process: queued jobs run one at a time (``TTA_JOB_WORKERS``), each in a worker
process of its own (``python -m server.jobs.worker --job ID``), so a crash or a leak in training cannot take
the server down.

The runner marks a job ``running`` and starts its worker with the server's settings in the environment;
the worker opens the same store, reports progress and writes the job's end itself (``succeeded`` with the
adapter it published, or ``failed`` with the error). The runner watches each worker's exit: a worker that
ends without having written an end (killed, crashed, out of memory) fails its job, naming the exit code
or signal. Cancelling a running job sends its worker SIGTERM (it stops between steps; SIGKILL after
``STOP_GRACE_S``) and marks it ``cancelled``; nothing is published. At start, jobs another server left
``running`` are failed (their worker died with it); at close, running workers are stopped and their
jobs failed as interrupted. An adapter is published in one store call with its job's id as its
source, so a worker killed between publishing and writing ``succeeded`` still ends its job succeeded.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from server.errors import Conflict
from server.settings import Settings
from server.storage import Store
from server.storage.base import JOB_FINAL, JobRecord

log = logging.getLogger("ttaserve.jobs")

POLL_S = 2.0  # how often the runner looks for queued jobs it was not told of (another replica's submissions)
STOP_GRACE_S = 10.0  # how long a worker asked to stop (SIGTERM) may take before it is killed
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the server package, for the worker's imports
RESTARTED = "interrupted by a server restart; submit it again"
SHUT_DOWN = "interrupted: the server shut down while it ran; submit it again"

Command = Callable[[str], list[str]]


def worker_command(job_id: str) -> list[str]:
    return [sys.executable, "-m", "server.jobs.worker", "--job", job_id]


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker: this process's, with every ``TTA_`` variable replaced by the settings in
    force (flags and ``.env`` included), so the worker loads the same model and opens the same store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"TTA_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"the worker exited with signal {name} (killed: out of memory, or by someone); see the server log"
    if code == 0:
        return "the worker exited without finishing the job; see the server log"
    return f"the worker exited with code {code}; see the server log"


def published_by(store: Store, job: JobRecord) -> str | None:
    """The adapter (``name@vN``) a job published, if it did."""
    source = f"job:{job.id}"
    return next((r.ref for r in store.list_adapters(job.owner) if r.source == source), None)


@dataclass(eq=False)
class Run:
    """A worker process and why it may be stopped."""

    job_id: str
    process: subprocess.Popen[bytes]
    cancelled: bool = False
    interrupted: bool = False
    done: threading.Event = field(default_factory=threading.Event)  # set once the job's end is written


class JobRunner:
    """Starts the workers of queued jobs, at most ``TTA_JOB_WORKERS`` at a time, and writes the end of those
    that die."""

    def __init__(self, store: Store, settings: Settings, command: Command = worker_command):
        self.store = store
        self.settings = settings
        self.command = command
        self._cond = threading.Condition()
        self._running: dict[str, Run] = {}
        self._watchers: list[threading.Thread] = []
        self._woken = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Fail what a previous server left running, then run queued jobs (none with TTA_JOB_WORKERS=0)."""
        if self.settings.job_workers == 0:
            return
        for job in self.store.list_jobs(None, ("running",)):
            self._end(job, RESTARTED)
        self._thread = threading.Thread(target=self._loop, name="tta-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                room = self.settings.job_workers - len(self._running)
            try:
                if room > 0:
                    for job in self.store.list_jobs(None, ("queued",))[:room]:
                        self._launch(job.id)
            except Exception:  # the store is unreachable now: try again at the next poll
                log.exception("could not start queued jobs")
            with self._cond:
                self._cond.wait_for(lambda: self._woken or self._closed, timeout=POLL_S)
                self._woken = False

    def _launch(self, job_id: str) -> None:
        with self._cond:
            if self._closed or job_id in self._running:
                return
            job = self.store.job(job_id, owner=None)
            if job.state != "queued":  # cancelled meanwhile
                return
            self.store.update_job(job_id, state="running", progress={"stage": "starting"})
            try:
                process = subprocess.Popen(
                    self.command(job_id), env=worker_env(self.settings), cwd=ROOT, start_new_session=True
                )
            except OSError as exc:
                self.store.update_job(job_id, state="failed", error=f"the worker could not start: {exc}")
                return
            log.info("job %s: worker %d started", job_id, process.pid)
            run = Run(job_id, process)
            self._running[job_id] = run
            watcher = threading.Thread(target=self._watch, args=(run,), name=f"tta-job-{job_id[:8]}", daemon=True)
            self._watchers.append(watcher)
            watcher.start()

    def _watch(self, run: Run) -> None:
        code = run.process.wait()
        try:
            job = self.store.job(run.job_id, owner=None)
            if job.state not in JOB_FINAL:
                if run.cancelled and published_by(self.store, job) is None:
                    self.store.update_job(job.id, state="cancelled")
                else:
                    self._end(job, SHUT_DOWN if run.interrupted else exit_reason(code))
            log.info("job %s: worker %d exited with %d", run.job_id, run.process.pid, code)
        except Exception:
            log.exception("job %s: could not record the end of its worker", run.job_id)
        finally:
            with self._cond:
                self._running.pop(run.job_id, None)
                run.done.set()
                self._woken = True
                self._cond.notify_all()

    def _end(self, job: JobRecord, reason: str) -> None:
        """End a job whose worker is gone: succeeded if it published its adapter, else failed for ``reason``."""
        ref = published_by(self.store, job)
        if ref is not None:
            self.store.update_job(job.id, state="succeeded", result={"adapter": ref})
        else:
            log.warning("job %s failed: %s", job.id, reason)
            self.store.update_job(job.id, state="failed", error=reason)

    def cancel(self, job_id: str, owner: str) -> JobRecord:
        """Cancel ``owner``'s job: a queued one never starts, a running one's worker is stopped; 409 once it ended."""
        with self._cond:
            job = self.store.job(job_id, owner)
            if job.state in JOB_FINAL:
                raise Conflict(f"job {job_id} already {job.state}: there is nothing to cancel", code="job_finished")
            run = self._running.get(job_id)
            if run is None:  # queued, or running under another replica's runner (its worker sees this and stops)
                return self.store.update_job(job_id, state="cancelled")
            run.cancelled = True
            run.process.terminate()
        self._stop(run)
        return self.store.job(job_id, owner)

    def _stop(self, run: Run) -> None:
        if not run.done.wait(STOP_GRACE_S):
            pid = run.process.pid
            log.warning("job %s: worker %d ignored SIGTERM for %g s; killing it", run.job_id, pid, STOP_GRACE_S)
            run.process.kill()
            run.done.wait(STOP_GRACE_S)

    def close(self) -> None:
        """Stop taking jobs; stop every running worker (its job fails as interrupted) and wait for them."""
        with self._cond:
            self._closed = True
            runs = list(self._running.values())
            for run in runs:
                run.interrupted = True
                run.process.terminate()
            self._cond.notify_all()
        for run in runs:
            self._stop(run)
        if self._thread is not None:
            self._thread.join()
        for watcher in self._watchers:
            watcher.join(STOP_GRACE_S)
