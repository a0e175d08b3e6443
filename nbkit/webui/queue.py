"""One GPU queue: every generation, from the UI or the API, runs on one worker thread, in order.

A GPU holds one model and runs one job at a time; two requests at once would only double the memory
and halve the speed of each. `GpuQueue` is a bounded FIFO in front of a single worker: a burst is
served in submission order, none lost, and a full queue refuses at once (`QueueFull`, HTTP 503 on the
API) instead of piling up requests a client has long given up on.

The worker holds the process's GPU lease (`nbkit.gpu`) while a job runs, so a training run in the same
runtime and the UI never use the GPU at the same time: a job submitted while training holds it is
refused with "training in progress".
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from nbkit import gpu
from nbkit.errors import NbkitError


class QueueFull(NbkitError):
    """The queue has `max_pending` jobs waiting (or training holds the GPU): try again later."""


class GpuQueue:
    """A bounded FIFO of jobs run one at a time on a worker thread.

    Args:
        max_pending: jobs that may wait besides the running one; one more is refused with `QueueFull`.
        name: the worker thread's name.
    """

    def __init__(self, max_pending: int = 16, *, name: str = "nbkit-gpu-queue"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.max_pending = max_pending
        self._jobs: queue.Queue[tuple[Future, Callable[[], Any]] | None] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._running = 0
        self._lock = threading.Lock()
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
                f"{holder} in progress: the GPU is busy", fix="wait for it to finish, then generate again"
            )
        future: Future = Future()
        try:
            self._jobs.put_nowait((future, job))
        except queue.Full:
            raise QueueFull(
                f"{self.max_pending} requests are already waiting", fix="wait for some to finish and retry"
            ) from None
        return future

    def run(self, job: Callable[[], Any], timeout: float | None = None) -> Any:
        """Queue `job` and wait for its result (what the API and the UI do)."""
        return self.submit(job).result(timeout)

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running > 0 or not self._jobs.empty()

    def close(self, timeout: float | None = 30) -> None:
        """Refuse new jobs, let the queued ones finish, and stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
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
