"""`none`: no public link; the UI is reachable on its local URL only."""

from __future__ import annotations

from nbkit.tunnel.base import Tunnel


class NoTunnel(Tunnel):
    """No tunnel: `public_url` and `error` stay None."""

    provider = "none"

    def describe(self) -> str:
        return f"no tunnel: the UI is reachable only at {self.local_url} (this machine, or the notebook's own port forwarding)"

    def _open(self) -> str | None:
        return None

    def _running(self) -> bool:
        return False
