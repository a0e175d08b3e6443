"""Who may use the web UI, what it may serve, and how big a request may be.

Whenever the server is reachable beyond this machine (a tunnel, or a host other than loopback), a
password is required; if the user gave none, a strong one is generated and shown once. The same
credentials guard everything: gradio's login form for the UI (a session cookie) and HTTP Basic for the
A1111 API (A1111's `--api-auth`). `AccessMiddleware` sits in front of both, so a route gradio leaves
open (its static file routes, its stream and heartbeat routes) is closed too unless the login page
needs it; file routes serve only the outputs folder and gradio's own cache of what it showed.

Credentials live in memory only: never in a URL, a log line or a file. `Credentials.__repr__` hides
the password so a stray print or traceback cannot show it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError

DEFAULT_USERNAME = "nbkit"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")

# Routes the login page itself needs before anyone has logged in: the page, the login form's POST,
# and gradio's static front end (the same files for every gradio app, nothing of ours).
PUBLIC_EXACT = {
    "/",
    "/login",
    "/login/",
    "/logout",
    "/theme.css",
    "/favicon.ico",
    "/robots.txt",
    "/manifest.json",
    "/gradio_api/login_check",
    "/gradio_api/login_check/",
}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# gradio routes nbkit never uses, closed even to logged-in users: fetching other URLs on the server's
# behalf, run-history buckets, live code editing, monitoring, the MCP server.
BLOCKED_PREFIXES = (
    "/gradio_api/proxy=",
    "/gradio_api/run-history",
    "/gradio_api/vibe",
    "/gradio_api/undo-vibe",
    "/gradio_api/dev/",
    "/gradio_api/mcp",
    "/gradio_api/profiling",
    "/monitoring",
)
FILE_PREFIXES = ("/gradio_api/file=", "/gradio_api/file/", "/file=")
API_PREFIX = ("/sdapi/", "/controlnet/")  # A1111's API and the ControlNet extension's routes
# The API's schema and Swagger page: a browser asking for them without a login is asked for HTTP Basic.
DOCS_PATHS = ("/docs", "/openapi.json")
# API routes whose body never carries an image: capped at `Limits.max_small_body_bytes`.
SMALL_BODY_PATHS = ("/sdapi/v1/options",)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """One username and password (the same for the UI and the API).

    Args:
        username: the login name.
        password: the password; never printed by `repr`.
        generated: True when nbkit made the password (so it must be shown to the user once).
    """

    username: str
    password: str
    generated: bool = False

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"

    def check(self, username: str, password: str) -> bool:
        """Constant-time comparison of both parts (no early exit that leaks which one was wrong)."""
        user_ok = secrets.compare_digest(username.encode(), self.username.encode())
        password_ok = secrets.compare_digest(password.encode(), self.password.encode())
        return user_ok and password_ok

    def as_gradio_auth(self) -> Callable[[str, str], bool]:
        """gradio's `auth=`: a checker, so gradio holds no copy of the password."""
        return self.check


def generate_password(nbytes: int = 18) -> str:
    """A strong random password (24 URL-safe characters for the default 18 bytes)."""
    return secrets.token_urlsafe(nbytes)


def parse_auth(text: str) -> Credentials:
    """`USER:PASS` (A1111's `--gradio-auth` / `--api-auth` form) as `Credentials`.

    Args:
        text: the username and password joined by the first `:`; the password may contain `:`.
    """
    username, sep, password = text.partition(":")
    if not sep or not username.strip() or not password:
        raise NbkitError(
            "the --auth value must be USER:PASS with a non-empty user and password",
            fix="e.g. --auth me:a-long-secret, or leave --auth out to have a password generated",
        )
    return Credentials(username.strip(), password)


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def needs_password(host: str, tunnel: str | None) -> bool:
    """A password is required whenever the server is reachable beyond this machine."""
    return (tunnel or "none") != "none" or not is_loopback(host)


