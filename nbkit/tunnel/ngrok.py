"""`ngrok`: an ngrok tunnel through pyngrok (https://….ngrok-free.app); needs a free account's token.

The token comes from the `token` option, the NGROK_AUTHTOKEN or NGROK_TOKEN environment variable, or
Colab's secrets (`google.colab.userdata`, same key names) when running in Colab. It goes to pyngrok's
config only: never printed, logged or written by nbkit, and blanked out of any error message.

pyngrok downloads the ngrok agent on first use (into ~/.config/ngrok/ on Linux), starts it and asks its
local API for an http tunnel. Offline, the download fails (`PyngrokNgrokInstallError`) or, with the agent
present, the agent cannot reach ngrok's servers (`PyngrokNgrokError`); each becomes its own message.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from nbkit.errors import setting
from nbkit.secrets import find_secret
from nbkit.tunnel.base import DEFAULT_TIMEOUT, REOPEN, Tunnel, TunnelFailure, run_with_timeout, tail

TOKEN_NAMES = ("NGROK_AUTHTOKEN", "NGROK_TOKEN")
TOKEN_PAGE = "https://dashboard.ngrok.com/get-started/your-authtoken"
FALLBACK = f"use another tunnel ({setting('tunnel', 'cloudflared')})"


def find_token() -> tuple[str | None, str]:
    """The ngrok auth token and where it came from, or (None, why none was found): NGROK_AUTHTOKEN and
    NGROK_TOKEN in the environment, then Colab secrets of the same names (`nbkit.secrets`)."""
    return find_secret(TOKEN_NAMES)


class NgrokTunnel(Tunnel):
    """An ngrok http tunnel opened by pyngrok.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to.
        timeout: seconds to wait for the link (the first run includes the agent's download).
        token: the ngrok auth token (default: `find_token()`); never shown.
        region: ngrok region (`us`, `eu`, `ap`, ...); ngrok picks the nearest by default.
        domain: a static domain of the account (e.g. `name.ngrok-free.app`).
        ngrok_path: an ngrok binary to use instead of the one pyngrok downloads.
    """

    provider = "ngrok"
    option_names = ("token", "region", "domain", "ngrok_path")

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        region: str | None = None,
        domain: str | None = None,
        ngrok_path: str | None = None,
    ):
        super().__init__(port, host=host, timeout=timeout)
        self._token = token
        self._secret: str | None = token
        self.region = region
        self.domain = domain
        self.ngrok_path = ngrok_path
        self._config: Any = None  # pyngrok.conf.PyngrokConfig

    def describe(self) -> str:
        if self._token:
            where = "given as the token option"
        elif any(os.environ.get(name, "").strip() for name in TOKEN_NAMES):
            where = "from the environment (NGROK_AUTHTOKEN / NGROK_TOKEN)"
        else:
            where = "from NGROK_AUTHTOKEN / NGROK_TOKEN or the Colab secret NGROK_AUTHTOKEN (not in the environment now)"
        agent = (
            self.ngrok_path
            or os.environ.get("PYNGROK_NGROK_PATH")
            or "pyngrok's copy, downloaded on first use"
        )
        link = f"https://{self.domain}" if self.domain else "https://<id>.ngrok-free.app"
        region = f" in region {self.region}" if self.region else ""
        return (
            f"ngrok (pyngrok): starts the ngrok agent ({agent}) with your auth token {where} and opens an "
            f"http tunnel{region} to {self.local_url}; the link is {link}; free accounts show visitors a "
            "warning page once (API clients skip it with the header `ngrok-skip-browser-warning: 1`)"
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _open(self) -> str | None:
        token, source = (self._token, "the token option") if self._token else find_token()
        if not token:
            raise TunnelFailure(
                f"no auth token: {source}",
                "Set NGROK_AUTHTOKEN (or NGROK_TOKEN) in the environment or add it to Colab secrets (key "
                f"NGROK_AUTHTOKEN); a free account's token is at {TOKEN_PAGE}. Or {FALLBACK}",
            )
        self._secret = token
        try:
            from pyngrok import conf, exception, ngrok
        except ImportError as e:
            raise TunnelFailure(
                f"pyngrok is not installed ({e})",
                f"Install nbkit's UI extra (`pip install 'nbkit[ui]'`), or {FALLBACK}",
            ) from e
        config = conf.PyngrokConfig(
            auth_token=token,
            region=self.region,
            ngrok_path=self.ngrok_path,
            startup_timeout=max(1, int(self.timeout)),
        )
        self._config = config
        options: dict[str, Any] = {"url": f"https://{self.domain}"} if self.domain else {}
        try:
            tunnel = run_with_timeout(
                # an explicit name: pyngrok's default one is built from the address ("http-http://...")
                lambda: ngrok.connect(
                    self.local_url,
                    "http",
                    name=f"nbkit-{self.port}-{uuid.uuid4().hex[:8]}",
                    pyngrok_config=config,
                    **options,
                ),
                self.timeout,
                abandon=lambda: ngrok.kill(config),
            )
        except TimeoutError as e:
            raise TunnelFailure(
                f"no link after {self.timeout:g} s, so the agent was stopped",
                f"Check the runtime's internet connection and {REOPEN}, or {FALLBACK}",
            ) from e
        except exception.PyngrokError as e:
            raise self._explain(e, config, exception, source) from e
        return tunnel.public_url

    def _explain(self, error: Exception, config: Any, exception: Any, source: str) -> TunnelFailure:
        detail = self._scrub(tail(str(error).splitlines(), count=3))
        if isinstance(error, exception.PyngrokNgrokInstallError):
            return TunnelFailure(
                f"could not download the ngrok agent, which pyngrok fetches on first use into "
                f"{config.ngrok_path} ({detail})",
                f"Check the runtime's internet connection and {REOPEN}; or install ngrok yourself and "
                f"set PYNGROK_NGROK_PATH (or the ngrok_path option) to it; or {FALLBACK}",
            )
        code = getattr(error, "ngrok_error_code", None)
        if code in ("ERR_NGROK_105", "ERR_NGROK_107"):
            return TunnelFailure(
                f"ngrok rejected the auth token from {source} ({code})",
                f"Copy the token again from {TOKEN_PAGE} into NGROK_AUTHTOKEN or the Colab secret, or {FALLBACK}",
            )
        if code == "ERR_NGROK_108":
            return TunnelFailure(
                f"this ngrok account already has an agent running elsewhere ({code}; free accounts get one)",
                "Stop the other one (https://dashboard.ngrok.com/agents, or the other runtime) and call "
                f"{REOPEN}, or {FALLBACK}",
            )
        return TunnelFailure(
            f"the ngrok agent could not open a tunnel ({detail})",
            f"Check the runtime's internet connection and {REOPEN}, or {FALLBACK}",
        )

    def _stop(self) -> None:
        config, self._config = self._config, None
        if config is not None:
            from pyngrok import ngrok

            # pyngrok runs one agent per binary; it belongs to this tunnel, and stopping it ends the link
            ngrok.kill(config)

    def _running(self) -> bool:
        config = self._config
        if config is None:
            return False
        from pyngrok import process

        return process.is_process_running(config.ngrok_path)
