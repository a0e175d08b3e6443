"""`gradio`: a gradio share link (https://….gradio.live) for the app nbkit serves itself.

gradio's `networking.setup_tunnel` asks api.gradio.app for a share server, then runs gradio's `frpc`
helper, which it downloads on first use into the Hugging Face cache (`gradio/frpc/`), and reads the
link from frpc's output. Nothing in it needs a gradio app: it forwards any local port. Offline, the
request to api.gradio.app (or the download) fails; the message says what is missing and where to put
frpc by hand.
"""

from __future__ import annotations

import inspect
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from nbkit.errors import setting
from nbkit.tunnel.base import (
    DEFAULT_TIMEOUT,
    REOPEN,
    Tunnel,
    TunnelFailure,
    local_host,
    run_with_timeout,
    stop_process,
    tail,
)

FALLBACK = f"use another tunnel ({setting('tunnel', 'cloudflared')})"


def frpc_folder() -> Path:
    """Where gradio keeps its frpc helper (without importing gradio, which takes seconds)."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "gradio" / "frpc"


def _detail(error: BaseException) -> str:
    """One line for a gradio exception and its cause (gradio wraps the network error)."""
    text = tail(str(error).splitlines(), count=3) or type(error).__name__
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {tail(str(cause).splitlines(), count=2)})"
    return text


class GradioTunnel(Tunnel):
    """A gradio share link to any local port.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to.
        timeout: seconds to wait for the link (the first run includes frpc's download).
        share_server_address: a self-hosted FRP server `host:port` instead of gradio's (as gradio's
            `share_server_address`); its links are plain http.
    """

    provider = "gradio"
    option_names = ("share_server_address",)

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        share_server_address: str | None = None,
    ):
        super().__init__(port, host=host, timeout=timeout)
        self.share_server_address = share_server_address
        self._frpc: Any = None  # gradio.tunneling.Tunnel

    def describe(self) -> str:
        server = (
            f"the FRP server {self.share_server_address}"
            if self.share_server_address
            else "gradio's share servers (api.gradio.app hands out the address)"
        )
        return (
            f"gradio share link: runs gradio's frpc helper (downloaded on first use into {frpc_folder()}) "
            f"to forward {self.local_url} through {server}; the link https://<id>.gradio.live lasts up to a week"
        )

    def _open(self) -> str | None:
        try:
            from gradio import networking, tunneling
        except ImportError as e:
            raise TunnelFailure(
                f"gradio is not installed ({e})",
                f"Install nbkit's UI extra (`pip install 'nbkit[ui]'`), or {FALLBACK}",
            ) from e
        token = secrets.token_urlsafe(32)
        kwargs: dict[str, Any] = {
            "local_host": local_host(self.host),
            "local_port": self.port,
            "share_token": token,
            "share_server_address": self.share_server_address,
        }
        if "share_server_tls_certificate" in inspect.signature(networking.setup_tunnel).parameters:
            kwargs["share_server_tls_certificate"] = None  # gradio fills in its own for its servers

        def ours() -> Any:
            return next((t for t in reversed(tunneling.CURRENT_TUNNELS) if t.share_token == token), None)

        def check() -> None:
            # gradio's wait for frpc's link spins until its own 30 s timeout when frpc dies silently
            frpc = ours()
            code = frpc.proc.poll() if frpc is not None and frpc.proc is not None else None
            if code is not None:
                raise TunnelFailure(
                    f"gradio's frpc helper exited with code {code} before giving a link",
                    f"Check the runtime's internet connection and {REOPEN}, or {FALLBACK}",
                )

        try:
            address = run_with_timeout(
                lambda: networking.setup_tunnel(**kwargs),
                self.timeout,
                abandon=lambda: self._kill(ours(), tunneling),
                check=check,
            )
        except TunnelFailure:
            self._frpc = ours()  # stopped by open(); gradio's wait then ends on its own
            raise
        except TimeoutError as e:
            self._frpc = ours()
            raise TunnelFailure(
                f"no share link after {self.timeout:g} s, so it was stopped",
                f"Check the runtime's internet connection or https://status.gradio.app and {REOPEN}, or {FALLBACK}",
            ) from e
        except Exception as e:
            self._frpc = ours()
            raise self._explain(e, tunneling) from e
        self._frpc = frpc = ours()
        if frpc is not None and frpc.proc is not None:
            # gradio stops reading frpc's output once it has the link; a full pipe would stall frpc
            for stream, watch in ((frpc.proc.stdout, True), (frpc.proc.stderr, False)):
                if stream is not None:
                    threading.Thread(
                        target=self._drain, args=(frpc, frpc.proc, stream, watch), daemon=True
                    ).start()
        # as gradio's launch(): its own servers serve https, a custom one plain http
        scheme = "https" if self.share_server_address is None else "http"
        return urlunparse((scheme, *urlparse(address)[1:]))

    def _explain(self, error: Exception, tunneling: Any) -> TunnelFailure:
        from gradio import exceptions

        checksum = getattr(exceptions, "ChecksumMismatchError", ())
        certificate = getattr(exceptions, "ShareCertificateWriteError", ())
        binary = Path(tunneling.BINARY_PATH)
        if checksum and isinstance(error, checksum):
            return TunnelFailure(
                f"gradio's downloaded frpc helper failed its checksum ({binary})",
                f"Delete {binary} and {REOPEN} to download it again, or {FALLBACK}",
            )
        if certificate and isinstance(error, certificate):
            return TunnelFailure(
                f"gradio could not write its share-server certificate ({_detail(error)})",
                f"Start the UI from a writable folder (gradio writes .gradio/certificate.pem under it), or {FALLBACK}",
            )
        if not binary.exists():
            return TunnelFailure(
                f"could not set up a share link ({_detail(error)}); gradio downloads its frpc helper on first "
                f"use and it is not there yet ({binary})",
                f"Check the runtime's internet connection and {REOPEN}; without internet, download "
                f"{tunneling.BINARY_URL} on another machine, rename it to {tunneling.BINARY_FILENAME}, make it "
                f"executable and put it in {tunneling.BINARY_FOLDER}; or {FALLBACK}",
            )
        return TunnelFailure(
            f"could not create a share link ({_detail(error)})",
            f"Check the runtime's internet connection or https://status.gradio.app and {REOPEN}, or {FALLBACK}",
        )

    def _drain(self, frpc: Any, proc: Any, stream: Any, watch: bool) -> None:
        for _ in iter(stream.readline, b""):
            pass
        if watch and self._frpc is frpc:
            self._dropped(f"gradio's frpc helper exited with code {proc.wait()}")

    @staticmethod
    def _kill(frpc: Any, tunneling: Any) -> None:
        if frpc is None:
            return
        # take the process from gradio's handle first: its atexit kill() then has nothing to print
        proc, frpc.proc = frpc.proc, None
        if proc is not None:
            stop_process(proc)
        if frpc in tunneling.CURRENT_TUNNELS:
            tunneling.CURRENT_TUNNELS.remove(frpc)

    def _stop(self) -> None:
        frpc, self._frpc = self._frpc, None
        if frpc is not None:
            from gradio import tunneling

            self._kill(frpc, tunneling)

    def _running(self) -> bool:
        frpc = self._frpc
        proc = frpc.proc if frpc is not None else None
        return proc is not None and proc.poll() is None