def resolve_credentials(
    host: str, tunnel: str | None, auth: str | tuple[str, str] | Credentials | None
) -> Credentials | None:
    """The credentials the server will require, or None when it stays open on loopback.

    Args:
        host: the address the server binds.
        tunnel: the tunnel provider (`none` for none).
        auth: `USER:PASS`, a `(user, password)` pair, `Credentials`, or None. None on a reachable
            server generates a strong password for user `nbkit`.
    """
    if isinstance(auth, Credentials):
        return auth
    if isinstance(auth, tuple):
        return parse_auth(f"{auth[0]}:{auth[1]}")
    if isinstance(auth, str):
        return parse_auth(auth)
    if auth is not None:
        raise ValueError(
            f"auth must be 'USER:PASS', a (user, password) pair or None, not {type(auth).__name__}"
        )
    if needs_password(host, tunnel):
        return Credentials(DEFAULT_USERNAME, generate_password(), generated=True)
    return None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on one request, so one call cannot exhaust the GPU, the RAM or the disk.

    Args:
        max_pixels: width x height of the largest image (also after hires fix).
        max_steps: sampling steps (and hires second-pass steps).
        max_images: batch size x batch count.
        max_image_bytes: bytes of one decoded input image (base64 in the API, uploads in the UI).
        max_body_bytes: bytes of one API request body.
        max_small_body_bytes: bytes of a body that carries no image (`SMALL_BODY_PATHS`: the options).
        max_inflight_body_bytes: bytes of API bodies held at once, all requests together: many
            concurrent bodies each under `max_body_bytes` must not add up to the runtime's RAM.
        max_controlnet_units: enabled ControlNet units in one request (each loads a ControlNet).
    """

    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_small_body_bytes: int = 1024 * 1024
    max_inflight_body_bytes: int = 256 * 1024 * 1024
    max_controlnet_units: int = 3  # the extension's default unit count


class LimitError(NbkitError):
    """A request above one of the `Limits` (HTTP 413 for bytes, 400 otherwise)."""

    def __init__(self, message: str, *, status: int = 400, fix: str | None = None):
        super().__init__(message, fix=fix)
        self.status = status


def check_size(width: int, height: int, limits: Limits, what: str = "the image") -> None:
    """Refuse an image larger than `limits.max_pixels`."""
    if width * height > limits.max_pixels:
        raise LimitError(
            f"{what} would be {width}x{height} = {width * height} pixels, above this server's limit of "
            f"{limits.max_pixels} (e.g. {_side(limits.max_pixels)}x{_side(limits.max_pixels)})",
            fix="ask for a smaller width/height (or a smaller hires scale)",
        )


def _side(pixels: int) -> int:
    return int(pixels**0.5)


def check_request_caps(
    *,
    width: int,
    height: int,
    steps: int,
    batch_size: int,
    n_iter: int,
    limits: Limits,
    final_size: tuple[int, int] | None = None,
    second_pass_steps: int = 0,
) -> None:
    """Refuse a request above the `limits` with a message that names the value and the cap."""
    for name, value in (("width", width), ("height", height), ("batch_size", batch_size), ("n_iter", n_iter)):
        if value < 1:
            raise LimitError(f"{name} must be at least 1, got {value}")
    check_size(width, height, limits)
    if final_size is not None:
        check_size(*final_size, limits, what="the hires fix result")
    for name, value in (("steps", steps), ("hr_second_pass_steps", second_pass_steps)):
        if value > limits.max_steps:
            raise LimitError(
                f"{name} is {value}, above this server's limit of {limits.max_steps}",
                fix=f"use at most {limits.max_steps} steps",
            )
    if steps < 1:
        raise LimitError(f"steps must be at least 1, got {steps}")
    if batch_size * n_iter > limits.max_images:
        raise LimitError(
            f"batch_size x n_iter is {batch_size} x {n_iter} = {batch_size * n_iter} images, above this "
            f"server's limit of {limits.max_images} per request",
            fix="split the job into several requests",
        )


def decode_base64_image_bytes(text: str, limits: Limits, what: str = "image") -> bytes:
    """The bytes of a base64 image, raw or as a `data:` URL, refused above `limits.max_image_bytes`.

    The size is checked on the encoded text first, so an oversized upload is refused before it is
    decoded into memory.
    """
    if not isinstance(text, str) or not text:
        raise LimitError(f"{what} must be a base64 string (raw or a data: URL)", status=422)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise LimitError(f"{what} is a data: URL without base64 data", status=422)
    if len(text) * 3 // 4 > limits.max_image_bytes:
        raise LimitError(
            f"{what} is about {len(text) * 3 // 4} bytes, above this server's limit of "
            f"{limits.max_image_bytes} bytes",
            status=413,
            fix="send a smaller image (PNG or JPEG of at most the generation size)",
        )
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise LimitError(f"{what} is not valid base64: {error}", status=422) from None


# --- the ASGI middleware ----------------------------------------------------------------------------


def _basic_credentials(headers: dict[bytes, bytes]) -> tuple[str, str] | None:
    value = headers.get(b"authorization", b"")
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic" or not encoded:
        return None
    try:
        username, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return (username, password) if sep else None


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    cookies = {}
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            cookies[name] = value
    return cookies


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.is_relative_to(folder)
    except ValueError:
        return False


class AccessMiddleware:
    """ASGI middleware in front of the whole app (the API and the mounted gradio UI).

    - With credentials: a request passes when it carries valid HTTP Basic credentials or gradio's
      login cookie, or when it is one the login page needs (`PUBLIC_EXACT`, `PUBLIC_PREFIXES`);
      anything else gets 401 (with `WWW-Authenticate: Basic` on the API, as A1111 answers).
    - Always: gradio's file routes serve only files inside `file_roots` (the outputs folder and
      gradio's cache folder of this server); remote URLs and anything else get 403. Routes in
      `BLOCKED_PREFIXES` get 404. API bodies above `limits.max_body_bytes` (`max_small_body_bytes`
      for `SMALL_BODY_PATHS`) get 413: by their Content-Length before anything is read, and by the
      bytes actually received as they arrive (a chunked body has no Content-Length), so a body is cut
      at the cap and never held whole.

    Args:
        app: the ASGI app.
        credentials: who may log in (None: no login, loopback only).
        file_roots: callable returning the folders file routes may serve from.
        gradio_tokens: callable returning (cookie id, tokens dict) of the mounted gradio app, or None.
        limits: request caps.
    """

    def __init__(
        self,
        app: Any,
        credentials: Credentials | None,
        file_roots: Callable[[], list[Path]],
        gradio_tokens: Callable[[], tuple[str, dict] | None],
        limits: Limits,
    ):
        self.app = app
        self.credentials = credentials
        self.file_roots = file_roots
        self.gradio_tokens = gradio_tokens
        self.limits = limits
        self.inflight_body_bytes = 0  # held by API requests now; one event loop, so no lock

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if any(path.startswith(prefix) for prefix in BLOCKED_PREFIXES):
            return await _deny(scope, send, 404, "Not Found", f"{path} is not served by nbkit")
        if self.credentials is not None and not self._public(path) and not self._authorised(headers):
            basic = path.startswith(API_PREFIX) or path in DOCS_PATHS
            extra = [(b"www-authenticate", b'Basic realm="nbkit"')] if basic else []
            return await _deny(
                scope, send, 401, "Unauthorized", "log in first (HTTP Basic for the API)", extra_headers=extra
            )
        if any(path.startswith(prefix) for prefix in FILE_PREFIXES) and not self._file_allowed(path):
            return await _deny(scope, send, 403, "Forbidden", "only images of this web UI are served")
        if path.startswith(API_PREFIX) and scope["type"] == "http":
            cap = self.limits.max_small_body_bytes if path in SMALL_BODY_PATHS else self.limits.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > cap:
                return await _deny(
                    scope, send, 413, "PayloadTooLarge", _too_large(f"{int(length)} bytes", cap)
                )
            return await _capped(self, scope, receive, send, cap)
        return await self.app(scope, receive, send)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_EXACT or any(path.startswith(prefix) for prefix in PUBLIC_PREFIXES)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        assert self.credentials is not None
        basic = _basic_credentials(headers)
        if basic is not None and self.credentials.check(*basic):
            return True
        gradio = self.gradio_tokens()
        if gradio is None:
            return False
        cookie_id, tokens = gradio
        cookies = _cookies(headers)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token and token in tokens:
                return True
        return False

    def _file_allowed(self, path: str) -> bool:
        for prefix in FILE_PREFIXES:
            if path.startswith(prefix):
                # scope['path'] is already percent-decoded, exactly as gradio's route sees it.
                target = path[len(prefix) :]
                break
        if "://" in target or target.startswith(("http:", "https:", "//")):
            return False
        try:
            resolved = Path(os.path.realpath(target))
        except (OSError, ValueError):
            return False
        return resolved.is_file() and any(
            _inside(resolved, Path(os.path.realpath(root))) for root in self.file_roots()
        )


class BodyTooLarge(Exception):
    """Raised into the app by `_capped`'s `receive` when a body passes its cap (`busy`: when the
    bodies of all requests together pass `Limits.max_inflight_body_bytes`)."""

    def __init__(self, message: str, *, busy: bool = False):
        super().__init__(message)
        self.busy = busy


BUSY_RETRY_AFTER_SECONDS = 5


def _too_large(size: str, cap: int) -> str:
    return f"the request body is {size}, above this server's limit of {cap} bytes"


async def _capped(
    middleware: AccessMiddleware, scope: dict, receive: Callable, send: Callable, cap: int
) -> None:
    """Run the app with a `receive` that counts the body's bytes: past `cap` a 413, and past the
    bytes all requests may hold at once (`Limits.max_inflight_body_bytes`) a 503 with `Retry-After`.

    Past either, `receive` raises `BodyTooLarge` (the app stops reading, nothing more is buffered)
    and whatever the app answers instead is replaced by the refusal; the server drops the rest of the
    body. The bytes a request holds count until the app has answered it.
    """
    budget = middleware.limits.max_inflight_body_bytes
    received = 0
    refusal: BodyTooLarge | None = None
    started = False

    async def deny() -> None:
        assert refusal is not None
        if refusal.busy:
            message = "the server is receiving too many large requests at once; try again shortly"
            headers = [(b"retry-after", str(BUSY_RETRY_AFTER_SECONDS).encode())]
            await _deny(scope, send, 503, "Busy", message, extra_headers=headers)
        else:
            message = f"the request body passes this server's limit of {cap} bytes"
            await _deny(scope, send, 413, "PayloadTooLarge", message)

    async def counting_receive() -> dict:
        nonlocal received, refusal
        message = await receive()
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            if received + size > cap:
                refusal = BodyTooLarge(f"request body over {cap} bytes")
            elif middleware.inflight_body_bytes + size > budget:
                refusal = BodyTooLarge("request bodies over the in-flight budget", busy=True)
            if refusal is not None:
                raise refusal
            received += size
            middleware.inflight_body_bytes += size
        return message

    async def guarded_send(message: dict) -> None:
        nonlocal started
        if refusal is not None:
            if message["type"] == "http.response.start" and not started:
                started = True
                await deny()
            return  # the app's own answer to the cut body is dropped
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await middleware.app(scope, counting_receive, guarded_send)
    except BodyTooLarge:
        if started:
            raise
        await deny()
    finally:
        middleware.inflight_body_bytes -= received


async def _deny(
    scope: dict,
    send: Callable,
    status: int,
    error: str,
    detail: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": error, "detail": detail, "body": "", "errors": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
