"""`cloudflared`: a Cloudflare quick tunnel (https://….trycloudflare.com), no account needed.

`cloudflared tunnel --url http://127.0.0.1:PORT` asks api.trycloudflare.com for a random hostname,
prints it in a box on stderr, then registers its connections; the link may need a few seconds more to
answer. Offline it logs "failed to request quick Tunnel" and exits, which `explain_exit` turns into
the reason.
"""

from __future__ import annotations

import re

from nbkit.errors import setting
from nbkit.tunnel.base import DEFAULT_TIMEOUT, REOPEN, ProcessTunnel, TunnelFailure, tail

# api.trycloudflare.com appears in the error lines ("Post https://api.trycloudflare.com/tunnel"): not a link
URL_PATTERN = re.compile(r"https://(?!api\.)[a-z0-9][-a-z0-9]*\.trycloudflare\.com\b")
INSTALL = (
    "Get it from https://github.com/cloudflare/cloudflared/releases (on Colab or Linux x86-64: "
    "`wget -q -O /usr/local/bin/cloudflared "
    "https://github.com/cloudflare/cloudflared/releases/latest/download/cloudflared-linux-amd64 && "
    "chmod +x /usr/local/bin/cloudflared`), or pass binary=/path/to/cloudflared"
)


class CloudflaredTunnel(ProcessTunnel):
    """A quick tunnel run by the `cloudflared` binary.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to.
        timeout: seconds to wait for the link.
        binary: the cloudflared executable (a name on PATH or a path).
    """

    provider = "cloudflared"
    option_names = ("binary",)
    url_pattern = URL_PATTERN

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        binary: str = "cloudflared",
    ):
        super().__init__(port, host=host, timeout=timeout)
        self.binary = binary

    def command(self) -> list[str]:
        return [self.binary, "tunnel", "--no-autoupdate", "--url", self.local_url]

    def describe(self) -> str:
        return (
            f"cloudflared quick tunnel: runs `{' '.join(self.command())}`, which prints a "
            "https://<random words>.trycloudflare.com link (no account, no token; the link can take a few "
            "seconds to answer)"
        )

    def missing_binary(self, program: str) -> TunnelFailure:
        return TunnelFailure(
            f"the cloudflared binary was not found ({program!r} is not on PATH or not executable)",
            f"{INSTALL}; or use another tunnel ({setting('tunnel', self._fallback())})",
        )

    def explain_exit(self, code: int, log: list[str]) -> TunnelFailure:
        text = "\n".join(log)
        if "429" in text or "Too Many Requests" in text:
            reason = "trycloudflare.com refused a new quick tunnel for now (429 Too Many Requests)"
            fix = f"Wait a minute and {REOPEN}, or use another tunnel ({setting('tunnel', 'gradio')})"
        elif "failed to request quick Tunnel" in text or "dial tcp" in text or "no such host" in text:
            reason = f"could not reach api.trycloudflare.com, no internet? (cloudflared exited with code {code}: {tail(log, 2)})"
            fix = f"Check the runtime's internet connection and {REOPEN}, or use another tunnel ({setting('tunnel', 'gradio')})"
        else:
            return super().explain_exit(code, log)
        return TunnelFailure(reason, fix)

    def after_open(self, url: str) -> None:
        self.note = "cloudflared quick tunnels can take a few seconds to answer after the link appears"
