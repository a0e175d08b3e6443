"""`localtunnel`: `npx localtunnel --port PORT` (https://….loca.lt), no account needed.

npm fetches the localtunnel package on first use (`--yes` skips npx's "Ok to proceed?" prompt, which
would otherwise wait forever on a closed stdin), then the client prints `your url is: https://….loca.lt`.

loca.lt shows a browser visiting a link for the first time a "tunnel password" page; the password is
the public IP address of the machine running the client, which https://loca.lt/mytunnelpassword tells
that machine. As the older notebooks did, it is looked up and shown with the link (`Tunnel.note`).
API clients skip that page by sending a `bypass-tunnel-reminder` header.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.request

from nbkit.errors import setting
from nbkit.tunnel.base import DEFAULT_TIMEOUT, REOPEN, ProcessTunnel, TunnelFailure, local_host, tail

URL_PATTERN = re.compile(r"your url is: (https?://\S+)", re.IGNORECASE)
PASSWORD_URL = "https://loca.lt/mytunnelpassword"
# npm's and node's words for "the network is not there"
OFFLINE_MARKERS = ("EAI_AGAIN", "ENOTFOUND", "ENETUNREACH", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET")


def fetch_tunnel_password(timeout: float = 5.0) -> str | None:
    """This machine's public IP as loca.lt sees it (the tunnel password), or None if it cannot be had."""
    try:
        with urllib.request.urlopen(PASSWORD_URL, timeout=timeout) as response:
            text = response.read(100).decode("ascii", "replace").strip()
        ipaddress.ip_address(text)  # anything else is an error page, not a password
    except (OSError, ValueError):
        return None
    return text


class LocaltunnelTunnel(ProcessTunnel):
    """A localtunnel client run through npx.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to.
        timeout: seconds to wait for the link (the first run includes npm's download).
        npx: the npx executable (a name on PATH or a path).
        subdomain: ask loca.lt for this subdomain (granted only when free).
        fetch_password: look up the tunnel password (the public IP) once the link is up.
    """

    provider = "localtunnel"
    option_names = ("npx", "subdomain", "fetch_password")
    url_pattern = URL_PATTERN

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        npx: str = "npx",
        subdomain: str | None = None,
        fetch_password: bool = True,
    ):
        super().__init__(port, host=host, timeout=timeout)
        if subdomain is not None and not re.fullmatch(r"[a-z0-9][-a-z0-9]{2,62}", subdomain):
            raise ValueError(
                f"localtunnel subdomain {subdomain!r}: use 3-63 lowercase letters, digits or '-'"
            )
        self.npx = npx
        self.subdomain = subdomain
        self.fetch_password = fetch_password

    def command(self) -> list[str]:
        argv = [
            self.npx,
            "--yes",
            "localtunnel",
            "--port",
            str(self.port),
            "--local-host",
            local_host(self.host),
        ]
        if self.subdomain:
            argv += ["--subdomain", self.subdomain]
        return argv

    def describe(self) -> str:
        return (
            f"localtunnel: runs `{' '.join(self.command())}` (npm downloads the localtunnel package on first "
            "use), which prints a https://<name>.loca.lt link; visitors are asked once for the tunnel "
            "password, which is this runtime's public IP address (shown with the link)"
        )

    def missing_binary(self, program: str) -> TunnelFailure:
        return TunnelFailure(
            f"npx (Node.js) was not found ({program!r} is not on PATH or not executable)",
            "Install Node.js with npm (on Colab or Debian: `apt-get install -y nodejs npm`), "
            f"or use another tunnel ({setting('tunnel', self._fallback())})",
        )

    def explain_exit(self, code: int, log: list[str]) -> TunnelFailure:
        text = "\n".join(log)
        if "npm ERR" in text or "npm error" in text:
            where = "download the localtunnel package from npm"
        else:
            where = "reach the localtunnel server (localtunnel.me)"
        if any(marker in text for marker in OFFLINE_MARKERS):
            reason = f"could not {where}, no internet? (exit code {code}: {tail(log, 3)})"
        else:
            reason = f"npx localtunnel exited with code {code} before printing a link ({tail(log, 3)})"
        return TunnelFailure(
            reason,
            "localtunnel's free server is often overloaded. Check the runtime's internet connection and "
            f"{REOPEN}, or use another tunnel ({setting('tunnel', self._fallback())})",
        )

    def after_open(self, url: str) -> None:
        password = fetch_tunnel_password() if self.fetch_password else None
        if password:
            self.note = (
                f"localtunnel asks each new visitor for a tunnel password: enter {password} "
                "(this runtime's public IP address). API clients skip that page with the header "
                "`bypass-tunnel-reminder: 1`"
            )
        else:
            self.note = (
                "localtunnel asks each new visitor for a tunnel password: it is this runtime's public IP "
                f"address, which {PASSWORD_URL} shows when opened from this runtime (e.g. `!curl {PASSWORD_URL}`). "
                "API clients skip that page with the header `bypass-tunnel-reminder: 1`"
            )
