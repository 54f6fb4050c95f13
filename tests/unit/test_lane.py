"""A lane's batching: the first waiting job, then the ones that fit it, within the image limit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading

import torch

from adapters import get_method
from server.engine.lane import Lane
from server.engine.work import Job, Work
from server.errors import ClientClosed


def job(loop: asyncio.AbstractEventLoop, method: str, n_images: int) -> Job:
    m = get_method(method)
    work = Work(torch.zeros(n_images, 3, 4, 4), ("a", "b"), ("{}",), m, m.parse_options({}))
    return Job(work, loop.create_future(), loop, deadline=float("inf"), adapts=True)


def test_batches_take_what_fits_the_first_job_within_the_limit():
    loop = asyncio.new_event_loop()
    cond = threading.Condition()
    batches: list[list[Job]] = []
    done = threading.Event()

    def run(batch: list[Job]) -> None:
        batches.append(batch)
        if sum(len(b) for b in batches) == 5:
            done.set()

    lane = Lane(
        "test",
        cond,
        run,
        limit=lambda: 4,
        delay_s=lambda: 0.0,
        fits=lambda first, other: other.work.method is first.work.method,
    )
    a, b, c, d, e = (
        job(loop, "tpt", 2),
        job(loop, "zero", 1),
        job(loop, "tpt", 3),
        job(loop, "tpt", 2),
        job(loop, "zero", 4),
    )
    with cond:
        for j in (a, b, c, d, e):
            lane.put(j)
    lane.start()
    assert done.wait(60)
    with cond:
        assert lane.stop() == []
    lane.join(60)
    loop.close()
    # a leads; c (3 images) does not fit beside it, d (2) does. b leads the next, e (4) does not fit beside it.
    assert batches == [[a, d], [b], [c], [e]]


def test_an_error_set_after_the_caller_stopped_waiting_is_not_reported_as_never_retrieved(caplog):
    # The engine's caller waits through asyncio.shield; when it is cancelled (the client went away) the shield
    # lets go of the job's future, and the lane fails the job later, from its own thread.
    loop = asyncio.new_event_loop()
    stopped = job(loop, "tpt", 1)

    async def caller_goes_away(stopped: Job) -> None:
        waiting = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(stopped.future), timeout=60))
        await asyncio.sleep(0)  # let the wait begin
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        lane = threading.Thread(target=stopped.fail, args=(ClientClosed("the client closed the connection"),))
        lane.start()
        lane.join()
        while not stopped.future.done():
            await asyncio.sleep(0)

    loop.run_until_complete(caller_goes_away(stopped))
    loop.close()
    del stopped
    gc.collect()
    assert "never retrieved" not in caplog.text
