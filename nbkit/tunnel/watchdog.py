"""Keep a public link up while the UI runs: check it every so often, get it back when it drops.

A Colab user away from the notebook should come back to a working link. `Watchdog` checks its tunnel
every `interval` seconds on a daemon thread: the provider's process must be alive and, with a `probe`,
a request through the public URL must reach the UI (a few misses in a row count as a drop, so one
slow answer does not change the link). A dropped or failed link is `recover()`ed: the same provider
reopened, and for `auto` the next providers after that. While nothing works it retries, waiting twice
as long each time up to `max_interval`. Every change of the link goes to `on_change` and the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from nbkit.tunnel.base import Tunnel

DEFAULT_INTERVAL = 30.0
MAX_INTERVAL = 600.0
logger = logging.getLogger("nbkit.tunnel")


class Watchdog:
    """Checks a tunnel's link on a thread and recovers it when it drops.

    Args:
        tunnel: the open (or failed) tunnel to look after.
        interval: seconds between checks while the link is up.
        probe: `probe(public_url) -> bool`, whether a request through the link reaches the UI; None
            checks only that the provider still runs.
        misses: failed probes in a row that count as a drop.
        on_change: called with the new public URL (None when there is none) each time it changes.
        max_interval: the longest wait between tries while no provider gives a link.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        *,
        interval: float = DEFAULT_INTERVAL,
        probe: Callable[[str], bool] | None = None,
        misses: int = 3,
        on_change: Callable[[str | None], None] | None = None,
        max_interval: float = MAX_INTERVAL,
    ):
        if not interval > 0 or misses < 1:
            raise ValueError(f"watchdog interval {interval!r} and misses {misses!r}: use numbers above 0")
        self.tunnel = tunnel
        self.interval = interval
        self.probe = probe
        self.misses = misses
        self.on_change = on_change
        self.max_interval = max(max_interval, interval)
        self.url = tunnel.public_url  # the link last announced
        self._missed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        """Start checking on a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nbkit-tunnel-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop checking. A recovery under way finishes on its thread and closes what it opened."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def check(self) -> str | None:
        """One check (what the thread does every interval): recover a dropped link, report a change.

        Returns the public URL after the check, or None.
        """
        tunnel = self.tunnel
        healthy = tunnel.alive
        if healthy and self.probe is not None:
            url = tunnel.public_url
            if url is not None and self._probe(url):
                self._missed = 0
            else:
                self._missed += 1
                healthy = self._missed < self.misses
                if not healthy:
                    logger.warning("tunnel: %s did not answer %d times in a row", url, self._missed)
        if not healthy:
            self._missed = 0
            if self.url is not None:
                # say that the link is gone before the (possibly long) recovery
                self._changed(None, tunnel.error or f"{tunnel.provider}: the public link stopped answering")
                tunnel.close()
            tunnel.recover(self._stop)
            if self._stop.is_set():
                tunnel.close()  # closing began meanwhile: leave nothing running
                return None
        url = tunnel.public_url
        if url != self.url:
            self._changed(url, tunnel.error)
        return url

    def _probe(self, url: str) -> bool:
        try:
            return bool(self.probe(url))  # type: ignore[misc]
        except Exception:  # a probe that breaks says nothing about the link
            logger.debug("tunnel probe failed", exc_info=True)
            return True

    def _changed(self, url: str | None, error: str | None) -> None:
        self.url = url
        if url is not None:
            logger.warning("tunnel: the public link is now %s", url)
        else:
            logger.warning("tunnel: no public link (%s); trying again in the background", error)
        if self.on_change is not None:
            try:
                self.on_change(url)
            except Exception:  # showing the link must not stop the watchdog
                logger.exception("tunnel: could not show the new link")

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                url = self.check()
            except Exception:  # the watchdog outlives any surprise; the UI never depends on it
                logger.exception("tunnel: the link check failed")
                url = self.tunnel.public_url
            # while nothing gives a link, try less and less often (each try may start processes)
            wait = self.interval if url is not None else min(wait * 2, self.max_interval)
