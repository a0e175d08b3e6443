"""nbkit's web UI: an AUTOMATIC1111-like gradio UI and A1111's REST API on one server.

`launch(...)` starts it (the notebook cells and `nbkit ui` call it) and returns a `WebUI` handle
with the local URL, the public URL when a tunnel is open, the login, and `close()`. The parts:
`service` (generation, no HTTP), `queue` (one GPU worker), `models`/`outputs` (what is offered and
saved), `api` (`/sdapi/v1`), `ui` (gradio Blocks), `security` (login, caps, file routes) and
`server` (uvicorn on a background thread).

A password the user chose is never printed, logged or stored; a generated one is shown once (printed
by `announce`, or masked with a copy button by the notebook's launch cell). A tunnel is looked after
by a `nbkit.tunnel.Watchdog`: a dropped link is reopened (`auto` falls back to the next provider) and
the new one shown in place in a notebook, printed on the console and logged.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from nbkit.compat import check_versions
from nbkit.errors import render
from nbkit.tunnel import CHOICES, Watchdog, make_tunnel
from nbkit.tunnel.watchdog import DEFAULT_INTERVAL
from nbkit.webui.queue import DEFAULT_MAX_PENDING

TUNNELS = CHOICES  # `auto` and nbkit.tunnel's providers
logger = logging.getLogger("nbkit.webui")


class WebUI:
    """A running web UI (returned by `launch`).

    Attributes:
        local_url: the URL on this machine, e.g. `http://127.0.0.1:7860/`.
        public_url: the tunnel's current URL, or None (no tunnel, or the tunnel failed or dropped:
            see `tunnel_error`); with a watchdog it follows the link as it is reopened or moved.
        username: the login name, or None when no login is required.
        password: the password, or None when no login is required (in memory only: never in the
            repr, a log line or a file).
        tunnel: the `nbkit.tunnel` handle, or None.
        tunnel_error: why the tunnel is not open (provider, reason, what to try next), or None.
        watchdog: the `nbkit.tunnel.Watchdog` keeping the link up, or None.
        service: the generation service.
        queue: the GPU queue.
    """

    def __init__(self, *, server, service, queue, credentials, tunnel=None, tunnel_error=None):
        self._server = server
        self.service = service
        self.queue = queue
        self._credentials = credentials
        self.tunnel = tunnel
        self._tunnel_error = tunnel_error
        self.watchdog: Watchdog | None = None
        self._closed = False
        self._password_shown = False  # a generated password is shown once
        self._listeners: list[Callable[[str | None], None]] = []
        self._display: Any = None  # the notebook's display handle of the links, updated in place
        self._advice: tuple[str, Mapping[str, str] | None] = ("python", None)  # see `announce`

    @property
    def local_url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def public_url(self) -> str | None:
        return self.tunnel.public_url if self.tunnel is not None else None

    @property
    def tunnel_error(self) -> str | None:
        if self.tunnel is not None and self.tunnel.public_url is None:
            return self.tunnel.error or self._tunnel_error
        return None

    @tunnel_error.setter
    def tunnel_error(self, value: str | None) -> None:
        self._tunnel_error = value

    @property
    def username(self) -> str | None:
        return self._credentials.username if self._credentials else None

    @property
    def password(self) -> str | None:
        return self._credentials.password if self._credentials else None

    @property
    def password_generated(self) -> bool:
        """Whether nbkit made the password (then it is shown once, since nothing else tells it)."""
        return bool(self._credentials and self._credentials.generated)

    @property
    def running(self) -> bool:
        return not self._closed and self._server.running

    def __repr__(self) -> str:  # never the password: reprs end up in logs and saved notebooks
        public = f", public_url={self.public_url!r}" if self.public_url else ""
        return f"WebUI(local_url={self.local_url!r}{public}, login={'on' if self._credentials else 'off'})"

    @property
    def password_shown(self) -> bool:
        """Whether a generated password was already shown (`reveal_password` gave it)."""
        return self._password_shown

    def reveal_password(self) -> str | None:
        """The generated password the first time it is asked for, so it is shown once; else None (a
        password the user chose is never shown: they know it)."""
        if not self.password_generated or self._password_shown:
            return None
        self._password_shown = True
        return self.password

    def on_link_change(self, listener: Callable[[str | None], None]) -> None:
        """Call `listener(public_url)` whenever the public link changes (None: it is down for now)."""
        self._listeners.append(listener)

    def reopen_tunnel(self) -> str | None:
        """Ask the tunnel for a new public URL (the UI keeps running); returns it, or None."""
        if self.tunnel is None:
            return None
        if self.watchdog is not None:
            self.watchdog.url = url = self.tunnel.recover()
        else:
            url = self.tunnel.reopen()
        self._link_changed(url)
        return url

    def _link_changed(self, url: str | None) -> None:
        """Show the new link: in place in the notebook, as a line on the console; then the listeners."""
        if self._display:  # a notebook's display handle (False: announced as text, None: not at all)
            with contextlib.suppress(Exception):  # a closed notebook must not stop the watchdog
                from IPython.display import HTML

                self._display.update(HTML(links_html(self, *self._advice)))
        elif self._display is False and url is not None:  # announced as text (the console)
            print(f"Public URL is now: {url}", flush=True)
        for listener in list(self._listeners):
            try:
                listener(url)
            except Exception:
                logger.exception("web UI: a link listener failed")

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
        """Stop the watchdog and the tunnel, the server and the queue, and free the model."""
        if self._closed:
            return
        self._closed = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.tunnel is not None:
            with contextlib.suppress(Exception):
                self.tunnel.close()
        self.service.interrupt()
        self._server.close()
        self.queue.close(timeout=30)
        self.service.unload()
        from nbkit.webui.server import remove_private_gradio_dir

        remove_private_gradio_dir()


def in_notebook() -> bool:
    """Whether this runs in a notebook's kernel (Jupyter, Colab), where output can be rich."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _via(ui: WebUI) -> str:
    """` (via cloudflared)` for an `auto` tunnel, so the user knows which provider serves the link."""
    active = getattr(ui.tunnel, "active", None)
    return f" (via {active})" if active else ""


