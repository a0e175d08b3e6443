"""`nbkit train` as a user meets it: real subprocesses, nothing lost, nothing overwritten unasked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_process import paused_training
from test_train_support import assert_same_tensors, load_tensors, make_session, subject_image

from nbkit.cli import build_parser
from nbkit.images import import_images
from nbkit.session.core import Session
from nbkit.train.trainer import train

STEPS = {"text_encoder_steps": 1, "unet_steps": 3, "checkpoint_every": 0}


def environment(changes: dict | None) -> dict:
    """os.environ with `changes` applied (a None value removes the variable)."""
    merged = {**os.environ, **(changes or {})}
    return {key: value for key, value in merged.items() if value is not None}


def nbkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbkit", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(env),
    )


@pytest.fixture(autouse=True)
def _local_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))


def test_stop_on_request_resume_finish_and_no_silent_retrain(tiny_model_dir):
    session = make_session("journey", tiny_model_dir("sd1"), "sd1", **STEPS)
    stopped = nbkit("train", "journey", "--max-steps-this-run", "2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped at unet step 1" in stopped.stdout and "--resume" in stopped.stdout
    state = Session.open("journey").manifest.state
    assert (state.stage, state.step, state.last_checkpoint) == ("unet", 1, "checkpoints/unet-000001")
    assert (session.path / state.last_checkpoint / "trainer_state.json").is_file()

    resumed = nbkit("train", "journey", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = Session.open("journey").manifest
    history = [(record.status, record.detail.get("resume_from")) for record in manifest.history]
    assert history == [("interrupted", None), ("ok", "unet-000001")]

    # session.json records the exported model: its files, their hashes, where it came from, the stack.
    (model,) = manifest.models
    assert (model.name, model.kind, model.family, model.stage, model.step) == (
        "journey",
        "full",
        "sd1",
        "unet",
        3,
    )
    single_file = session.path / model.files["single_file"]
    assert (session.path / model.files["folder"] / "model_index.json").is_file()
    assert model.sha256[model.files["single_file"]] == hashlib.sha256(single_file.read_bytes()).hexdigest()
    assert model.versions["torch"] == torch.__version__ and "diffusers" in model.versions

    # A finished session is not trained again (and its model not replaced) without --restart.
    before = (session.path / "session.json").read_bytes(), single_file.read_bytes()
    again = nbkit("train", "journey")
    assert again.returncode == 2
    assert "has finished training" in again.stderr and "--restart" in again.stderr
    assert "Traceback" not in again.stderr
    assert ((session.path / "session.json").read_bytes(), single_file.read_bytes()) == before


def test_a_failed_start_leaves_session_json_byte_identical(tiny_model_dir):
    session = make_session("offline", tiny_model_dir("sd1"), "sd1", **STEPS)
    before = (session.path / "session.json").read_bytes()
    # sd15 is a hub model: offline, loading it fails after every check has passed.
    failed = nbkit("train", "offline", "--model", "sd15", env={"HF_HUB_OFFLINE": "1"})
    assert failed.returncode != 0
    assert (session.path / "session.json").read_bytes() == before
    assert not list((session.path / "checkpoints").iterdir())
    plain = nbkit("train", "offline", "--max-steps-this-run", "1")  # and the old settings still train
    assert plain.returncode == 0, plain.stderr[-3000:]


def test_an_input_error_comes_before_torch_and_diffusers_load(tiny_model_dir):
    make_session("inputs", tiny_model_dir("sd1"), "sd1")
    code = (
        "import sys\nfrom nbkit.cli import main\n"
        "code = main(['train', 'inputs', '--unet-steps', '-1'])\n"
        "print(code, 'diffusers' in sys.modules, 'torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.split() == ["2", "False", "False"], completed.stderr[-2000:]
    assert "unet_steps is -1" in completed.stderr


def test_every_train_option_has_help_and_shows_its_default():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    undocumented, without_default = [], []
    no_default = {"-h", "--root", "--model", "--resume", "--restart", "--more", "--force-resolution"}
    for action in train_parser._actions:
        if not action.option_strings:
            continue
        flag = action.option_strings[0]
        if not action.help:
            undocumented.append(flag)
        elif flag not in no_default and "default:" not in action.help:
            without_default.append(flag)
    assert undocumented == [] and without_default == []
    help_text = " ".join(train_parser.format_help().split())
    # unet steps, as a new SD / transformer-family session has them
    assert "(default: 1500; FLUX.1, Z-Image, FLUX.2 [klein]: 500)" in help_text
    assert "(default: the base model's native size)" in help_text


def test_a_damaged_checkpoint_is_named_when_resume_passes_over_it(tiny_model_dir):
    settings = {"text_encoder_steps": 0, "unet_steps": 3, "checkpoint_every": 1}
    session = make_session("damaged", tiny_model_dir("sd1"), "sd1", **settings)
    train("damaged", max_steps_this_run=2)
    weights = session.path / "checkpoints" / "unet-000002" / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(
        UserWarning, match=r"checkpoint unet-000002 was skipped: unet.safetensors has 100 bytes"
    ):
        resumed = train("damaged", resume=True, max_steps_this_run=1)
    assert (resumed.stage, resumed.step) == ("unet", 2)  # step 2 again, from unet-000001
    record = Session.open("damaged").manifest.history[-1]
    assert record.detail["resume_from"] == "unet-000001"
    assert "unet-000002 was skipped" in record.detail["skipped_checkpoints"][0]


def test_changing_the_resolution_crops_the_photos_again(tiny_model_dir, tmp_path, capsys):
    session = make_session("sizes", tiny_model_dir("sd1"), "sd1", images=0, **STEPS)
    photos = []
    for index in range(3):
        photos.append(tmp_path / f"zwx ({index}).png")
        subject_image(index, 200).save(photos[-1])
    import_images(session, photos)
    session = Session.open("sizes")
    assert {(record.width, record.height) for record in session.manifest.images} == {(64, 64)}
    train("sizes", {"resolution": 128}, max_steps_this_run=1)
    assert "cropping them again from the kept originals" in capsys.readouterr().out
    manifest = Session.open("sizes").manifest
    assert manifest.training.resolution == 128
    assert {(record.width, record.height) for record in manifest.images} == {(128, 128)}
    from PIL import Image

    with Image.open(session.path / manifest.images[0].file) as image:
        assert image.size == (128, 128)


@pytest.mark.slow
def test_deterministic_kill_and_resume_through_the_cli_is_bit_exact(tiny_model_dir, tmp_path):
    """No thread settings from the test: the `deterministic` option alone makes the runs agree."""
    settings = {"text_encoder_steps": 2, "unet_steps": 4, "checkpoint_every": 2, "random_flip": True}
    make_session("reference", tiny_model_dir("sd1"), "sd1", **settings)
    make_session("killed", tiny_model_dir("sd1"), "sd1", **settings)
    env = {"OMP_NUM_THREADS": None, "NBKIT_SCRATCH": str(tmp_path / "scratch")}
    reference = nbkit("train", "reference", "--deterministic", env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]

    with paused_training(
        ["killed", "--deterministic"], "unet-000002", tmp_path / "stderr.txt", environment(env)
    ):
        pass  # killed halfway through writing unet-000002 as the block ends
    resumed = nbkit("train", "killed", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = Session.open("killed").manifest.history
    assert [record.status for record in history] == ["interrupted", "ok"]  # the killed run, closed
    root = Path(os.environ["NBKIT_HOME"]) / "Sessions"
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        assert_same_tensors(
            load_tensors(root / "killed" / "checkpoints" / "unet-000004" / name),
            load_tensors(root / "reference" / "checkpoints" / "unet-000004" / name),
        )
    saved = json.loads((root / "killed" / "session.json").read_text())
    assert saved["training"]["deterministic"] is True
