"""The README's two quick-start commands: CI runs the test one; here the demo one must finish."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


@pytest.mark.parametrize("marker", ["demo-command", "test-command"])
def test_readme_commands_set_up_a_pinned_venv(marker):
    command = readme_command(marker)
    assert "\n" not in command, "each quick-start command is one line"
    assert command.startswith("python3 -m venv .venv && ")
    assert "torch==2.13.0" in command, "an unpinned torch pulls a multi-GB CUDA build"
    assert "--require-hashes -r wheels/dev-lock.txt" in command, "installs go through the committed lock"
    assert "--no-deps -e ." in command, "nbkit itself must not re-resolve what the lock pinned"


@pytest.mark.slow
def test_demo_command_finishes(tmp_path):
    """Runs the demo command's nbkit part in this environment (the venv part is what CI just did)."""
    command = readme_command("demo-command")
    assert command.endswith(".venv/bin/nbkit demo")
    env = {**os.environ, "NBKIT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "nbkit", "demo", "--session", "readme-demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    session = tmp_path / "home" / "Sessions" / "readme-demo"
    assert (session / "session.json").is_file()
    assert str(session) in completed.stdout
    assert list((session / "models").rglob("*.safetensors")), "the demo exports a single-file model"
