"""Two-stage DreamBooth on tiny models: what each stage trains, learning, prior preservation, export, families."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_support import (
    PROMPT,
    assert_same_tensors,
    denoising_loss,
    make_session,
    model_state,
    subject_image,
)

from nbkit.errors import NbkitError, SessionLockedError
from nbkit.families import stable_diffusion
from nbkit.session.core import Session
from nbkit.train import stages, trainer
from nbkit.train.plan import plan_run
from nbkit.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _snapshot(components) -> dict[str, dict[str, torch.Tensor]]:
    roles = ["unet", *components.text_encoder_roles]
    return {
        role: {k: v.detach().clone() for k, v in components.model(role).state_dict().items()}
        for role in roles
    }


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[key], after[key]) for key in before)


def test_stage1_trains_only_the_text_encoder_and_stage2_only_the_unet(tiny_model_dir, monkeypatch, tmp_path):
    make_session("freeze", tiny_model_dir("sd1"), "sd1", text_encoder_steps=2, unet_steps=2)
    snapshots = {}
    steps_checked = []
    original_run_stage, original_step = trainer.run_stage, stages._optimizer_step

    calls = {"vae": 0, "text_encoder": 0, "unet in text_encoder": 0, "unet in unet": 0}
    current = []

    def counting(name, function):
        def count(*args, **kwargs):
            calls[name.format(stage=current[-1])] += 1
            return function(*args, **kwargs)

        return count

    def spy_run_stage(context, stage, **kwargs):
        components = context.components
        if not snapshots:
            snapshots["base"] = _snapshot(components)
            monkeypatch.setattr(components.vae, "encode", counting("vae", components.vae.encode))
            monkeypatch.setattr(
                components.unet, "forward", counting("unet in {stage}", components.unet.forward)
            )
            encoder = components.model("text_encoder")
            monkeypatch.setattr(encoder, "forward", counting("text_encoder", encoder.forward))
        current.append(stage.name)
        finished = original_run_stage(context, stage, **kwargs)
        snapshots[stage.name] = _snapshot(components)
        return finished

    def spy_step(context, stage, step, *args):
        loss = original_step(context, stage, step, *args)
        components = context.components
        frozen = [components.vae, *(components.text_encoders if stage.name == "unet" else [components.unet])]
        for model in frozen:  # no gradient can reach a parameter that does not require one
            assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        trained = [components.model(role) for role in stage.roles]
        assert all(p.requires_grad for model in trained for p in model.parameters())
        steps_checked.append((stage.name, step))
        return loss

    monkeypatch.setattr(trainer, "run_stage", spy_run_stage)
    monkeypatch.setattr(stages, "_optimizer_step", spy_step)
    result = train("freeze")

    assert steps_checked == [("text_encoder", 1), ("text_encoder", 2), ("unet", 1), ("unet", 2)]
    # Latents were cached before training: the VAE never ran in a stage. The text encoder ran once
    # per stage-1 step, then once in all of stage 2 (one caption); the UNet once per step.
    assert calls == {"vae": 0, "text_encoder": 3, "unet in text_encoder": 2, "unet in unet": 2}
    (scratch,) = (tmp_path / "scratch" / "train").glob("freeze-*")  # keyed by the session's identity
    copies = sorted(path.name for path in (scratch / "instance").iterdir())
    assert copies == ["00000-zwx_0.png", "00001-zwx_1.png", "00002-zwx_2.png"]  # trained from local disk
    base, after_te, after_unet = snapshots["base"], snapshots["text_encoder"], snapshots["unet"]
    assert_same_tensors(after_te["unet"], base["unet"])  # stage 1: every UNet tensor bit-identical
    assert _changed(base["text_encoder"], after_te["text_encoder"])
    assert_same_tensors(after_unet["text_encoder"], after_te["text_encoder"])  # stage 2: encoder untouched
    assert _changed(after_te["unet"], after_unet["unet"])
    exported = model_state(result.model_dir)
    assert_same_tensors(exported["unet"], after_unet["unet"])
    assert_same_tensors(exported["text_encoder"], after_unet["text_encoder"])


def test_training_learns_the_subject_and_exports_a_loadable_single_file(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    base_dir = tiny_model_dir("sd1")
    make_session(
        "learn",
        base_dir,
        "sd1",
        text_encoder_steps=4,
        unet_steps=30,
        checkpoint_every=15,
        sample_prompts=[PROMPT],
    )
    result = train("learn")

    # Progress: a sample grid per checkpoint, the loss of every step in the CSV, and its plot.
    names = ["text_encoder-000004.png", "unet-000015.png", "unet-000030.png"]
    assert [path.name for path in result.samples] == names and all(path.is_file() for path in result.samples)
    assert len((result.session / "logs" / "loss.csv").read_text().splitlines()) == 1 + 34
    assert result.loss_plot.is_file()

    unet_losses = [loss for stage, _, loss in result.losses if stage == "unet"]
    assert sum(unet_losses[-5:]) / 5 < 0.8 * sum(unet_losses[:5]) / 5  # the training loss falls
    images = [subject_image(index, 64) for index in range(3)]
    before = denoising_loss(_pipeline(base_dir), images, PROMPT)
    after = denoising_loss(_pipeline(result.model_dir), images, PROMPT)
    assert after < 0.6 * before, (before, after)  # it learned the subject

    # The single file is fp16 of exactly the exported weights, loads in diffusers, and says how it was trained.
    loaded = StableDiffusionPipeline.from_single_file(
        str(result.single_file), config=str(base_dir), local_files_only=True
    )
    folder_unet = model_state(result.model_dir)["unet"]
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value.half(), folder_unet[key].half()), key
    from safetensors import safe_open

    with safe_open(str(result.single_file), "pt") as handle:
        settings = json.loads(handle.metadata()["nbkit.training"])
    assert settings["unet_steps"] == 30 and settings["seed"] == 1234
    session = Session.open("learn")
    assert session.manifest.state.stage == "done"
    assert session.manifest.training.unet_steps == 30
    assert [path.name for path in (session.path / "checkpoints").iterdir()] != []


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_closer_to_the_base_model(tiny_model_dir, tmp_path):
    from PIL import Image

    from nbkit.train.class_images import ensure_class_images

    base_dir = tiny_model_dir("sd1")
    settings = {"text_encoder_steps": 0, "unet_steps": 20}
    prior = {"class_prompt": "photo of a toy", "num_images": 4, "generation_steps": 2}
    make_session("without", base_dir, "sd1", **settings)
    make_session("with", base_dir, "sd1", prior=prior, **settings)
    without, with_prior = train("without"), train("with")

    # What the base model draws for the class prompt (seeds 4-6: not among the 4 class images trained on)
    # is what prior preservation must keep the model good at.
    base = _pipeline(base_dir)
    held_out = ensure_class_images(
        base, "photo of a toy", 7, tmp_path / "held_out", seed=0, steps=2, resolution=64
    )
    images = [Image.open(path).convert("RGB") for path in held_out[4:]]
    class_loss_without = denoising_loss(_pipeline(without.model_dir), images, "photo of a toy")
    class_loss_with = denoising_loss(_pipeline(with_prior.model_dir), images, "photo of a toy")
    assert class_loss_with < 0.9 * class_loss_without, (class_loss_with, class_loss_without)
    # ...while the subject is still learned.
    subject = [subject_image(index, 64) for index in range(3)]
    assert denoising_loss(_pipeline(with_prior.model_dir), subject, PROMPT) < 0.8 * denoising_loss(
        base, subject, PROMPT
    )
    assert sorted(path.name for path in (Session.open("with").path / "class_images").glob("*.png")) == [
        f"class-{index:04d}.png" for index in range(4)
    ]


@pytest.mark.parametrize(
    ("family", "lora_rank"),
    [("sd1", 4), ("sd2", 0), ("sd2-v", 0), ("sdxl", 4), ("sdxl", 0)],
)
def test_each_family_trains_a_few_steps(tiny_model_dir, monkeypatch, family, lora_rank):
    prediction_types = set()
    original_target = stable_diffusion.training_target

    def spy_target(scheduler, *args):
        prediction_types.add(scheduler.config.prediction_type)
        return original_target(scheduler, *args)

    monkeypatch.setattr(stable_diffusion, "training_target", spy_target)
    base_dir = tiny_model_dir(family)
    # The full SDXL run also covers gradient checkpointing (off elsewhere, for speed).
    checkpointing = family == "sdxl" and not lora_rank
    make_session(
        family, base_dir, family, text_encoder_steps=1, unet_steps=2, lora_rank=lora_rank,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    result = train(family)

    assert result.finished and len(result.losses) == 3
    assert prediction_types == {"v_prediction" if family == "sd2-v" else "epsilon"}
    base = _pipeline(base_dir)
    if lora_rank:
        assert set(result.lora_files) == {"diffusers", "kohya"}
        before = base.unet.state_dict()["conv_in.weight"].clone()
        base.load_lora_weights(
            str(result.lora_files["kohya"].parent), weight_name=result.lora_files["kohya"].name
        )
        assert base.unet.state_dict()["conv_in.weight"].equal(before)  # LoRA sits on attention, not convs
        assert any("lora" in name for name, _ in base.unet.named_parameters())
    else:
        trained = model_state(result.model_dir)
        assert _changed(base.unet.state_dict(), trained["unet"])
        assert result.single_file.is_file()


def test_errors_come_before_any_work(tiny_model_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(trainer, "load_components", no_loading)
    base_dir = tiny_model_dir("sd1")

    session = make_session("empty", base_dir, "sd1", images=0)
    with pytest.raises(NbkitError, match="no instance images"):
        train("empty")
    session = make_session("checks", base_dir, "sd1")
    with pytest.raises(NbkitError, match="resolution 512 is outside 64-256"):
        train("checks", {"resolution": 512})
    with pytest.raises(NbkitError, match="not a multiple of 64"):
        train("checks", {"resolution": 96})
    with pytest.raises(NbkitError, match="class prompt is empty"):
        train("checks", {"prior": {"num_images": 4}})
    with pytest.raises(NbkitError, match="nothing to train"):
        train("checks", {"text_encoder_steps": 0, "unet_steps": 0})
    with pytest.raises(NbkitError, match="fp16 mixed precision needs a CUDA GPU"):
        train("checks", {"mixed_precision": "fp16"})
    with pytest.raises(NbkitError, match="unknown key 'unet_step'"):
        train("checks", {"unet_step": 3})
    with session.lock("another kernel"), pytest.raises(SessionLockedError):
        train("checks")
    (session.path / session.manifest.images[0].file).unlink()
    with pytest.raises(NbkitError, match="missing"):
        train("checks")
    assert Session.open("checks").manifest.history == []  # nothing ran

    # Switching the base model takes the new model's resolution unless one is given; a start that
    # fails before training (here: at loading) writes nothing into the session.
    switch = make_session("switch", base_dir, "sd1", resolution=128)
    before = (switch.path / "session.json").read_bytes()
    plan = plan_run(switch, {"model": "tiny-sdxl"})
    assert (plan.base_model.source, plan.base_model.family, plan.config.resolution) == (
        "tiny-sdxl",
        "sdxl",
        64,
    )
    with pytest.raises(AssertionError, match="a model was loaded"):
        train(switch, {"model": "tiny-sdxl"})
    assert (switch.path / "session.json").read_bytes() == before


def test_an_unfinished_run_needs_resume_or_restart(tiny_model_dir):
    make_session(
        "unfinished", tiny_model_dir("sd1"), "sd1", text_encoder_steps=2, unet_steps=2, checkpoint_every=1
    )
    stopped = train("unfinished", max_steps_this_run=3)
    assert not stopped.finished and (stopped.stage, stopped.step) == ("unet", 1)
    session = Session.open("unfinished")
    assert session.manifest.state.last_checkpoint == "checkpoints/unet-000001"
    assert session.manifest.history[-1].status == "interrupted"
    with pytest.raises(NbkitError, match="unfinished run") as error:
        train("unfinished")
    assert "resume=True" in str(error.value) and "--resume" in error.value.render("cli")
    with pytest.raises(NbkitError, match="cannot resume: seed was 1234"):
        train("unfinished", {"seed": 99}, resume=True)
    restarted = train("unfinished", {"seed": None, "unet_lr": 5e-4}, restart=True, max_steps_this_run=1)
    assert (restarted.stage, restarted.step) == ("text_encoder", 1)
    session = Session.open("unfinished")
    assert 1 <= restarted.seed <= 999_999 and session.manifest.training.seed == restarted.seed
    assert session.manifest.training.unet_lr == 5e-4
    names = sorted(path.name for path in (session.path / "checkpoints").iterdir())
    assert names == ["text_encoder-000001"]  # the old run's checkpoints are gone


def test_running_out_of_memory_names_the_settings_to_lower(tiny_model_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_run_stages", out_of_memory)  # after the run has started
    make_session("oom", tiny_model_dir("sd1"), "sd1")
    with pytest.raises(NbkitError, match="ran out of") as error:
        train("oom")
    assert "batch" in str(error.value).lower() and isinstance(error.value.__cause__, torch.OutOfMemoryError)
    assert Session.open("oom").manifest.history[-1].status == "failed"
