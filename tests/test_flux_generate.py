"""FLUX.1 through nbkit's generation loop on the tiny Flux model (CPU, 64 px, 2 steps)."""

from __future__ import annotations

import numpy as np
import pytest

from nbkit.errors import NbkitError
from nbkit.families.flux1 import flux_sequence_length
from nbkit.generation.generate import GenerationSettings, check_inputs, generate, generate_images
from nbkit.generation.hires import HiresFix
from nbkit.generation.infotext import parse_infotext
from nbkit.generation.placement import (
    apply_memory_option,
    generation_dtype,
    pipeline_family,
    plan_generation_memory,
)
from nbkit.generation.samplers import build_scheduler, resolve
from nbkit.models.memory import DeviceFacts, MemoryOption

FAST = {"seeds": 1234, "steps": 2, "width": 64, "height": 64, "guidance_scale": 1.0, "sampler": "Euler"}


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir("flux"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pixels(result):
    return [np.asarray(image) for image in result.images]


def test_flux_txt2img_same_seed_same_image_and_forge_infotext(flux):
    assert pipeline_family(flux) == "flux" and flux_sequence_length(flux) == 512
    first = generate(flux, ["a dog", "a cat"], **FAST)
    again = generate(flux, ["a dog", "a cat"], **FAST)
    assert first.seeds == [1234, 1235]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again), strict=True))
    other = generate(flux, ["a dog"], **{**FAST, "seeds": 99})
    assert not np.array_equal(_pixels(first)[0], _pixels(other)[0])
    # Image i depends on its own seed only: the second image alone, with its seed, is the same.
    alone = generate(flux, ["a cat"], **{**FAST, "seeds": 1235})
    assert np.array_equal(_pixels(first)[1], _pixels(alone)[0])
    info = parse_infotext(first.infotexts[0])
    assert info.parameters["Distilled CFG Scale"] == "3.5" and info.distilled_cfg_scale == 3.5
    assert info.sampler == "Euler" and info.schedule == "Simple" and info.cfg_scale == 1.0
    assert info.seed == 1234 and info.size == (64, 64)
    assert first.images[0].size == (64, 64)


def test_distilled_guidance_changes_the_image_and_is_written(flux):
    low = generate(flux, ["a dog"], **FAST, distilled_guidance=1.0)
    high = generate(flux, ["a dog"], **FAST, distilled_guidance=9.0)
    assert not np.array_equal(_pixels(low)[0], _pixels(high)[0])
    assert "Distilled CFG Scale: 9," in high.infotexts[0]


def test_true_cfg_only_with_a_negative_prompt_and_cfg_above_one(flux):
    plain = generate(flux, ["a dog"], **FAST)
    # CFG 1 with a negative prompt: no negative pass, the same image.
    ignored = generate(flux, ["a dog"], **FAST, negative_prompt="blurry")
    assert np.array_equal(_pixels(plain)[0], _pixels(ignored)[0])
    true_cfg = generate(flux, ["a dog"], **{**FAST, "guidance_scale": 4.0}, negative_prompt="blurry")
    assert not np.array_equal(_pixels(plain)[0], _pixels(true_cfg)[0])
    info = parse_infotext(true_cfg.infotexts[0])
    assert info.negative_prompt == "blurry" and info.cfg_scale == 4.0


@pytest.mark.parametrize(("negative", "cfg"), [("", 7.0), ("blurry", 0.5)])
def test_infotext_names_cfg_1_when_true_cfg_did_not_run(flux, negative, cfg):
    """No negative prompt, or CFG <= 1: no true CFG ran (the same image as CFG 1), so the infotext says 1."""
    plain = generate(flux, ["a dog"], **FAST)
    asked = generate(flux, ["a dog"], **{**FAST, "guidance_scale": cfg}, negative_prompt=negative)
    assert np.array_equal(_pixels(plain)[0], _pixels(asked)[0])
    assert "CFG scale: 1," in asked.infotexts[0] and parse_infotext(asked.infotexts[0]).cfg_scale == 1.0


