"""Login, file routes and request caps of a real `nbkit ui --auth u:p` server (loopback only)."""

from __future__ import annotations

import base64

import pytest
from webui_support import PASSWORD, USER, shared_server

from nbkit.errors import NbkitError
from nbkit.webui.security import Credentials, is_loopback, needs_password, parse_auth, resolve_credentials


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


def _login(server):
    http = server.session(auth=False)
    response = http.post(server.url + "login", data={"username": USER, "password": PASSWORD}, timeout=10)
    assert response.status_code == 200, response.text
    return http


ROUTES = [
    ("GET", "sdapi/v1/sd-models"),
    ("GET", "sdapi/v1/options"),
    ("POST", "sdapi/v1/txt2img"),
    ("POST", "sdapi/v1/interrupt"),
    ("GET", "sdapi/v1/progress"),
    ("GET", "config"),
    ("GET", "gradio_api/info"),
    ("GET", "gradio_api/openapi.json"),
    ("POST", "gradio_api/queue/join"),
    ("GET", "gradio_api/queue/data?session_hash=x"),
    ("POST", "gradio_api/upload"),
    ("GET", "gradio_api/heartbeat/x"),
    ("GET", "gradio_api/startup-events"),
    ("POST", "gradio_api/cancel"),
    ("GET", "gradio_api/file=/etc/passwd"),
    ("GET", "gradio_api/file/etc/passwd"),
    ("GET", "file=/etc/passwd"),
    ("GET", "txt2img"),
    ("GET", "docs"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_family_refuses_without_credentials(server, method, path):
    response = server.session(auth=False).request(
        method, server.url + path, timeout=10, allow_redirects=False
    )
    assert response.status_code in (401, 302, 303, 307), (path, response.status_code, response.text[:200])
    if path.startswith("sdapi"):
        assert response.headers["www-authenticate"].startswith("Basic")
        assert set(response.json()) == {"error", "detail", "body", "errors"}
    wrong = server.session(auth=False)
    wrong.auth = (USER, "wrong")
    assert wrong.request(method, server.url + path, timeout=10, allow_redirects=False).status_code in (
        401,
        302,
        303,
        307,
    )


def test_the_root_page_is_only_the_login_form(server):
    page = server.session(auth=False).get(server.url, timeout=10)
    assert page.status_code == 200
    assert '"auth_required":true' in page.text.replace(" ", "") and "Sampling steps" not in page.text
    assert (
        server.session(auth=False)
        .post(server.url + "login", data={"username": USER, "password": "no"}, timeout=10)
        .status_code
        == 400
    )


def test_api_with_basic_auth_and_ui_after_login(server):
    assert server.session().get(server.api + "/sd-models", timeout=10).status_code == 200
    http = _login(server)
    assert http.get(server.url + "config", timeout=10).status_code == 200
    assert "Sampling steps" in http.get(server.url, timeout=10).text


@pytest.mark.parametrize(
    "path",
    [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=../../../../etc/passwd",
        "gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "gradio_api/file=/proc/self/environ",
        "gradio_api/file/etc/hostname",
        "gradio_api/file=http://127.0.0.1:1/x.png",
        "gradio_api/proxy=http://127.0.0.1:1/x",
    ],
)
def test_file_routes_serve_nothing_outside_the_outputs(server, path):
    response = _login(server).get(server.url + path, timeout=10)
    assert response.status_code in (403, 404), (path, response.status_code)
    assert b"root:" not in response.content


def test_outputs_file_is_served_to_a_logged_in_user_only(server):
    body = (
        server.session()
        .post(
            server.api + "/txt2img",
            json={"width": 64, "height": 64, "steps": 2, "seed": 11, "save_images": True},
            timeout=120,
        )
        .json()
    )
    saved = sorted((server.root / "outputs").rglob("*-11.png"))
    assert saved, "save_images=true saves into <root>/outputs/<date>/"
    url = server.url + f"gradio_api/file={saved[-1]}"
    assert server.session(auth=False).get(url, timeout=10).status_code == 401
    served = _login(server).get(url, timeout=10)
    assert served.status_code == 200 and served.content == saved[-1].read_bytes()
    assert body["images"]


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"width": 4096, "height": 4096}, 400, "pixels"),
        ({"steps": 151}, 400, "steps is 151"),
        ({"batch_size": 8, "n_iter": 3}, 400, "24 images"),
        ({"enable_hr": True, "width": 1536, "height": 1536, "hr_scale": 2}, 400, "hires"),
    ],
)
def test_oversized_requests_get_4xx_with_a_message(server, fields, status, words):
    response = server.session().post(server.api + "/txt2img", json={"steps": 2, **fields}, timeout=30)
    assert response.status_code == status
    assert words in response.json()["detail"] and "limit" in response.json()["detail"]


