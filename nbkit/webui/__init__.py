"""nbkit's web UI: an AUTOMATIC1111-like gradio UI and A1111's REST API on one server.

`launch(...)` starts it (the notebook cells and `nbkit ui` call it) and returns a `WebUI` handle
with the local URL, the public URL when a tunnel is open, the login, and `close()`. The parts:
`service` (generation, no HTTP), `queue` (one GPU worker), `models`/`outputs` (what is offered and
saved), `api` (`/sdapi/v1`), `ui` (gradio Blocks), `security` (login, caps, file routes) and
`server` (uvicorn on a background thread).
"""

from __future__ import annotations

import contextlib
import html
import os
import signal
import sys
import threading
from typing import Any

from nbkit.compat import check_versions
from nbkit.tunnel import PROVIDERS, open_tunnel

TUNNELS = tuple(PROVIDERS)  # nbkit.tunnel's providers


class WebUI:
    """A running web UI (returned by `launch`).

    Attributes:
        local_url: the URL on this machine, e.g. `http://127.0.0.1:7860/`.
        public_url: the tunnel's URL, or None (no tunnel, or the tunnel failed: see `tunnel_error`).
        username: the login name, or None when no login is required.
        password: the password, or None when no login is required.
        tunnel: the `nbkit.tunnel` handle, or None.
        tunnel_error: why the tunnel is not open (provider, reason, what to try next), or None.
        service: the generation service.
        queue: the GPU queue.
    """

    def __init__(self, *, server, service, queue, credentials, tunnel=None, tunnel_error=None):
        self._server = server
        self.service = service
        self.queue = queue
        self._credentials = credentials
        self.tunnel = tunnel
        self.tunnel_error = tunnel_error
        self._closed = False

    @property
    def local_url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def public_url(self) -> str | None:
        return getattr(self.tunnel, "public_url", None) if self.tunnel is not None else None

    @property
    def username(self) -> str | None:
        return self._credentials.username if self._credentials else None

    @property
    def password(self) -> str | None:
        return self._credentials.password if self._credentials else None

    @property
    def running(self) -> bool:
        return not self._closed and self._server.running

    def __repr__(self) -> str:  # never the password: reprs end up in logs and saved notebooks
        public = f", public_url={self.public_url!r}" if self.public_url else ""
        return f"WebUI(local_url={self.local_url!r}{public}, login={'on' if self._credentials else 'off'})"

    def reopen_tunnel(self) -> str | None:
        """Ask the tunnel for a new public URL (the UI keeps running); returns it, or None."""
        if self.tunnel is None:
            return None
        url = self.tunnel.reopen()
        self.tunnel_error = getattr(self.tunnel, "error", None)
        announce(self)
        return url

    def wait(self) -> None:
        """Block until Ctrl+C (or SIGTERM), then close."""
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set() and self._server.running:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.close()

    def close(self) -> None:
        """Stop the tunnel, the server and the queue, and free the model."""
        if self._closed:
            return
        self._closed = True
        if self.tunnel is not None:
            with contextlib.suppress(Exception):
                self.tunnel.close()
        self.service.interrupt()
        self._server.close()
        self.queue.close(timeout=30)
        self.service.unload()
        from nbkit.webui.server import remove_private_gradio_dir

        remove_private_gradio_dir()


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def announce(ui: WebUI, file: Any = None) -> None:
    """Print the URLs and the login clearly (as links in a notebook)."""
    file = file or sys.stdout
    lines = [f"nbkit web UI running on local URL: {ui.local_url}"]
    if ui.public_url:
        lines.append(f"Public URL: {ui.public_url}")
    if ui.tunnel_error:
        lines.append(f"Tunnel not open: {ui.tunnel_error}")
    if ui.password is not None:
        lines.append(f"Login: user {ui.username!r}, password {ui.password!r}")
        lines.append(f"API: HTTP Basic with the same login ({ui.local_url}sdapi/v1/...)")
    else:
        lines.append("No login required (reachable from this machine only).")
    if _in_notebook():
        try:
            from IPython.display import HTML, display

            links = [f'<a href="{html.escape(ui.local_url)}" target="_blank">{html.escape(ui.local_url)}</a>']
            if ui.public_url:
                links.insert(
                    0,
                    f'<a href="{html.escape(ui.public_url)}" target="_blank"><b>{html.escape(ui.public_url)}</b></a>',
                )
            body = "<br>".join(links)
            if ui.tunnel_error:
                body += (
                    f"<br><span style='color:#b45309'>Tunnel not open: {html.escape(ui.tunnel_error)}</span>"
                )
            if ui.password is not None:
                body += (
                    f"<br>Login: user <code>{html.escape(ui.username)}</code>, "
                    f"password <code>{html.escape(ui.password)}</code>"
                )
            display(HTML(f"<div style='font-size:1.1em'>nbkit web UI: {body}</div>"))
            return
        except Exception:  # a display problem must not stop the UI; fall back to text
            pass
    print("\n".join(lines), file=file, flush=True)


