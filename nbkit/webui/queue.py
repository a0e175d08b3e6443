"""One GPU queue: every generation, from the UI or the API, runs on one worker thread, in order.

A GPU holds one model and runs one job at a time; two requests at once would only double the memory
and halve the speed of each. `GpuQueue` is a bounded FIFO in front of a single worker: a burst is
served in submission order, none lost, and a full queue refuses at once (`QueueFull`, HTTP 503 with
`Retry-After` on the API) instead of piling up requests a client has long given up on. A job still
waiting can be withdrawn (`GpuQueue.cancel`): the API withdraws the request of a client that
disconnected, so it never reaches the pipeline and frees its place at once.

The worker holds the process's GPU lease (`nbkit.gpu`) while a job runs, so a training run in the same
runtime and the UI never use the GPU at the same time: a job submitted while training holds it is
refused with "training in progress".
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from nbkit import gpu
from nbkit.errors import NbkitError

DEFAULT_MAX_PENDING = 64  # a client's burst (a batch script, a few browser tabs) fits
RETRY_AFTER_SECONDS = 5  # what a refused client is told to wait (HTTP `Retry-After`) when the queue is full
TRAINING_RETRY_AFTER_SECONDS = 60  # ... and while training holds the GPU


class QueueFull(NbkitError):
    """The queue has `max_pending` jobs waiting (or training holds the GPU): try again later.

    Args:
        message: what is busy.
        retry_after: seconds a client should wait before trying again.
        fix: what to do.
    """

    def __init__(self, message: str, *, retry_after: int = RETRY_AFTER_SECONDS, fix: str | None = None):
        super().__init__(message, fix=fix)
        self.retry_after = retry_after


class GpuQueue:
    """A bounded FIFO of jobs run one at a time on a worker thread.

    Args:
        max_pending: jobs that may wait besides the running one; one more is refused with `QueueFull`.
        name: the worker thread's name.
    """

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING, *, name: str = "nbkit-gpu-queue"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.max_pending = max_pending
        # A deque under a condition rather than a queue.Queue: a withdrawn job leaves it at once.
        self._jobs: collections.deque[tuple[Future, Callable[[], Any]]] = collections.deque()
        self._closed = False
        self._running = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name=name, daemon=True)
        self._worker.start()

    def submit(self, job: Callable[[], Any]) -> Future:
        """Queue `job` (a callable without arguments); its `Future` gives the result or the error.

        Raises:
            QueueFull: when `max_pending` jobs are already waiting, or a training run holds the GPU.
        """
        if self._closed:
            raise QueueFull("the web UI is shutting down", fix="start it again")
        holder = gpu.holder()
        if holder is not None and holder != gpu.GENERATION:
            raise QueueFull(
                f"{holder} in progress: the GPU is busy",
                retry_after=TRAINING_RETRY_AFTER_SECONDS,
                fix="wait for it to finish, then generate again",
            )
        future: Future = Future()
        with self._changed:
            if len(self._jobs) >= self.max_pending:
                raise QueueFull(
                    f"{self.max_pending} requests are already waiting",
                    fix="wait for some to finish and retry",
                )
            self._jobs.append((future, job))
            self._changed.notify()
        return future

    def cancel(self, future: Future) -> bool:
        """Withdraw a job that has not started; True when it will never run.

        A running job is not stopped (the service's interrupt does that); it returns False.
        """
        with self._changed:
            for item in self._jobs:
                if item[0] is future:
                    self._jobs.remove(item)
                    future.cancel()
                    return True
        return future.cancelled()

    def run(self, job: Callable[[], Any], timeout: float | None = None) -> Any:
        """Queue `job` and wait for its result (what the API and the UI do)."""
        return self.submit(job).result(timeout)

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._lock:
            return len(self._jobs)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running > 0 or bool(self._jobs)

    def close(self, timeout: float | None = 30) -> None:
        """Refuse new jobs, let the queued ones finish, and stop the worker."""
        if self._closed:
            return
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return  # closed, and every queued job has run
                future, job = self._jobs.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                self._running += 1
            try:
                with gpu.lease(gpu.GENERATION):
                    result = job()
            except BaseException as error:  # the caller gets every error through its Future
                future.set_exception(error)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._running -= 1
