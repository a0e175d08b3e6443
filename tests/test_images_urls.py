"""Importing from http(s) links, against a throw-away server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import functools
import http.server
import io
import threading
import time

import pytest
from PIL import Image
from skimage import data as skdata

from nbkit.errors import NbkitError
from nbkit.images import download, import_images
from nbkit.images.sources import drive_download_url
from nbkit.session.core import Session


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass

    def do_GET(self):
        if self.path == "/slow.jpg":
            time.sleep(1.5)
        if self.path.startswith("/named"):
            payload = (self.directory_path / "cat.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Disposition", 'attachment; filename="zwx (7).jpg"')
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        super().do_GET()


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the slow-download test hangs up on purpose; the broken pipe is expected


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, format="JPEG", quality=90)
    (folder / "cat.jpg").write_bytes(buffer.getvalue())
    (folder / "slow.jpg").write_bytes(buffer.getvalue())
    (folder / "gallery.html").write_text("<html><body><img src=cat.jpg></body></html>", encoding="utf-8")
    handler = functools.partial(Handler, directory=str(folder))
    Handler.directory_path = folder
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def test_download_streams_and_caps(server):
    name, payload = download(f"{server}/cat.jpg")
    assert name == "cat.jpg" and payload[:2] == b"\xff\xd8"
    with pytest.raises(NbkitError, match="larger than"):
        download(f"{server}/cat.jpg", max_bytes=2000)
    with pytest.raises(NbkitError, match="web page"):
        download(f"{server}/gallery.html")
    with pytest.raises(NbkitError, match="HTTP 404"):
        download(f"{server}/missing.jpg")
    with pytest.raises(NbkitError, match="did not answer within"):
        download(f"{server}/slow.jpg", timeout=0.3)
    with pytest.raises(NbkitError, match="only http"):
        download("file:///etc/passwd")


def test_import_from_links(server, tmp_path):
    session = Session.create("web", root=tmp_path)
    session.manifest.training = session.manifest.training.replace(resolution=64)
    session.save()
    report = import_images(
        session,
        [f"{server}/cat.jpg", f"{server}/named?id=3", f"{server}/gallery.html", f"{server}/missing.jpg"],
        crop="center",
    )
    assert [row.status for row in report.rows] == ["ok", "duplicate", "error", "error"]
    assert report.rows[0].saved_as == "instance_images/cat.png"
    record = session.manifest.images[0]
    assert record.source == f"{server}/cat.jpg" and record.original == "instance_images/originals/cat.jpg"
    assert record.caption == "cat"


def test_server_file_name_is_used(server, tmp_path):
    session = Session.create("web2", root=tmp_path)
    session.manifest.training = session.manifest.training.replace(resolution=64)
    session.save()
    report = import_images(session, [f"{server}/named?id=3"], crop="center")
    assert report.rows[0].saved_as == "instance_images/zwx (7).png"
    assert session.manifest.images[0].token == "zwx"


def test_drive_share_links_become_download_links():
    share = "https://drive.google.com/file/d/1AbC-d_9/view?usp=sharing"
    assert drive_download_url(share) == "https://drive.google.com/uc?export=download&id=1AbC-d_9"
    assert drive_download_url("https://example.com/a.jpg") == "https://example.com/a.jpg"


def test_image_links_and_model_urls_share_one_downloader_and_one_name_cleaner(server):
    from nbkit.images import sources
    from nbkit.models import download as model_download

    assert sources.safe_filename is model_download.safe_filename
    assert sources.open_url is model_download.open_url and sources.iter_body is model_download.iter_body
    assert model_download.filename_from_response(
        "http://h/x", 'attachment; filename="../../Zoe\u0308 (1).JPG"'
    ) == ("Zoë (1).jpg")
    with pytest.raises(NbkitError, match=r"did not answer within 0\.3 s"):
        download(f"{server}/slow.jpg", timeout=0.3)