def test_oversized_base64_image(server):
    big = base64.b64encode(b"\0" * (21 * 2**20)).decode()
    response = server.session().post(server.api + "/png-info", json={"image": big}, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_a_chosen_password_is_never_printed_nor_logged(server):
    output = "".join(server.output)
    # the user typed it, so it is not shown back; the logins and Basic-auth requests of the tests
    # above printed it nowhere either (no access log lines, no tracebacks)
    assert "with the password you chose (not shown)" in output
    assert output.count(PASSWORD) == 0, output


def test_password_decision():
    assert needs_password("0.0.0.0", "none") and needs_password("192.168.1.4", None)
    assert needs_password("127.0.0.1", "ngrok") and not needs_password("127.0.0.1", "none")
    assert (
        is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("::")
    )
    generated = resolve_credentials("0.0.0.0", "none", None)
    assert generated.generated and generated.username == "nbkit" and len(generated.password) >= 24
    assert resolve_credentials("0.0.0.0", "none", None).password != generated.password
    assert resolve_credentials("127.0.0.1", "none", None) is None
    given = resolve_credentials("0.0.0.0", "gradio", "me:se:cret")
    assert (given.username, given.password, given.generated) == ("me", "se:cret", False)
    assert "se:cret" not in repr(given) and "se:cret" not in repr(Credentials("a", "se:cret"))
    with pytest.raises(NbkitError, match="USER:PASS"):
        parse_auth("justaname")


def test_host_0000_without_auth_generates_and_prints_a_password(tmp_path, tiny_model_dir):
    """Bound on 0.0.0.0 but only ever connected to through 127.0.0.1."""
    import io
    from contextlib import redirect_stdout

    from nbkit.webui import launch

    printed = io.StringIO()
    with redirect_stdout(printed):
        ui = launch(
            model=str(tiny_model_dir("sd1")),
            host="0.0.0.0",
            root=tmp_path,
            include_base_models=False,
            device="cpu",
        )
    try:
        assert ui.username == "nbkit" and ui.password and len(ui.password) >= 24
        assert printed.getvalue().count(ui.password) == 1 and ui.local_url.startswith("http://127.0.0.1:")
        import requests

        assert requests.get(ui.local_url + "sdapi/v1/sd-models", timeout=10).status_code == 401
        assert (
            requests.get(
                ui.local_url + "sdapi/v1/sd-models", auth=(ui.username, ui.password), timeout=10
            ).status_code
            == 200
        )
        assert ui.password not in repr(ui)
    finally:
        ui.close()
    assert not ui.running


def test_middleware_refuses_a_declared_oversized_body():
    import asyncio

    from nbkit.webui.security import AccessMiddleware, Limits

    sent: list = []

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the oversized body reached the app")

    async def send(message):
        sent.append(message)

    middleware = AccessMiddleware(app, None, lambda: [], lambda: None, Limits(max_body_bytes=100))
    scope = {"type": "http", "path": "/sdapi/v1/txt2img", "headers": [(b"content-length", b"101")]}
    asyncio.run(middleware(scope, None, send))
    assert sent[0]["status"] == 413 and b"above this server's limit" in sent[1]["body"]


def test_bodies_held_at_once_are_bounded_with_a_503_and_retry_after():
    """Each body under the cap, many at once over the in-flight budget: the one that would pass it is
    refused with 503 and Retry-After; the bytes come back when a request is answered."""
    import asyncio

    from nbkit.webui.security import AccessMiddleware, Limits

    release = asyncio.Event()

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await release.wait()  # held, as a queued generation request holds its body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = Limits(max_body_bytes=100, max_inflight_body_bytes=150)
    middleware = AccessMiddleware(app, None, lambda: [], lambda: None, limits)
    scope = {"type": "http", "path": "/sdapi/v1/txt2img", "headers": []}

    async def request(size: int) -> list[dict]:
        sent: list[dict] = []
        chunks = [{"type": "http.request", "body": bytes(size // 2), "more_body": True}]
        chunks.append({"type": "http.request", "body": bytes(size - size // 2), "more_body": False})

        async def receive():
            return chunks.pop(0)

        async def send(message):
            sent.append(message)

        await middleware(scope, receive, send)
        return sent

    async def scenario() -> tuple[list, list, list]:
        first = asyncio.create_task(request(100))
        await asyncio.sleep(0)  # let it take its bytes
        while middleware.inflight_body_bytes < 100:
            await asyncio.sleep(0)
        second = await request(100)  # 200 > 150: refused at once
        release.set()
        held = await first
        assert middleware.inflight_body_bytes == 0
        third = await request(100)  # the bytes came back
        return held, second, third

    held, second, third = asyncio.run(scenario())
    assert held[0]["status"] == 200 and third[0]["status"] == 200
    assert second[0]["status"] == 503
    assert (b"retry-after", b"5") in second[0]["headers"]
    assert b"too many large requests at once" in second[1]["body"]
