"""The UI's password in what it prints, logs, shows and writes: a chosen one never, a generated one once.

Also the links shown for a tunnel that the watchdog moves: updated in place, never stale.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from webui_support import free_port

from nbkit.tunnel import Tunnel, Watchdog
from nbkit.webui import WebUI, announce, links_html
from nbkit.webui.security import Credentials

LOCAL = "http://127.0.0.1:7999/"


class FakeTunnel(Tunnel):
    provider = "fake"

    def __init__(self, *links):
        super().__init__(7999)
        self.links = list(links)

    def describe(self):
        return "fake"

    def _open(self):
        return self.links.pop(0) if self.links else None


def stub_ui(credentials: Credentials | None, tunnel: Tunnel | None = None) -> WebUI:
    server = types.SimpleNamespace(url=LOCAL, port=7999, running=True)
    return WebUI(server=server, service=None, queue=None, credentials=credentials, tunnel=tunnel)


def announced(ui: WebUI) -> str:
    out = io.StringIO()
    announce(ui, file=out)
    return out.getvalue()


def alone(word: str, text: str) -> bool:
    """Whether `word` appears in `text` on its own (not inside a longer word or URL)."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def test_a_chosen_password_is_never_printed_nor_logged(caplog):
    caplog.set_level(logging.DEBUG)
    for password in ("b", "SECRETXYZ"):
        ui = stub_ui(Credentials("a", password))
        text = announced(ui) + announced(ui)
        assert "user 'a' with the password you chose (not shown)" in text
        assert not alone(password, text) and not alone(password, caplog.text)
        assert ui.reveal_password() is None and not alone(password, repr(ui))


def test_a_generated_password_is_printed_exactly_once():
    ui = stub_ui(Credentials("nbkit", "GEN-3f9a1c7e5b2d4a6c8e0f", generated=True))
    text = announced(ui) + announced(ui)
    assert text.count("GEN-3f9a1c7e5b2d4a6c8e0f") == 1 and "note it now" in text
    assert "generated password shown when the UI started" in text
    assert ui.reveal_password() is None  # shown: nothing gives it again but `ui.password`
    assert ui.password == "GEN-3f9a1c7e5b2d4a6c8e0f" and "GEN-" not in repr(ui)


def test_the_notebook_field_is_masked_with_a_copy_button_and_shown_once():
    pytest.importorskip("ipywidgets")
    from nbkit.notebook.widgets import UILinks

    secret = "GEN-0c1d2e3f4a5b6c7d8e9f"
    ui = stub_ui(Credentials("nbkit", secret, generated=True), FakeTunnel("https://x.example"))
    ui.tunnel.open()
    view = UILinks(ui)
    assert type(view.password).__name__ == "Password" and view.password.value == secret
    html_values = [view.links.value, view.login.value, view.row.children[1].value]
    assert "https://x.example" in view.links.value and "navigator.clipboard" in html_values[2]
    assert not any(secret in value for value in html_values)  # not in any HTML the notebook saves
    assert secret not in view._repr_mimebundle_()["text/plain"]
    view.show.value = True  # "Show" swaps in a plain field with the same value
    assert view.row.children[0].value == secret and type(view.row.children[0]).__name__ == "Text"
    again = UILinks(ui)
    assert again.password is None and "shown when it started" in again.login.value
    chosen = UILinks(stub_ui(Credentials("a", "SECRETXYZ")))
    assert chosen.password is None and "SECRETXYZ" not in chosen.login.value + chosen.links.value


def test_the_links_follow_the_tunnel_in_place():
    pytest.importorskip("ipywidgets")
    from nbkit.notebook.widgets import UILinks

    tunnel = FakeTunnel("https://one.example", "https://two.example")
    tunnel.open()
    ui = stub_ui(Credentials("a", "SECRETXYZ"), tunnel)
    view = UILinks(ui)
    printed = io.StringIO()
    ui._display = False  # announced as text: a new link is printed
    watchdog = Watchdog(tunnel, interval=1, on_change=ui._link_changed)
    ui.watchdog = watchdog
    tunnel._dropped("the fake provider exited")
    assert ui.public_url is None and "dropped" in ui.tunnel_error
    assert "trying again in the background" in links_html(ui)
    from contextlib import redirect_stdout

    with redirect_stdout(printed):
        assert watchdog.check() == "https://two.example"
    assert ui.public_url == "https://two.example" and ui.tunnel_error is None
    assert "https://two.example" in view.links.value and "one.example" not in view.links.value
    assert "Public URL is now: https://two.example" in printed.getvalue()


# -- the real CLI ---------------------------------------------------------------------------------


def run_ui(root: Path, model: Path, *extra: str) -> str:
    """`nbkit ui ... --tunnel none`: everything it printed until it was up, then until it stopped."""
    command = [sys.executable, "-m", "nbkit", "ui", "--model", str(model), "--root", str(root)]
    command += ["--port", str(free_port()), "--no-base-models", "--tunnel", "none", "--device", "cpu", *extra]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "NBKIT_HOME": str(root)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    lines: list[str] = []
    up = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if "Press Ctrl+C" in line:
                up.set()
        up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(180), "".join(lines)
        assert process.poll() is None, "".join(lines)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        reader.join(10)
    return "".join(lines)