def login_lines(ui: WebUI) -> list[str]:
    """The login part of the announcement. A password the user chose is never shown; a generated one
    only the first time (it is the only way to learn it), and it is stored nowhere."""
    if ui.password is None:
        return ["No login required (reachable from this machine only)."]
    generated = ui.reveal_password()
    if generated is not None:
        login = (
            f"Login: user {ui.username!r}, generated password {generated!r} "
            "(shown this once and stored nowhere: note it now)"
        )
    elif ui.password_generated:
        login = f"Login: user {ui.username!r} with the generated password shown when the UI started"
    else:
        login = f"Login: user {ui.username!r} with the password you chose (not shown)"
    return [login, f"API: HTTP Basic with the same login ({ui.local_url}sdapi/v1/...)"]


def links_html(ui: WebUI, interface: str = "python", words: Mapping[str, str] | None = None) -> str:
    """The UI's links as HTML (the public one first, with its provider), and why there is no public one.

    Args:
        ui: the running UI.
        interface: whose words the advice is in (`nbkit.errors.render`).
        words: that interface's own words for the settings the advice names.
    """

    def link(url: str, bold: bool = False) -> str:
        text = f"<b>{html.escape(url)}</b>" if bold else html.escape(url)
        return f'<a href="{html.escape(url)}" target="_blank">{text}</a>'

    lines = [link(ui.public_url, bold=True) + html.escape(_via(ui))] if ui.public_url else []
    lines.append(link(ui.local_url))
    if ui.tunnel_error:
        retry = " (trying again in the background)" if ui.watchdog is not None else ""
        lines.append(
            f"<span style='color:#b45309'>Tunnel not open: "
            f"{html.escape(render(ui.tunnel_error, interface, words))}{retry}</span>"
        )
    return f"<div style='font-size:1.1em'>nbkit web UI: {'<br>'.join(lines)}</div>"


def announce(
    ui: WebUI, file: Any = None, *, interface: str = "python", words: Mapping[str, str] | None = None
) -> None:
    """Print the URLs and the login (the links in place in a notebook, updated when they change).

    A password the user chose is never printed; a generated one is printed the first time only.

    Args:
        ui: the running UI.
        file: where to print (stdout).
        interface: whose words the tunnel's advice is in (`nbkit.errors.render`): `python`, `cli`.
        words: an interface's own words for the settings the advice names (the notebook's fields).
    """
    file = file or sys.stdout
    ui._advice = (interface, words)
    lines = [f"nbkit web UI running on local URL: {ui.local_url}"]
    if ui.public_url:
        lines.append(f"Public URL: {ui.public_url}{_via(ui)}")
    if ui.tunnel_error:
        retry = " (trying again in the background)" if ui.watchdog is not None else ""
        lines.append(f"Tunnel not open: {render(ui.tunnel_error, interface, words)}{retry}")
    if in_notebook():
        try:
            from IPython.display import HTML, display

            ui._display = display(HTML(links_html(ui, interface, words)), display_id=True)
            if ui.password_generated and not ui.password_shown:
                # not into the saved notebook: nbkit.notebook's launch cell shows it masked with a copy button
                lines = [
                    f"Login: user {ui.username!r} with a generated password: `ui.password` holds it "
                    "(nbkit.notebook.launch_ui shows it masked, with a copy button)"
                ]
            else:
                lines = login_lines(ui)[:1]
            print("\n".join(lines), file=file, flush=True)
            return
        except Exception:  # a display problem must not stop the UI; fall back to text
            ui._display = None
    ui._display = False
    print("\n".join([*lines, *login_lines(ui)]), file=file, flush=True)