def test_sd_sampler_and_schedule_on_flux_run_as_the_flow_ones(flux):
    plain = generate(flux, ["a dog"], **FAST)
    sd = generate(flux, ["a dog"], **{**FAST, "sampler": "DPM++ 2M"}, schedule="SGM Uniform")
    assert np.array_equal(_pixels(plain)[0], _pixels(sd)[0])  # Euler on the model's own (Simple) sigmas
    assert [line.split(":")[0] for line in sd.warnings] == [
        "Sampler substitution",
        "Schedule type substitution",
    ]
    info = parse_infotext(sd.infotexts[0])
    assert info.sampler == "Euler" and info.schedule == "Simple"
    assert info.parameters["Sampler substitution"].startswith(
        "DPM++ 2M ran as Euler: nbkit runs FLUX.1 models"
    )
    # The same names stay A1111's for SD models.
    assert resolve("DPM++ 2M", "Automatic")[1].label == "Karras"


def test_flow_schedules_build_and_run(flux):
    scheduler = build_scheduler(flux.scheduler.config, "Euler", "Karras", "flux")
    assert (
        type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.use_karras_sigmas
    )
    assert scheduler.config.use_dynamic_shifting  # the model's own config is kept
    result = generate(flux, ["a dog"], **FAST, schedule="Karras")
    assert "Schedule type: Karras" in result.infotexts[0]
    assert type(flux.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not flux.scheduler.config.use_karras_sigmas  # the pipeline's scheduler is restored


def test_flux_sizes_are_multiples_of_16():
    settings = GenerationSettings(prompts=["a"], width=72, height=64, family="flux", sampler="Euler")
    with pytest.raises(
        ValueError, match=r"width must be a positive multiple of 16 for FLUX\.1 models, got 72"
    ):
        check_inputs(settings)
    check_inputs(GenerationSettings(prompts=["a"], width=72, height=64))  # SD: multiples of 8


def test_flux_img2img_through_from_pipe(flux):
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    img2img = AutoPipelineForImage2Image.from_pipe(flux)
    assert type(img2img).__name__ == "FluxImg2ImgPipeline"
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    settings = GenerationSettings(
        prompts=["a dog"], seeds=7, steps=3, width=64, height=64, guidance_scale=1.0, sampler="Euler"
    )
    settings.inputs = {"image": image, "strength": 0.7}
    first = generate_images(img2img, settings)
    again = generate_images(img2img, settings)
    assert np.array_equal(_pixels(first)[0], _pixels(again)[0])
    assert "Distilled CFG Scale: 3.5" in first.infotexts[0]


def test_progress_previews_get_unpacked_latents(flux):
    seen = []
    generate(flux, ["a dog"], **FAST, on_step=lambda step: seen.append(step))
    assert [step.step for step in seen] == [1, 2]
    # FLUX.1 packs 2x2 patches into tokens; on_step gets (batch, 16, H/8, W/8) back.
    assert tuple(seen[0].latents.shape) == (1, 16, 8, 8)
    from nbkit.webui.service import latent_preview

    assert latent_preview(seen[-1].latents).size == (8, 8)


def test_hires_fix_on_flux_pixels_only(flux):
    settings = GenerationSettings(
        prompts=["a dog"], seeds=5, **{k: v for k, v in FAST.items() if k != "seeds"}
    )
    settings.hires = HiresFix(scale=1.5, upscaler="Latent", denoising_strength=0.7)
    with pytest.raises(ValueError, match=r"Latent.*FLUX\.1 models pack.*Lanczos"):
        generate_images(flux, settings)
    settings.hires = HiresFix(scale=1.5, upscaler="Lanczos", denoising_strength=0.7)
    result = generate_images(flux, settings)
    assert result.images[0].size == (96, 96)  # 64 * 1.5, a multiple of 16
    assert "Hires upscaler: Lanczos" in result.infotexts[0]


def test_memory_plan_refuses_a_t4_and_passes_the_cpu(monkeypatch):
    import nbkit.models.memory as memory

    monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("Tesla T4", 15.0, bf16=False))
    with pytest.raises(NbkitError, match=r"Tesla T4 cannot run FLUX\.1: it has no bfloat16"):
        plan_generation_memory("flux", "cuda")
    assert plan_generation_memory("flux", "cpu") is None
    assert plan_generation_memory("sdxl", "cuda").name == "resident"  # SDXL in fp16 fits a T4 whole
    monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("A100", 79.0, bf16=True))
    assert plan_generation_memory("flux", "cuda").name == "bf16"


