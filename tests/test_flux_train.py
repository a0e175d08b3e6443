"""FLUX.1 DreamBooth LoRA on the tiny flux model: learning, refusals, bit-exact resume after SIGKILL, export.

The run trains a LoRA of the transformer with the flow-matching loss; stage 1 never runs. Sample
prompts stay off (grids go through `nbkit.generation.generate`, tested with its own flux support).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from child_process import paused_training
from test_train_support import (
    PROMPT,
    assert_same_tensors,
    load_tensors,
    make_session,
    subject_image,
)

from nbkit.errors import NbkitError
from nbkit.families.flux1 import FLUX_FULL_FINE_TUNE
from nbkit.models import memory
from nbkit.session.core import Session
from nbkit.train.plan import plan_run
from nbkit.train.trainer import train

RESOLUTION = 64
FLUX = {
    "text_encoder_steps": 0,
    "lora_rank": 8,
    "unet_lr": 2e-3,
    "flux_max_sequence_length": 16,
}


pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


def _flux_session(name, tiny_model_dir, **training):
    return make_session(name, tiny_model_dir("flux"), "flux", **{**FLUX, **training})


def _pipeline(folder):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def flow_loss(pipeline, prompt: str, *, seed: int = 0) -> float:
    """Mean flow-matching loss of a FluxPipeline on the subject photos at fixed noise levels.

    Written independently of nbkit.train: the pipeline's own prompt encoder, VAE and packing.
    """
    embeds, pooled, text_ids = pipeline.encode_prompt(prompt, None, max_sequence_length=16)
    vae, transformer = pipeline.vae, pipeline.transformer
    sigmas = torch.linspace(0.1, 0.9, 8).view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for index in range(3):
        image = subject_image(index, RESOLUTION)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        latents = latents.expand(len(sigmas), -1, -1, -1)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = (1 - sigmas) * latents + sigmas * noise
        batch, channels, height, width = latents.shape
        packed = pipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        prediction = transformer(
            hidden_states=packed,
            timestep=sigmas.flatten(),
            guidance=torch.ones(batch),
            pooled_projections=pooled.expand(batch, -1),
            encoder_hidden_states=embeds.expand(batch, -1, -1),
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        prediction = pipeline._unpack_latents(prediction, RESOLUTION, RESOLUTION, pipeline.vae_scale_factor)
        losses.append(torch.nn.functional.mse_loss(prediction, noise - latents).item())
    return float(np.mean(losses))


def _render(pipeline) -> np.ndarray:
    image = pipeline(
        PROMPT,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    return image


def test_lora_learns_the_subject_and_exports_a_loadable_lora(tiny_model_dir):
    _flux_session("learn", tiny_model_dir, unet_steps=60, unet_lr=5e-3)
    result = train("learn")
    assert result.finished and result.stage == "done"
    assert {stage for stage, _, _ in result.losses} == {"unet"} and len(result.losses) == 60
    checkpoint = result.session / "checkpoints" / "unet-000060"
    assert sorted(path.name for path in checkpoint.glob("*.safetensors"))[-1] == "transformer.safetensors"

    session = Session.open("learn")
    record = session.manifest.models[-1]
    assert (record.kind, record.family, record.name) == ("lora", "flux", "learn")
    assert set(record.files) == {"diffusers", "kohya"}
    diffusers_file = result.lora_files["diffusers"]
    keys = load_tensors(diffusers_file).keys()
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert any("single_transformer_blocks.0.proj_mlp" in key for key in keys)
    assert any("attn.add_q_proj" in key for key in keys)
    assert not any(key.startswith("transformer.proj_out") for key in keys)  # the output layer stays as is
    assert result.lora_files["kohya"].is_file()

    base = _pipeline(tiny_model_dir("flux"))
    before_loss, before_image = flow_loss(base, PROMPT), _render(base)
    base.load_lora_weights(diffusers_file.parent, weight_name=diffusers_file.name)
    after_loss, after_image = flow_loss(base, PROMPT), _render(base)
    assert after_loss < 0.9 * before_loss, (before_loss, after_loss)
    assert np.abs(after_image - before_image).max() > 1e-3


def test_full_fine_tune_and_text_encoder_training_of_flux_are_refused(tiny_model_dir):
    session = _flux_session("refused", tiny_model_dir)
    saved = (session.path / "session.json").read_bytes()
    with pytest.raises(NbkitError, match=re.escape(FLUX_FULL_FINE_TUNE)):
        train("refused", {"lora_rank": 0})
    with pytest.raises(NbkitError, match=r"training FLUX\.1's text encoders is not supported"):
        train("refused", {"text_encoder_steps": 2})
    with pytest.raises(NbkitError, match="overflows in float16"):
        train("refused", {"mixed_precision": "fp16"})
    assert (session.path / "session.json").read_bytes() == saved
    assert not (session.path / "checkpoints").exists() or not any((session.path / "checkpoints").iterdir())


def test_a_flux_session_at_the_sd_defaults_trains_a_lora(tiny_model_dir):
    from nbkit.session.manifest import BaseModelRef
    from nbkit.session.settings import TrainConfig

    base = BaseModelRef(source=str(tiny_model_dir("flux")), family="flux", prediction_type="flow")
    session = make_session("defaults", tiny_model_dir("flux"), "flux")
    session.manifest.base_model = base
    session.manifest.training = TrainConfig(resolution=RESOLUTION)
    session.save()
    config = plan_run(Session.open("defaults")).config
    assert (config.text_encoder_steps, config.lora_rank, config.unet_lr, config.unet_steps) == (
        0,
        16,
        1e-4,
        500,
    )
    # An explicit setting is the user's: kept, and refused when flux cannot do it.
    assert plan_run(Session.open("defaults"), {"unet_steps": 7}).config.unet_steps == 7
    with pytest.raises(NbkitError, match="text encoders is not supported"):
        plan_run(Session.open("defaults"), {"text_encoder_steps": 350})


def test_a_gpu_without_bf16_is_refused_before_anything_is_written(tiny_model_dir, monkeypatch):
    session = _flux_session("t4", tiny_model_dir)
    saved = (session.path / "session.json").read_bytes()
    files = sorted(path.relative_to(session.path) for path in session.path.rglob("*"))
    monkeypatch.setattr(memory, "device_facts", lambda index=0: memory.DeviceFacts("Tesla T4", 15.0, False))
    with pytest.raises(NbkitError, match=r"Tesla T4 cannot train a LoRA of FLUX\.1: it has no bfloat16"):
        train("t4")
    assert (session.path / "session.json").read_bytes() == saved
    assert sorted(path.relative_to(session.path) for path in session.path.rglob("*")) == files
    # A GPU that fits only with 4-bit weights is refused without bitsandbytes on CUDA (none here).
    monkeypatch.setattr(memory, "device_facts", lambda index=0: memory.DeviceFacts("NVIDIA L4", 22.5, True))
    monkeypatch.setattr(memory, "quantizers_installed", lambda *args: ("bitsandbytes",))
    with pytest.raises(NbkitError, match=r"NVIDIA L4 has 22 GiB: .* needs the (8bit|4bit) way"):
        train("t4")
    assert (session.path / "session.json").read_bytes() == saved


RESUMABLE = {
    "unet_steps": 4,
    "checkpoint_every": 2,
    "gradient_accumulation": 2,
    "random_flip": True,
    "lr_schedule": "linear",
    "lr_warmup_steps": 1,
}


def _final(result) -> dict[str, torch.Tensor]:
    return load_tensors(result.session / "checkpoints" / "unet-000004" / "transformer.safetensors")


def _fake_class_images(monkeypatch):
    # Class images come from nbkit.generation.generate, whose flux support is tested on its own.
    from nbkit.train import class_images

    def ensure(pipeline, prompt, count, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            subject_image(index + 7, RESOLUTION).rotate(90).save(
                class_images.class_image_path(out_dir, index)
            )

    monkeypatch.setattr(class_images, "ensure_class_images", ensure)


def test_clean_stops_with_prior_preservation_resume_bit_exact(tiny_model_dir, monkeypatch):
    _fake_class_images(monkeypatch)
    settings = {**RESUMABLE, "prior": {"class_prompt": "photo of a toy", "num_images": 2}}
    _flux_session("reference", tiny_model_dir, **settings)
    _flux_session("stopped", tiny_model_dir, **settings)
    reference = train("reference")
    first = train("stopped", max_steps_this_run=1)
    assert (first.stage, first.step) == ("unet", 1)
    second = train("stopped", resume=True)
    assert second.finished
    assert first.losses + second.losses == reference.losses
    assert_same_tensors(_final(second), _final(reference))


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume_is_bit_exact(tiny_model_dir, tmp_path):
    _flux_session("reference", tiny_model_dir, **RESUMABLE)
    _flux_session("killed", tiny_model_dir, **RESUMABLE)
    reference = train("reference")

    with paused_training(["killed"], "unet-000004", tmp_path / "stderr.txt", os.environ):
        session = Session.open("killed")
        assert session.manifest.state.last_checkpoint == "checkpoints/unet-000002"
        assert session.manifest.models == []

    with pytest.warns(UserWarning, match="stale lock"):
        resumed = train("killed", resume=True)
    assert resumed.finished
    assert [loss for _, step, loss in resumed.losses] == [loss for _, step, loss in reference.losses][2:]
    assert_same_tensors(_final(resumed), _final(reference))
    for kind in ("diffusers", "kohya"):
        assert_same_tensors(load_tensors(resumed.lora_files[kind]), load_tensors(reference.lora_files[kind]))
    state = json.loads((resumed.session / "checkpoints" / "unet-000004" / "trainer_state.json").read_text())
    assert state["roles"] == {"transformer": "lora"}


def test_resume_keeps_the_flux_settings_and_the_base_quantization(tmp_path):
    from nbkit.session.manifest import BaseModelRef
    from nbkit.session.settings import TrainConfig
    from nbkit.train.inputs import check_resume

    base = BaseModelRef(source="tiny-flux", family="flux", prediction_type="flow")
    config = TrainConfig(lora_rank=16, text_encoder_steps=0)
    saved = {"config": config.to_dict(), "base_model": base.to_dict(), "quantized_base": "8bit"}
    check_resume(config, base, saved, tmp_path, quantization="8bit")
    with pytest.raises(NbkitError, match="quantization was '8bit' in the checkpoint but is '4bit'") as error:
        check_resume(config, base, saved, tmp_path, quantization="4bit")
    assert "--quantize-base 8bit" in str(error.value)
    with pytest.raises(NbkitError, match="flux_max_sequence_length was 512"):
        check_resume(config.replace(flux_max_sequence_length=256), base, saved, tmp_path, quantization="8bit")
    # Checkpoints written before these settings existed resume as before.
    old = {
        "config": {k: v for k, v in config.to_dict().items() if not k.startswith("flux_")},
        "base_model": base.to_dict(),
    }
    check_resume(config.replace(flux_max_sequence_length=256), base, old, tmp_path, quantization="4bit")


def test_a_flux_session_starts_from_flux_settings_and_refuses_sd_noise_settings(tmp_path):
    from nbkit.session.core import Session
    from nbkit.session.manifest import BaseModelRef
    from nbkit.train.inputs import check_family_config

    base = BaseModelRef(source="tiny-flux", family="flux", prediction_type="flow")
    training = Session.create("f", root=tmp_path, base_model=base).manifest.training
    assert (training.text_encoder_steps, training.lora_rank, training.unet_steps, training.unet_lr) == (
        0,
        16,
        500,
        1e-4,
    )
    check_family_config("flux", training)
    for setting in ({"min_snr_gamma": 5.0}, {"offset_noise": 0.05}):
        with pytest.raises(NbkitError, match="SD noise-schedule settings"):
            check_family_config("flux", training.replace(**setting))


def test_a_class_prompt_set_after_a_stop_blocks_the_resume_only_when_prior_preservation_uses_it(tmp_path):
    from nbkit.session.manifest import BaseModelRef
    from nbkit.session.settings import TrainConfig
    from nbkit.train.inputs import check_resume

    base = BaseModelRef(source="tiny-sd1", family="sd1", prediction_type="epsilon")
    config = TrainConfig()
    saved = {"config": config.to_dict(), "base_model": base.to_dict()}
    prior = config.prior
    worded = config.replace(prior=prior.replace(class_prompt="photo of a dog").to_dict())
    check_resume(worded, base, saved, tmp_path, quantization=None)  # prior off: the prompt trains nothing
    used = config.replace(prior=prior.replace(class_prompt="photo of a dog", num_images=10).to_dict())
    with pytest.raises(NbkitError, match=r"cannot resume: prior\.class_prompt was ''"):
        check_resume(used, base, saved, tmp_path, quantization=None)
