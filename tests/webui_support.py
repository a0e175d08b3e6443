"""A real `nbkit ui` server process for the web UI tests (loopback only), shared by the test modules.

`shared_server()` starts one `python -m nbkit ui --model <tiny folder> --auth u:p` per test run
(started on first use, killed at exit), so the API, auth and browser tests pay for one start-up.
"""

from __future__ import annotations

import atexit
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

USER, PASSWORD = "tester", "s3cret-pw-for-tests"
STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    root: Path
    models: dict[str, Path]
    output: list[str]

    @property
    def api(self) -> str:
        return self.url + "sdapi/v1"

    def session(self, auth: bool = True) -> requests.Session:
        http = requests.Session()
        if auth:
            http.auth = (USER, PASSWORD)
        return http

    def stop(self) -> str:
        """SIGTERM (a clean shutdown), then collect what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        time.sleep(0.2)  # the reader thread drains the pipe
        return "".join(self.output)


def start_server(root: Path, model: Path, *extra: str, env: dict | None = None) -> ServerProcess:
    """Start `python -m nbkit ui` on a free loopback port and wait until its API answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "nbkit",
        "ui",
        "--model",
        str(model),
        "--port",
        str(port),
        "--root",
        str(root),
    ]
    command += ["--no-base-models", *extra]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "NBKIT_HOME": str(root), **(env or {})}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    url = f"http://127.0.0.1:{port}/"
    output: list[str] = []
    # A reader thread, not select() + readline(): the text wrapper buffers lines select() cannot see.
    threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not any("Press Ctrl+C" in line for line in output):
        if process.poll() is not None:
            time.sleep(0.5)
            raise AssertionError(f"nbkit ui exited with {process.returncode}:\n{''.join(output)}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"nbkit ui did not start in {STARTUP_SECONDS} s:\n{''.join(output)}")
        time.sleep(0.1)
    server = ServerProcess(process, url, root, {"a": model}, output)
    # The first checkpoint loads through the queue at start-up: wait for it so timings are the model's.
    http = server.session("--auth" in extra)
    while time.monotonic() < deadline:
        state = http.get(server.api + "/progress", timeout=10).json()["state"]
        if state["job_count"] == 0:
            break
        time.sleep(0.2)
    return server


_shared: dict[str, ServerProcess] = {}


def shared_server(tmp_root: Path, model: Path) -> ServerProcess:
    """The test run's one `nbkit ui --auth u:p` server (started on first use).

    It offers a second tiny checkpoint, `tiny-other` (other random weights), for model switching.
    """
    if "main" not in _shared or _shared["main"].process.poll() is not None:
        from nbkit.models.tiny import save_tiny_pipeline

        other = save_tiny_pipeline("sd1", tmp_root / "tiny-other", seed=1)
        _shared["main"] = start_server(
            tmp_root, model, "--auth", f"{USER}:{PASSWORD}", "--max-queue", "24", "--extra-model", str(other)
        )
        atexit.register(_shared["main"].stop)
    return _shared["main"]


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))
