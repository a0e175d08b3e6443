"""The one-slot cache that holds a loaded pipeline, for `load_session_pipeline` and the web UI's service.

A notebook GPU has room for one model (a T4 holds one SDXL), so the cache holds one pipeline: asking
for another frees the one it holds first, CUDA's cached blocks included (`nbkit.device.free_memory`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from nbkit.device import free_memory


class PipelineCache:
    """One loaded pipeline, the key it was loaded for, and what it is (an `ExportedModel`, a `ModelEntry`).

    Thread-safe: `get` and `release` take a lock, so two threads never load at once.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._key: Hashable | None = None
        self._pipeline: Any = None
        self._loaded: Any = None

    @property
    def pipeline(self) -> Any:
        """The cached pipeline, or None."""
        return self._pipeline

    @property
    def loaded(self) -> Any:
        """What the cached pipeline is (the `loaded` given to `get`), or None."""
        return self._loaded if self._pipeline is not None else None

    def get(self, key: Hashable, loader: Callable[[], Any], loaded: Any = None) -> Any:
        """The pipeline cached for `key`, or the one `loader()` makes once the cached one is freed.

        Args:
            key: what the pipeline is loaded from (equal keys: the same pipeline).
            loader: loads and places the pipeline; when it raises, the cache stays empty.
            loaded: what `loaded` reports for it (None: `key`).
        """
        with self._lock:
            if self._pipeline is not None and self._key == key:
                return self._pipeline
            if self._pipeline is not None:
                self.release()
            pipeline = loader()
            self._key, self._pipeline, self._loaded = key, pipeline, key if loaded is None else loaded
            return pipeline

    def release(self) -> None:
        """Drop the cached pipeline and give its memory back (CUDA included)."""
        with self._lock:
            self._key = self._pipeline = self._loaded = None
            free_memory()