class _FakePipeline:
    """Records how it is placed (the CPU here has no GPU to place it on)."""

    def __init__(self):
        self.calls = []

    def to(self, device):
        self.calls.append(("to", str(device)))
        return self

    def enable_model_cpu_offload(self, device=None):
        self.calls.append(("offload", str(device)))


@pytest.mark.parametrize(
    ("option", "offload", "expected"),
    [
        (None, False, ("to", "cuda")),
        (None, True, ("offload", "cuda")),
        (MemoryOption("bf16", "on the GPU", 30.0), False, ("to", "cuda")),
        (MemoryOption("bf16", "on the GPU", 30.0), True, ("offload", "cuda")),  # low VRAM asked
        (MemoryOption("bf16-offload", "offload", 20.0, offload=True), False, ("offload", "cuda")),
        (
            MemoryOption("8bit-offload", "8 bits", 12.0, quantization="8bit", offload=True),
            False,
            ("offload", "cuda"),
        ),
    ],
)
def test_apply_memory_option_offloads_when_the_plan_or_the_caller_asks(option, offload, expected):
    pipeline = _FakePipeline()
    assert apply_memory_option(pipeline, option, "cuda", offload=offload) is pipeline
    assert pipeline.calls == [expected]


def test_generation_dtype_is_bf16_for_flux_on_cuda_only():
    import torch

    from nbkit.generation.session_models import _default_device_and_dtype

    assert generation_dtype("flux", "cuda") == torch.bfloat16
    assert generation_dtype("sdxl", "cuda") == generation_dtype(None, "cuda") == torch.float16
    assert generation_dtype("flux", "cpu") == generation_dtype(None, "cpu") == torch.float32
    assert _default_device_and_dtype("cuda", None, "flux") == (torch.device("cuda"), torch.bfloat16)
    assert _default_device_and_dtype("cpu", torch.float16, "flux") == (torch.device("cpu"), torch.float16)


def test_session_flux_lora_loads_base_plus_lora(tmp_path, tiny_model_dir, flux, monkeypatch):
    """A session's Flux LoRA export loads as base + LoRA, and a faked T4 is refused before loading."""
    import types

    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import nbkit.models.memory as memory
    from nbkit.generation.session_models import SESSION_PIPELINES, load_session_pipeline
    from nbkit.session.manifest import ExportedModel

    base = generate(flux, ["a dog"], **FAST)
    flux.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in flux.transformer.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        trained = generate(flux, ["a dog"], **FAST)
        FluxPipeline.save_lora_weights(
            tmp_path / "models" / "dog-lora",
            transformer_lora_layers=get_peft_model_state_dict(flux.transformer),
        )
    finally:
        flux.transformer.delete_adapters("default")
    record = ExportedModel(
        name="dog-lora",
        kind="lora",
        files={"diffusers": "models/dog-lora/pytorch_lora_weights.safetensors"},
        family="flux",
        resolution=64,
        base_model=str(tiny_model_dir("flux")),
        created="2025-01-02T00:00:00+00:00",
        sha256={},
    )
    session = types.SimpleNamespace(
        name="dog", path=tmp_path, manifest=types.SimpleNamespace(models=[record])
    )
    SESSION_PIPELINES.release()
    try:
        monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("Tesla T4", 15.0, bf16=False))
        with pytest.raises(NbkitError, match="no bfloat16"):
            load_session_pipeline(session, device="cuda")
        pipeline = load_session_pipeline(session, device="cpu")
        pipeline.set_progress_bar_config(disable=True)
        loaded = generate(pipeline, ["a dog"], **FAST)
    finally:
        SESSION_PIPELINES.release()
    assert not np.array_equal(_pixels(loaded)[0], _pixels(base)[0])
    assert np.abs(_pixels(loaded)[0].astype(int) - _pixels(trained)[0]).max() <= 1


def test_schnell_starts_from_its_four_steps_and_dev_from_forges_defaults():
    from nbkit.families import get_family

    flux = get_family("flux")
    schnell = flux.make_tiny_pipeline(guidance=False)
    assert (
        tuple(flux.generation_defaults(schnell))[:3] == (4, 1.0, "Euler")
        and flux.generation_defaults(schnell).own
    )
    dev = flux.generation_defaults(flux.make_tiny_pipeline())
    assert (dev.steps, dev.cfg_scale, dev.own) == (20, 1.0, False)
