"""`auto`: the first provider that gives a link, and the next one when it fails or cannot come back.

`AUTO_ORDER` is the one place the order is stated:

1. gradio: needs nothing beyond the UI's own gradio package (frpc is downloaded on first use);
2. cloudflared: no account, but needs the cloudflared binary;
3. localtunnel: no account, but needs Node.js (npx) and shows visitors a tunnel-password page;
4. ngrok: only when an auth token is present (the token option, NGROK_AUTHTOKEN / NGROK_TOKEN, or
   Colab secrets), since without one it cannot work.

`open()` tries them in that order and keeps the first link. When that link drops, `recover()` (what
the `Watchdog` calls) reopens the same provider first, so a working provider keeps serving, and only
when that fails goes on to the next ones in order, wrapping around to those before it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nbkit.tunnel.base import DEFAULT_TIMEOUT, Tunnel, TunnelFailure
from nbkit.tunnel.cloudflared import CloudflaredTunnel
from nbkit.tunnel.gradio_share import GradioTunnel
from nbkit.tunnel.localtunnel import LocaltunnelTunnel
from nbkit.tunnel.ngrok import NgrokTunnel

AUTO_ORDER: tuple[str, ...] = ("gradio", "cloudflared", "localtunnel", "ngrok")
NEEDS_TOKEN = "ngrok"  # tried only when it has a token
logger = logging.getLogger("nbkit.tunnel")


def _providers() -> dict[str, type[Tunnel]]:
    from nbkit.tunnel import PROVIDERS  # looked up when used, so a test can register its own

    return PROVIDERS


def _has_token(options: dict[str, Any]) -> bool:
    from nbkit.tunnel.ngrok import find_token

    return bool(options.get("token")) or find_token()[0] is not None


class AutoTunnel(Tunnel):
    """The first provider of `order` that opens, with fallback to the next ones when it fails later.

    `public_url`, `error` and `note` are the current provider's; `active` names it.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to.
        timeout: seconds to wait for each provider's link.
        order: the providers to try, in order (default `AUTO_ORDER`).
        **options: the providers' own options; each goes to the provider that takes it (`token` to
            ngrok, `binary` to cloudflared, ...).
    """

    provider = "auto"
    # its own `order`, and every provider's options (each goes to the provider that takes it)
    option_names = (
        "order",
        *dict.fromkeys(
            name
            for cls in (GradioTunnel, CloudflaredTunnel, LocaltunnelTunnel, NgrokTunnel)
            for name in cls.option_names
        ),
    )

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        order: tuple[str, ...] | list[str] | None = None,
        **options: Any,
    ):
        self.current: Tunnel | None = None
        self._opening: Tunnel | None = None  # the provider being opened, so close() reaches it
        super().__init__(port, host=host, timeout=timeout)
        names = tuple(AUTO_ORDER if order is None else order)
        valid = [name for name in _providers() if name not in ("none", "auto")]
        bad = [name for name in names if name not in valid]
        if bad or not names:
            raise ValueError(f"tunnel order {list(names)!r}: use some of {', '.join(valid)}")
        self.order = names
        self._options = options
        self._last: str | None = None  # the provider that gave the last link

    # The current provider's link is the link: a drop its reader thread notices shows at once.
    @property
    def public_url(self) -> str | None:  # type: ignore[override]
        current = self.current
        return current.public_url if current is not None else None

    @public_url.setter
    def public_url(self, value: str | None) -> None:
        pass  # set through `current`

    @property
    def active(self) -> str | None:
        """The provider whose link is up, or None."""
        current = self.current
        return current.provider if current is not None and current.public_url else None

    @property
    def alive(self) -> bool:
        current = self.current
        if current is None:
            return False
        if current.alive:
            return True
        self.error = current.error
        return False

    def describe(self) -> str:
        steps = []
        for name in self.order:
            when = " (only with an auth token)" if name == NEEDS_TOKEN else ""
            steps.append(f"{name}{when}: {self._make(name).describe()}")
        return (
            "auto: tries these providers in order and keeps the first link; when it drops, reopens the "
            "same provider, then falls back to the next ones:\n- " + "\n- ".join(steps)
        )

    def recover(self, cancel: threading.Event | None = None) -> str | None:
        """Reopen the current (or last) provider; when that fails, the next ones in order."""
        with self._lock:
            self._closing = threading.Event()  # a close() from now on stops this recovery
            start = self.order.index(self._last) if self._last in self.order else 0
            names = self.order[start:] + self.order[:start]
            self.error = None
            try:
                self._first_link(names, cancel)
            except TunnelFailure as e:
                self.error = f"{self.provider}: {e}"
            return self.public_url

    def _make(self, name: str) -> Tunnel:
        cls = _providers()[name]
        options = {key: value for key, value in self._options.items() if key in cls.option_names}
        return cls(self.port, host=self.host, timeout=self.timeout, **options)

    def _open(self) -> str | None:
        return self._first_link(self.order, None)

    def _first_link(self, names: tuple[str, ...], cancel: threading.Event | None) -> str:
        failures = []
        for name in names:
            if cancel is not None and cancel.is_set():
                failures.append("stopped: the UI is closing")
                break
            if name == NEEDS_TOKEN and not _has_token(self._options):
                failures.append(f"{name}: skipped, no auth token")
                continue
            self._quiet_stop()
            tunnel = self._opening = self._make(name)
            # `_opening` (then `current`) is set before `_closing` is checked: a close() on another
            # thread either finds the provider there and closes it, or is seen here
            url = None
            try:
                if not self._closing.is_set():
                    url = tunnel.open()
                if url:
                    self.current = tunnel
            finally:
                self._opening = None
            if self._closing.is_set():
                self._quiet_stop()
                tunnel.close()
                failures.append("stopped: closed while opening")
                break
            if url:
                self._last = name
                self.note = tunnel.note
                if failures:
                    logger.info("tunnel: %s gave a link after %s", name, "; ".join(failures))
                return url
            logger.info("tunnel: %s", tunnel.error)
            # each provider's reason only: its own advice (another provider, reopen) is moot here
            failures.append(
                f"{name}: {tunnel.reason}" if tunnel.reason else tunnel.error or f"{name}: no link"
            )
        raise TunnelFailure(
            "no provider gave a link (" + "; ".join(failures) + ")",
            "The UI is up on its local URL; check the runtime's internet connection, or pick one "
            "provider (--tunnel NAME, or UI_TUNNEL in the notebook) to see its own advice",
        )

    def _stop(self) -> None:
        for attr in ("_opening", "current"):
            tunnel = getattr(self, attr)
            setattr(self, attr, None)
            if tunnel is not None:
                tunnel.close()

    def _running(self) -> bool:
        current = self.current
        return current is not None and current.alive
