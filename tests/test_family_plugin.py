"""A model family is one module: a family no nbkit file names trains, resumes, converts and generates.

The family lives in a package outside nbkit that registers it under the `nbkit.families` entry-point
group, as a third party would ship one. It is SD 1.x's topology declared at another size (its tiny model
is built at 128 px, so its folders are told apart from tiny SD 1.x by their configs), and every step
runs through the `nbkit` command line in a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train_support import subject_image

pytestmark = pytest.mark.slow
FAMILY_LINE = re.compile(r"^family:\s+sdtest\b", re.M)  # what `nbkit model info` prints

PLUGIN = '''
"""A test-only model family: SD 1.x's topology at 128 px, under its own name."""

from nbkit.families.sd1 import SD1


class SDTest(SD1):
    name = "sdtest"
    title = "SD test family"
    modelspec_architecture = "nbkit-test-family-v1"
    tiny_native_resolution = 128
    hub_models = ()
    detection_priority = -50  # before SD 1.x, which takes any UNet

    def claims(self, configs):
        return configs.denoiser.get("sample_size") == self.tiny_native_resolution // 8


FAMILY = SDTest()
'''


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which the `sdtest` family is installed as a plugin."""
    site = tmp_path / "site"
    (site / "nbkit_test_family-1.0.dist-info").mkdir(parents=True)
    (site / "nbkit_test_family.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "nbkit_test_family-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nbkit-test-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[nbkit.families]\nsdtest = nbkit_test_family:FAMILY\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "NBKIT_HOME": str(tmp_path / "home"),
        "NBKIT_SCRATCH": str(tmp_path / "scratch"),
        "HF_HUB_OFFLINE": "1",
    }
    return env


def nbkit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, "-m", "nbkit", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, (
        f"nbkit {' '.join(args)}:\n{completed.stdout[-2000:]}{completed.stderr[-3000:]}"
    )
    return completed


def test_a_plugin_family_trains_resumes_converts_and_generates(plugin_env, tmp_path):
    model = tmp_path / "tiny-sdtest"
    nbkit(plugin_env, "model", "tiny", "sdtest", str(model))
    assert FAMILY_LINE.search(nbkit(plugin_env, "model", "info", str(model)).stdout)

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        subject_image(index, 256).save(photos / f"zwx ({index}).png")
    nbkit(plugin_env, "session", "create", "fam", "--base-model", str(model))
    nbkit(plugin_env, "images", "add", "fam", str(photos))
    session = Path(plugin_env["NBKIT_HOME"]) / "Sessions" / "fam"
    manifest = json.loads((session / "session.json").read_text())
    assert manifest["base_model"]["family"] == "sdtest"
    assert manifest["training"]["resolution"] == 128

    steps = ("--te-steps", "1", "--unet-steps", "3", "--checkpoint-every", "1")
    stopped = nbkit(plugin_env, "train", "fam", *steps, "--max-steps-this-run", "2")
    assert "--resume" in stopped.stdout
    nbkit(plugin_env, "train", "fam", "--resume")
    manifest = json.loads((session / "session.json").read_text())
    (exported,) = manifest["models"]
    assert (exported["family"], manifest["state"]["stage"]) == ("sdtest", "done")

    # The single file says which family it is, and converts back to a folder of that family.
    single_file = session / exported["files"]["single_file"]
    assert FAMILY_LINE.search(nbkit(plugin_env, "model", "info", str(single_file)).stdout)
    folder = tmp_path / "back"
    nbkit(plugin_env, "convert", str(single_file), str(folder))
    assert FAMILY_LINE.search(nbkit(plugin_env, "model", "info", str(folder)).stdout)

    # The demo takes the family through the web UI and its A1111 API.
    demo = nbkit(plugin_env, "demo", "--family", "sdtest", "--te-steps", "1", "--unet-steps", "2")
    assert "sdtest" in demo.stdout or "SD test family" in demo.stdout
