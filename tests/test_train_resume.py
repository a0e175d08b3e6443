"""Resuming training: bit-exact after clean stops and after SIGKILL mid-checkpoint; two-process training.

The resumed runs must end with exactly the weights of an uninterrupted run: every step's randomness
comes from (seed, stage, step), and checkpoints carry the optimizer and LR scheduler state.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from child_process import paused_training
from test_train_support import (
    assert_same_tensors,
    load_tensors,
    make_session,
    model_state,
)

from nbkit.session.core import Session
from nbkit.train.trainer import train

# Every determinism-relevant feature on: two stages, accumulation, flips, offset noise, Min-SNR,
# warmup and a decaying schedule, prior preservation.
RESUMABLE = {
    "text_encoder_steps": 2,
    "unet_steps": 4,
    "checkpoint_every": 2,
    "gradient_accumulation": 2,
    "random_flip": True,
    "offset_noise": 0.1,
    "min_snr_gamma": 5.0,
    "lr_schedule": "linear",
    "lr_warmup_steps": 1,
    "prior": {"class_prompt": "photo of a toy", "num_images": 2, "generation_steps": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


def _final_checkpoint(result) -> dict[str, dict[str, torch.Tensor]]:
    folder = result.session / "checkpoints" / "unet-000004"
    return {path.stem: load_tensors(path) for path in sorted(folder.glob("*.safetensors"))}


def test_resume_after_clean_stops_is_bit_exact(tiny_model_dir):
    base_dir = tiny_model_dir("sd1")
    make_session("reference", base_dir, "sd1", **RESUMABLE)
    make_session("interrupted", base_dir, "sd1", **RESUMABLE)
    reference = train("reference")

    first = train("interrupted", max_steps_this_run=3)  # stage 1, then one UNet step, checkpointed there
    assert (first.stage, first.step, first.last_checkpoint.name) == ("unet", 1, "unet-000001")
    second = train("interrupted", resume=True, max_steps_this_run=2)  # resumes mid-stage
    assert (second.stage, second.step, second.last_checkpoint.name) == ("unet", 3, "unet-000003")
    third = train("interrupted", resume=True)  # with the optimizer and scheduler state of step 3
    assert third.finished

    assert_same_tensors(*(ckpt["unet"] for ckpt in map(_final_checkpoint, (reference, third))))
    assert_same_tensors(*(ckpt["text_encoder"] for ckpt in map(_final_checkpoint, (reference, third))))
    exported, expected = model_state(third.model_dir), model_state(reference.model_dir)
    for component in ("unet", "text_encoder"):
        assert_same_tensors(exported[component], expected[component])
    # Each part took the reference's steps, loss for loss; a stop on request loses no step.
    assert first.losses + second.losses + third.losses == reference.losses
    # Only the last keep_checkpoints (10 here) are kept; all of the reference's fit.
    names = sorted(path.name for path in (reference.session / "checkpoints").iterdir())
    assert names == ["text_encoder-000002", "unet-000002", "unet-000004"]


@pytest.mark.slow
def test_resume_after_sigkill_while_writing_a_checkpoint_is_bit_exact(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("sd1")
    settings = {**RESUMABLE, "lora_rank": 4, "prior": {"num_images": 0}}
    make_session("reference", base_dir, "sd1", **settings)
    make_session("killed", base_dir, "sd1", **settings)
    reference = train("reference")

    # A real process, paused halfway through copying checkpoint unet-000002 into the session.
    with paused_training(["killed"], "unet-000002", tmp_path / "stderr.txt", os.environ):
        checkpoints = Session.open("killed").path / "checkpoints"
        partial = [path for path in checkpoints.iterdir() if path.name.startswith(".nbkit-tmp-")]
        assert len(partial) == 1 and len(list(partial[0].iterdir())) == 1  # one file of several copied
        assert Session.open("killed").manifest.state.last_checkpoint == "checkpoints/text_encoder-000002"

    with pytest.warns(UserWarning, match="stale lock"):  # the dead process still "holds" the session
        resumed = train("killed", resume=True)
    assert resumed.finished
    assert [path.name for path in checkpoints.iterdir() if path.name.startswith(".nbkit")] == []
    final, expected = _final_checkpoint(resumed), _final_checkpoint(reference)
    assert final.keys() == expected.keys() == {"unet", "text_encoder"}
    for role in final:
        assert_same_tensors(final[role], expected[role])
    for kind in ("diffusers", "kohya"):
        assert_same_tensors(load_tensors(resumed.lora_files[kind]), load_tensors(reference.lora_files[kind]))


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu_completes(tiny_model_dir, tmp_path):
    make_session("two", tiny_model_dir("sd1"), "sd1", text_encoder_steps=1, unet_steps=2, checkpoint_every=1)
    # accelerate's --cpu launcher starts one process (several need MPI); torchrun's, with the CPU
    # flag in the environment, starts two that talk over gloo.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nbkit", "train", "two",
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "single file:" in done.stdout and done.stdout.count("seed: 1234") == 1  # one process reports
    session = Session.open("two")
    assert session.manifest.state.stage == "done" and session.manifest.history[-1].status == "ok"
    state = (session.path / "checkpoints" / "unet-000002" / "trainer_state.json").read_text()
    assert '"num_processes": 2' in state
    assert len((session.path / "logs" / "loss.csv").read_text().splitlines()) == 1 + 3  # header + 3 steps
    assert model_state(session.path / "models" / "two")["unet"]
