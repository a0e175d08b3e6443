"""Training a finished session more: the last stage continues from its step-N state to a larger total."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_train_support import (
    assert_same_tensors,
    load_tensors,
    make_session,
    model_state,
)

from nbkit.cli import main
from nbkit.errors import NbkitError
from nbkit.session.core import Session
from nbkit.train import stages
from nbkit.train.components import trained_state_dict
from nbkit.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


@pytest.fixture
def loop_starts(monkeypatch):
    """What each stage's loop starts from: its first step, the trained weights and the optimizer's step."""
    starts = []
    loop = stages._loop

    def recording(context, stage, start_step, wrapped, parameters, optimizer, lr_scheduler):
        state = optimizer.state_dict()["state"]
        starts.append(
            {
                "stage": stage.name,
                "start": start_step,
                "weights": {k: v.clone() for k, v in trained_state_dict(context.components.unet).items()},
                "optimizer_step": int(state[0]["step"]) if state else 0,
                "lr": lr_scheduler.get_last_lr()[0],
            }
        )
        return loop(context, stage, start_step, wrapped, parameters, optimizer, lr_scheduler)

    monkeypatch.setattr(stages, "_loop", recording)
    return starts


def test_training_more_continues_from_the_last_checkpoint(tiny_model_dir, loop_starts, capsys):
    base_dir = tiny_model_dir("sd1")
    make_session("reference", base_dir, "sd1", unet_steps=5)
    make_session("more", base_dir, "sd1")  # FAST: 2 text encoder steps, 3 UNet steps, constant rate
    reference = train("reference")
    first = train("more")
    assert first.finished and first.step == 3
    step3 = load_tensors(first.session / "checkpoints" / "unet-000003" / "unet.safetensors")
    single_before = first.single_file.read_bytes()
    loop_starts.clear()

    with pytest.raises(NbkitError, match="unet_steps is 3, which is not more than the 3 steps"):
        train("more", more=True)
    assert main(["train", "more", "--more", "--unet-steps", "2"]) == 2
    assert "unet_steps is 2" in capsys.readouterr().err

    more = train("more", {"unet_steps": 5}, more=True)
    assert more.finished and (more.stage, more.step) == ("done", 5)
    (start,) = loop_starts  # only the UNet stage ran, from step 3 with the step-3 state
    assert (start["stage"], start["start"], start["optimizer_step"]) == ("unet", 3, 3)
    assert_same_tensors(start["weights"], step3)
    # The same steps an uninterrupted 5-step run takes, loss for loss and bit for bit.
    assert more.losses == [loss for loss in reference.losses if loss[0] == "unet" and loss[1] > 3]
    final = load_tensors(more.session / "checkpoints" / "unet-000005" / "unet.safetensors")
    assert_same_tensors(
        final, load_tensors(reference.session / "checkpoints" / "unet-000005" / "unet.safetensors")
    )

    session = Session.open("more")
    assert session.manifest.state.stage == "done" and session.manifest.training.unet_steps == 5
    (model,) = session.manifest.models
    assert model.step == 5 and model.files["single_file"] == "models/more.safetensors"
    assert more.single_file.read_bytes() != single_before
    assert_same_tensors(model_state(more.model_dir)["unet"], model_state(reference.model_dir)["unet"])
    record = session.manifest.history[-1]
    assert record.status == "ok" and record.detail["resume_from"] == "unet-000003"


def test_training_more_without_the_checkpoint_starts_from_the_exported_model(
    tiny_model_dir, loop_starts, capsys
):
    make_session("nockpt", tiny_model_dir("sd1"), "sd1", lr_schedule="linear")
    first = train("nockpt")
    exported = model_state(first.model_dir)["unet"]
    shutil.rmtree(first.session / "checkpoints")
    loop_starts.clear()
    capsys.readouterr()

    more = train("nockpt", {"unet_steps": 6}, more=True)
    assert more.finished and more.step == 6
    assert "checkpoint of unet step 3 is gone" in capsys.readouterr().out
    (start,) = loop_starts
    assert (start["start"], start["optimizer_step"]) == (3, 0)  # a fresh optimizer
    assert_same_tensors(start["weights"], exported)
    assert start["lr"] == pytest.approx(1e-3 * 3 / 6)  # the linear schedule over 6 steps, at step 3
    (model,) = Session.open("nockpt").manifest.models
    assert model.step == 6
    assert not torch.equal(model_state(more.model_dir)["unet"]["conv_in.weight"], exported["conv_in.weight"])


def test_training_more_of_a_lora_without_its_checkpoint(tiny_model_dir, loop_starts):
    make_session("lora", tiny_model_dir("sd1"), "sd1", lora_rank=4)
    first = train("lora")
    step3 = load_tensors(first.session / "checkpoints" / "unet-000003" / "unet.safetensors")
    shutil.rmtree(first.session / "checkpoints")
    loop_starts.clear()
    more = train("lora", {"unet_steps": 4}, more=True)
    assert more.finished and more.step == 4 and set(more.lora_files) == {"diffusers", "kohya"}
    (start,) = loop_starts
    assert_same_tensors(start["weights"], step3)  # the exported LoRA is the step-3 LoRA, in fp32
