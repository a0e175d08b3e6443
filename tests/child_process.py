"""Real child processes for crash tests: start one, wait until it reports a point, SIGKILL it there."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap


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
