"""Real child processes for crash tests: start one, wait until it reports a point, SIGKILL it there."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from nbkit.train.checkpointing import PAUSE_ENV, PAUSE_MARKER


def start_child(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(child: subprocess.Popen, expected: str, timeout: float = 30.0) -> None:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline().strip() if ready else ""
    if line != expected:
        child.kill()
        raise AssertionError(f"child said {line!r}, not {expected!r}; stderr: {child.stderr.read()}")


def kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


@contextlib.contextmanager
def paused_training(
    args: list[str], checkpoint: str, stderr_path: Path, env: Mapping[str, str]
) -> Iterator[subprocess.Popen]:
    """Run `nbkit train ARGS` in a real process until it pauses halfway through writing `checkpoint`
    into the session; on leaving, SIGKILL it there (as a disconnect would)."""
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "nbkit", "train", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**env, PAUSE_ENV: checkpoint},
        )
        try:
            for line in process.stdout:
                if line.decode().startswith(PAUSE_MARKER):
                    break
            else:
                pytest.fail(f"the run ended without pausing: {stderr_path.read_text()[-3000:]}")
            yield process
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