def files_containing(folder: Path, secret: str) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret.encode() in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_cli_never_prints_a_chosen_password(tmp_path, tiny_model_dir):
    output = run_ui(tmp_path, tiny_model_dir("sd1"), "--auth", "a:SECRETXYZ")
    assert "local URL: http://127.0.0.1:" in output and "with the password you chose" in output
    assert "SECRETXYZ" not in output
    assert files_containing(tmp_path, "SECRETXYZ") == []


@pytest.mark.slow
def test_cli_prints_a_generated_password_once_and_stores_it_nowhere(tmp_path, tiny_model_dir):
    output = run_ui(tmp_path, tiny_model_dir("sd1"), "--host", "0.0.0.0")
    match = re.search(r"generated password '([^']+)'", output)
    assert match, output
    assert output.count(match.group(1)) == 1 and len(match.group(1)) >= 24
    assert files_containing(tmp_path, match.group(1)) == []


def test_launch_with_a_chosen_password_prints_none_of_it(tmp_path, tiny_model_dir, caplog):
    from contextlib import redirect_stdout

    from nbkit.webui import launch

    caplog.set_level(logging.DEBUG)
    printed = io.StringIO()
    with redirect_stdout(printed):
        ui = launch(
            model=str(tiny_model_dir("sd1")),
            host="0.0.0.0",
            auth="a:b",
            root=tmp_path,
            include_base_models=False,
            device="cpu",
        )
    try:
        assert ui.username == "a" and ui.password == "b"
        text = printed.getvalue()
        assert "local URL" in text and "with the password you chose" in text
        assert not alone("b", text) and not alone("b", caplog.text) and not alone("b", repr(ui))
    finally:
        ui.close()


def test_launch_auto_falls_back_and_its_watchdog_moves_the_link(tmp_path, tiny_model_dir, monkeypatch):
    """A provider that breaks does not stop the UI; the link that drops comes back, shown and printed."""
    from contextlib import redirect_stdout

    import nbkit.tunnel as tunnel_package
    import nbkit.webui as webui

    class Boom(FakeTunnel):
        provider = "boom"

        def __init__(self, port, **options):
            super().__init__()

        def _open(self):
            raise RuntimeError("the provider library broke")

    script = ["https://one.example/", "https://two.example/"]  # shared by each reopen's instance

    class Flaky(FakeTunnel):
        provider = "flaky"

        def __init__(self, port, **options):
            super().__init__()
            self.links = script

        def _running(self):
            return self.public_url is not None

    monkeypatch.setattr(
        tunnel_package, "PROVIDERS", {**tunnel_package.PROVIDERS, "boom": Boom, "flaky": Flaky}
    )
    monkeypatch.setattr(webui, "_reaches_ui", lambda url, timeout=10.0: True)
    printed = io.StringIO()
    with redirect_stdout(printed):
        ui = webui.launch(
            model=str(tiny_model_dir("sd1")),
            tunnel="auto",
            tunnel_options={"order": ["boom", "flaky"]},
            tunnel_check=0.05,
            root=tmp_path,
            include_base_models=False,
            device="cpu",
        )
        try:
            assert ui.public_url == "https://one.example/" and ui.tunnel.active == "flaky"
            text = printed.getvalue()
            # the local URL comes first, before the (possibly slow) providers are tried
            opening = text.index(f"local URL: {ui.local_url}; opening a public link (auto)")
            assert opening < text.index("Public URL: https://one.example/ (via flaky)")
            assert ui.password_generated and printed.getvalue().count(ui.password) == 1
            moved = threading.Event()
            ui.on_link_change(lambda url: url and moved.set())
            ui.tunnel.current._dropped("the fake provider exited")
            assert moved.wait(10)
            assert ui.public_url == "https://two.example/" and ui.running
            import requests

            assert requests.get(ui.local_url + "sdapi/v1/sd-models", timeout=10).status_code == 401
        finally:
            ui.close()
    assert "Public URL is now: https://two.example/" in printed.getvalue()
    assert ui.watchdog.stopped and ui.public_url is None and not ui.running


def test_nbkit_ui_takes_the_login_from_nbkit_auth(monkeypatch):
    """NBKIT_AUTH keeps the password out of the process list (`ps` shows --auth's value)."""
    import nbkit.webui as webui
    from nbkit.cli import main

    seen = {}

    def fake_launch(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop right there: the login is what this test is about

    monkeypatch.setattr(webui, "launch", fake_launch)
    monkeypatch.setenv("NBKIT_AUTH", "me:from-the-environment")
    assert main(["ui", "--model", "x"]) == 130
    assert seen["auth"] == "me:from-the-environment"
    seen.clear()
    assert main(["ui", "--model", "x", "--auth", "me:given"]) == 130  # the flag wins
    assert seen["auth"] == "me:given"
