"""Model work other than serving requests (prompt-tuning conversion at upload today; a warm-up or an evaluation
tomorrow), run on the engine's thread between two steps, so nothing uses the model beside a forward.

`Engine.run_exclusive(work)` queues `work` and returns a `concurrent.futures.Future`: await it from asyncio with
`asyncio.wrap_future`, or block on `.result()` from a worker thread. The engine runs what is queued at the start of
its next step (before admitting requests; it wakes up for a job when idle) and counts each job and its seconds in
its stats (`prefixserve_engine_jobs`, `prefixserve_engine_job_seconds` in /metrics). A job that raises fails its
own future only; jobs still queued when the engine stops or dies fail with EngineStopped.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ModelJobs:
    """The queue of model jobs; the engine adds and takes under its own lock and runs them on its thread."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[[], Any], Future]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, work: Callable[[], Any]) -> Future:
        """Queue `work`; its future gets the result or the exception."""
        fut: Future = Future()
        self._queue.append((work, fut))
        return fut

    def take(self) -> list[tuple[Callable[[], Any], Future]]:
        """Everything queued, in order (the queue is left empty)."""
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    @staticmethod
    def run(jobs: list[tuple[Callable[[], Any], Future]]) -> tuple[int, float]:
        """Run jobs one after another (a job its caller cancelled is skipped); return how many ran, in how long."""
        ran, seconds = 0, 0.0
        for work, fut in jobs:
            if not fut.set_running_or_notify_cancel():
                continue
            ran += 1
            t0 = time.perf_counter()
            try:
                result = work()
            except Exception as e:  # the job's own failure: its caller gets it, the engine goes on
                logger.info("model job failed: %s: %s", type(e).__name__, e)
                fut.set_exception(e)
            else:
                fut.set_result(result)
            seconds += time.perf_counter() - t0
        return ran, seconds

    @staticmethod
    def fail(jobs: list[tuple[Callable[[], Any], Future]], error: BaseException) -> None:
        """Fail jobs that will not run (the engine is stopping or has died)."""
        for _, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
