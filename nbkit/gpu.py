"""The process's GPU lease: training and generation never run on the GPU at the same time.

A notebook runtime has one GPU. A training run holds the lease for its whole length; the web UI's
queue takes it for each job. Whoever asks while the other holds it learns who ("training") at once,
so the UI can say "training in progress" instead of both running out of memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from nbkit.errors import NbkitError

TRAINING = "training"
GENERATION = "generation"

_lock = threading.Lock()
_holder: str | None = None


def holder() -> str | None:
    """Who holds the lease now (`training`, `generation`), or None."""
    return _holder


@contextlib.contextmanager
def lease(purpose: str, *, wait: bool = True) -> Iterator[None]:
    """Hold the GPU for `purpose`.

    Args:
        purpose: `training` or `generation` (said to whoever has to wait).
        wait: block until the lease is free; when False, raise at once if it is held.

    Raises:
        NbkitError: with `wait=False`, when another purpose holds the lease.
    """
    global _holder
    if not _lock.acquire(blocking=wait):
        raise NbkitError(
            f"the GPU is busy with {_holder or 'another job'}",
            fix="wait for it to finish (or stop the web UI's generation) and try again",
        )
    _holder = purpose
    try:
        yield
    finally:
        _holder = None
        _lock.release()