def _open_tunnel(provider: str, host: str, port: int, options: dict[str, Any]) -> tuple[Any, str | None]:
    if provider == "none":
        return None, None
    # The tunnel never gets the password: it is nbkit's own login, checked by the server.
    tunnel = open_tunnel(provider, port, host="127.0.0.1" if host in ("0.0.0.0", "::") else host, **options)
    return tunnel, getattr(tunnel, "error", None)


def launch(
    session: Any = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    tunnel: str = "none",
    auth: str | tuple[str, str] | None = None,
    low_vram: bool = False,
    share_outputs: bool = True,
    block: bool = False,
    *,
    root: str | os.PathLike | None = None,
    device: str | None = None,
    max_queue: int = 32,
    limits: Any = None,
    tunnel_options: dict[str, Any] | None = None,
    include_base_models: bool = True,
    extra_models: list[str] | None = None,
    quiet: bool = False,
) -> WebUI:
    """Start the web UI and the A1111 API on one server.

    Args:
        session: a `Session`, a session name, or None (outputs then go to `<root>/outputs`).
        model: the checkpoint to load first (title, name, hash, path, URL or registry key); None: the
            session's newest export, else the first in the list.
        host: the address to bind; anything but loopback requires a password.
        port: the port (None: a free one).
        tunnel: `none`, `gradio`, `ngrok`, `localtunnel` or `cloudflared`; any tunnel requires a password.
        auth: `USER:PASS` or `(user, password)`; when a password is required and none is given, a
            strong one is generated for user `nbkit` and shown.
        low_vram: on a GPU, attention slicing, VAE tiling and model CPU offload.
        share_outputs: offer the Outputs tab (browse the outputs folder, download a zip).
        block: wait until Ctrl+C, then close (for scripts; notebooks leave it False).
        root: the storage root (default: `nbkit.env.storage_root()`).
        device: `cuda` or `cpu` (default: CUDA when available).
        max_queue: requests that may wait for the GPU; one more is answered "busy" (HTTP 503).
        limits: `nbkit.webui.security.Limits` (default caps: 2048x2048, 150 steps, 16 images, 20 MB).
        tunnel_options: extra keyword arguments for `nbkit.tunnel.open_tunnel`.
        include_base_models: list the registry's base models (downloaded when picked).
        extra_models: more checkpoints to offer (paths, folders, URLs or hub ids), loaded when picked.
        quiet: do not print the URLs (the handle still has them).
    """
    if tunnel not in TUNNELS:
        raise ValueError(f"tunnel must be one of {', '.join(TUNNELS)}, not {tunnel!r}")
    # A bad gradio/diffusers/transformers pairing is reported here, in one paragraph, rather than as a
    # traceback from deep inside gradio or a pipeline.
    check_versions("ui")
    from nbkit.env import storage_root
    from nbkit.session.core import Session
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.outputs import OutputStore
    from nbkit.webui.queue import GpuQueue
    from nbkit.webui.security import Limits, resolve_credentials
    from nbkit.webui.server import Server, create_app
    from nbkit.webui.service import GenerationService

    credentials = resolve_credentials(host, tunnel, auth)
    root_path = storage_root() if root is None else os.fspath(root)
    if isinstance(session, str):
        session = Session.open(session, root=root_path)
    outputs = OutputStore(
        session.dir("outputs") if session is not None else os.path.join(root_path, "outputs")
    )
    catalog = ModelCatalog(session, root_path, include_base_models=include_base_models)
    for source in [*(extra_models or []), *([model] if model is not None else [])]:
        _offer(catalog, source)
    service = GenerationService(catalog, outputs, model=model, device=device, low_vram=low_vram)
    queue = GpuQueue(max_queue)
    try:
        app = create_app(
            service, queue, credentials=credentials, limits=limits or Limits(), share_outputs=share_outputs
        )
        server = Server(app, host, port)
        server.start()
    except BaseException:
        queue.close(timeout=1)
        raise
    tunnel_handle, tunnel_error = _open_tunnel(tunnel, host, server.port, tunnel_options or {})
    ui = WebUI(
        server=server,
        service=service,
        queue=queue,
        credentials=credentials,
        tunnel=tunnel_handle,
        tunnel_error=tunnel_error,
    )
    if model is not None or any(entry.kind != "base" for entry in catalog.checkpoints):
        # Load the first checkpoint now, through the queue, so the first request does not wait for it;
        # a load error is reported by that request. Base models are never fetched unasked.
        queue.submit(lambda: service.ensure_model())
    if not quiet:
        announce(ui)
    if block:
        ui.wait()
    return ui


def _offer(catalog: Any, model: str) -> None:
    """Make `model` a catalog entry (a new path, URL or hub id is added), so lists show it at once."""
    from nbkit.errors import NbkitError

    try:
        catalog.find(model)
    except NbkitError:
        if any(sep in model for sep in ("/", "\\", ".")):
            catalog.add(model)
        else:
            raise


__all__ = ["TUNNELS", "WebUI", "announce", "launch"]
