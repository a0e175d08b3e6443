"""One HTTP server for the web UI: A1111's API at `/sdapi/v1`, the gradio UI at `/`.

The API's OpenAPI schema is at `/openapi.json` and its Swagger page at `/docs` (FastAPI's own, its
script and style from the CDN FastAPI names); with a login, both need it as the API does.

`create_app` builds the FastAPI app (API router, gradio Blocks mounted with gradio's login,
`AccessMiddleware` in front of everything, and `LastResortMiddleware` around it all); `Server` runs it with uvicorn on a background thread, on a
socket it binds itself (port None: a free one, without a race), and `close()` stops it.

gradio serves the images it shows from its cache folder. Each server process gets a private one
(mode 0700, `GRADIO_TEMP_DIR`), removed at close, so the file routes can only ever reach this UI's
own images and the outputs folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError
from nbkit.webui.api import (
    ApiState,
    LastResortMiddleware,
    create_router,
    document_errors,
    install_error_handlers,
)
from nbkit.webui.api_controlnet import controlnet_router
from nbkit.webui.api_misc import misc_router
from nbkit.webui.queue import GpuQueue
from nbkit.webui.security import AccessMiddleware, Credentials, Limits
from nbkit.webui.service import GenerationService

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
API_DESCRIPTION = (
    "AUTOMATIC1111's REST API on nbkit. Every request field may be null (its default); unknown fields are "
    "ignored. A 422 is FastAPI's validation body; other errors are A1111's "
    "`{error, detail, body, errors}`."
)
_gradio_dir_lock = threading.Lock()
_gradio_dir: str | None = None


def private_gradio_dir() -> str:
    """This process's gradio cache folder (created once, mode 0700), set as `GRADIO_TEMP_DIR`.

    gradio reads `GRADIO_TEMP_DIR` both when components are built and when uploads are checked, so it
    is set for the whole process; a folder the user chose already is kept.
    """
    global _gradio_dir
    with _gradio_dir_lock:
        if os.environ.get("GRADIO_TEMP_DIR"):
            folder = os.environ["GRADIO_TEMP_DIR"]
            Path(folder).mkdir(parents=True, exist_ok=True)
            return folder
        if _gradio_dir is None or not Path(_gradio_dir).is_dir():
            _gradio_dir = tempfile.mkdtemp(prefix="nbkit-gradio-")
        os.environ["GRADIO_TEMP_DIR"] = _gradio_dir
        return _gradio_dir


def _mounted_gradio_app(app: Any) -> Any:
    for route in app.routes:
        inner = getattr(route, "app", None)
        if inner is not None and hasattr(inner, "tokens") and hasattr(inner, "cookie_id"):
            return inner
    return None


def create_app(
    service: GenerationService,
    queue: GpuQueue,
    *,
    credentials: Credentials | None = None,
    limits: Limits | None = None,
    with_ui: bool = True,
    share_outputs: bool = True,
) -> Any:
    """The FastAPI app: `/sdapi/v1/*` plus (with `with_ui`) the gradio UI at `/`.

    Args:
        service: the generation service.
        queue: the GPU queue every generation goes through.
        credentials: who may log in (None: no login; only sensible on loopback).
        limits: request caps.
        with_ui: mount the gradio UI (False: the API alone, e.g. for in-process tests).
        share_outputs: offer the Outputs tab (browse the outputs folder, download a zip).
    """
    from fastapi import FastAPI

    from nbkit.generation.generate import VERSION

    limits = limits or Limits()
    # FastAPI's own schema and Swagger page, added before gradio's mount so they answer at these paths.
    app = FastAPI(
        title="nbkit: AUTOMATIC1111's API",
        version=VERSION,
        description=API_DESCRIPTION,
        docs_url=DOCS_URL,
        openapi_url=OPENAPI_URL,
        redoc_url=None,
    )
    app.openapi = _api_schema(app)
    state = ApiState(service, queue, limits)
    app.state.nbkit = state
    app.include_router(create_router(state))
    app.include_router(controlnet_router(state))  # the ControlNet extension's routes and A1111's script lists
    app.include_router(misc_router(state))
    install_error_handlers(app)
    file_roots: list[Path] = []
    outputs = service.outputs.folder if service.outputs is not None else None
    if with_ui:
        # Before gradio is imported: some of its modules read GRADIO_TEMP_DIR at import.
        file_roots.append(Path(private_gradio_dir()))
        import gradio as gr

        from nbkit.webui.ui import CSS, build_ui, theme

        allowed = []
        if outputs is not None and share_outputs:
            outputs.mkdir(parents=True, exist_ok=True)
            allowed.append(str(outputs.resolve()))
            file_roots.append(outputs)
        blocks = build_ui(service, queue, limits=limits, share_outputs=share_outputs)
        gr.mount_gradio_app(
            app,
            blocks,
            path="/",
            auth=credentials.as_gradio_auth() if credentials is not None else None,
            auth_message="nbkit web UI: log in with the user and password shown where you started it.",
            allowed_paths=allowed,
            show_error=True,
            max_file_size=limits.max_image_bytes,
            ssr_mode=False,
            footer_links=["gradio", "settings"],
            run_history=False,
            mcp_server=False,
            pwa=False,
            theme=theme(),
            css=CSS,
        )

    def gradio_tokens() -> tuple[str, dict] | None:
        mounted = _mounted_gradio_app(app)
        return (mounted.cookie_id, mounted.tokens) if mounted is not None else None

    app.add_middleware(
        AccessMiddleware,
        credentials=credentials,
        file_roots=lambda: file_roots,
        gradio_tokens=gradio_tokens,
        limits=limits,
    )
    # Outermost: whatever escapes (a route, the access checks, gradio) becomes a JSON 500 with a request id.
    app.add_middleware(LastResortMiddleware)
    return app


def _api_schema(app: Any) -> Any:
    """The app's `openapi()`: FastAPI's schema of its routes, with the errors every API route may answer."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = document_errors(schema)
        return app.openapi_schema

    return openapi


def _bind(host: str, port: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port or 0))
    except OSError as error:
        sock.close()
        raise NbkitError(
            f"cannot listen on {host}:{port or 0}: {error.strerror}",
            fix="pick another --port (or leave it out to use a free one)",
        ) from None
    sock.listen(128)
    return sock


class Server:
    """uvicorn serving `app` on a background thread.

    Args:
        app: the ASGI app.
        host: the address to bind.
        port: the port (None: a free one).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host = host
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        # No access log: request lines are harmless (credentials travel in headers and form bodies,
        # never in URLs), but a quiet server is what a notebook cell wants.
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="nbkit-webui-server", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as error:  # reported by start()
            self._error = error

    def start(self, timeout: float = 60) -> None:
        """Start serving; returns once the server accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise NbkitError(f"the web UI server did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise NbkitError(f"the web UI server did not start within {timeout:.0f} s")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10) -> None:
        """Stop accepting, let running requests end (a few seconds at most), and stop the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._socket.close()


def remove_private_gradio_dir() -> None:
    """Delete this process's gradio cache folder (the copies of shown images and uploads)."""
    global _gradio_dir
    with _gradio_dir_lock:
        if _gradio_dir is not None:
            shutil.rmtree(_gradio_dir, ignore_errors=True)
            if os.environ.get("GRADIO_TEMP_DIR") == _gradio_dir:
                del os.environ["GRADIO_TEMP_DIR"]
            _gradio_dir = None