def _reaches_ui(url: str, timeout: float = 10.0) -> bool:
    """Whether a request through the public `url` reaches this UI: nbkit's API refuses an anonymous
    call with its own `Basic realm="nbkit"` (a provider's error page never says that). No credentials
    travel: the probe needs none."""
    request = urllib.request.Request(
        url.rstrip("/") + "/sdapi/v1/progress",
        headers={
            "User-Agent": "nbkit-tunnel-watchdog",
            "bypass-tunnel-reminder": "1",  # localtunnel's visitor page
            "ngrok-skip-browser-warning": "1",  # ngrok's
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401 and 'realm="nbkit"' in (e.headers.get("www-authenticate") or "")
    except (OSError, ValueError):
        return False


def _make_tunnel(provider: str, host: str, port: int, options: dict[str, Any]) -> Any:
    """The tunnel handle, not opened yet (so whoever opens it can close it when interrupted), or None."""
    if provider == "none":
        return None
    # The tunnel never gets the password: it is nbkit's own login, checked by the server.
    return make_tunnel(provider, port, host="127.0.0.1" if host in ("0.0.0.0", "::") else host, **options)


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
    max_queue: int = DEFAULT_MAX_PENDING,
    limits: Any = None,
    tunnel_options: dict[str, Any] | None = None,
    include_base_models: bool = True,
    extra_models: list[str] | None = None,
    quiet: bool = False,
    tunnel_check: float | None = DEFAULT_INTERVAL,
    interface: str = "python",
) -> WebUI:
    """Start the web UI and the A1111 API on one server.

    Args:
        session: a `Session`, a session name, or None (outputs then go to `<root>/outputs`).
        model: the checkpoint to load first (title, name, hash, path, URL or registry key); None: the
            session's newest export, else the first in the list.
        host: the address to bind; anything but loopback requires a password.
        port: the port (None: a free one).
        tunnel: `auto` (the first provider that opens, in `nbkit.tunnel.AUTO_ORDER`, falling back to
            the next when it fails), `none`, `gradio`, `ngrok`, `localtunnel` or `cloudflared`; any
            tunnel requires a password.
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
        tunnel_check: seconds between the watchdog's checks of the public link (it reopens a dropped
            link, and `auto` falls back to the next provider); None: no watchdog.
        interface: whose words the printed advice is in (`python` or `cli`, see `nbkit.errors.render`).
    """
    if tunnel not in TUNNELS:
        raise ValueError(f"tunnel must be one of {', '.join(TUNNELS)}, not {tunnel!r}")
    # A bad gradio/diffusers/transformers pairing is reported here, in one paragraph, rather than as a
    # traceback from deep inside gradio or a pipeline.
    check_versions("ui")
    from nbkit.env import storage_root
    from nbkit.session.core import Session
    from nbkit.webui.loading import check_model_source
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
        # A bad local file is refused here, before the server listens or a tunnel opens, not at the
        # first generation; remote sources are checked when they are fetched.
        entry = catalog.find(source)
        check_model_source(entry.source, family=entry.family)
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
    try:
        tunnel_handle = _make_tunnel(tunnel, host, server.port, tunnel_options or {})
    except ValueError:  # a bad tunnel option: nothing may keep running behind the error
        server.close()
        queue.close(timeout=1)
        raise
    ui = None
    try:
        if tunnel_handle is not None:
            if not quiet:  # opening can take a while (each provider's timeout with `auto`): say where it is
                print(
                    f"nbkit web UI running on local URL: {server.url}; opening a public link ({tunnel})...",
                    flush=True,
                )
            tunnel_handle.open()
        ui = WebUI(
            server=server,
            service=service,
            queue=queue,
            credentials=credentials,
            tunnel=tunnel_handle,
            tunnel_error=getattr(tunnel_handle, "error", None),
        )
        if model is not None or any(entry.kind != "base" for entry in catalog.checkpoints):
            # Load the first checkpoint now, through the queue, so the first request does not wait for
            # it; a load error is reported by that request. Base models are never fetched unasked.
            queue.submit(lambda: service.ensure_model())
        if tunnel_handle is not None and tunnel_check is not None:
            ui.watchdog = Watchdog(
                tunnel_handle, interval=tunnel_check, probe=_reaches_ui, on_change=ui._link_changed
            )
        if not quiet:
            announce(ui, interface=interface)
        if ui.watchdog is not None:
            ui.watchdog.start()  # after the announcement, so a change is shown where that is
        if block:
            ui.wait()
    except BaseException:
        # Ctrl+C (or SIGTERM in `nbkit ui`) while the tunnel opens, or any failure before the handle is
        # returned: the tunnel's processes (npm, node, cloudflared) must not outlive the UI.
        if ui is not None:
            ui.close()
        else:
            if tunnel_handle is not None:
                tunnel_handle.close()
            server.close()
            queue.close(timeout=1)
        raise
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


__all__ = ["TUNNELS", "WebUI", "announce", "in_notebook", "launch", "links_html", "login_lines"]
