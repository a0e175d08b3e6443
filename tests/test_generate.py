"""The generation loop: sizes, A1111 seeds, sampler swaps, infotexts, progress, and session models."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import threading
import types
import weakref

import numpy as np
import pytest
import torch

from nbkit.errors import NbkitError
from nbkit.generation.generate import VERSION, GenerationSettings, check_inputs, generate
from nbkit.generation.infotext import parse_infotext
from nbkit.generation.session_models import (
    SESSION_PIPELINES,
    find_model,
    infotext_fields,
    load_session_pipeline,
)
from nbkit.session.manifest import ExportedModel

FAST = {"steps": 2, "width": 64, "height": 64, "guidance_scale": 7.0}


@pytest.fixture(scope="module")
def sd1(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pixels(result):
    return [np.asarray(image) for image in result.images]


class CountingPipeline:
    """Counts the calls of a pipeline; every other attribute (the scheduler too) is the pipeline's."""

    def __init__(self, pipeline):
        object.__setattr__(self, "pipeline", pipeline)
        object.__setattr__(self, "calls", 0)

    def __call__(self, **kwargs):
        object.__setattr__(self, "calls", self.calls + 1)
        return self.pipeline(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __setattr__(self, name, value):
        setattr(self.pipeline, name, value)


def test_requested_size_count_and_infotexts(sd1):
    original = sd1.scheduler
    result = generate(
        sd1,
        ["a photo of sks dog", "a dog, on: the beach"],
        negative_prompt="blurry",
        seeds=1234,
        steps=2,
        width=64,
        height=128,
        guidance_scale=6.5,
        sampler="DPM++ 2M",
        model_name="my model",
        model_hash="0123456789",
        extra_parameters={"Lora hashes": "sks: abcdef012345"},
    )
    assert sd1.scheduler is original  # the swap was for this call only
    assert [image.size for image in result.images] == [(64, 128), (64, 128)]
    assert result.seeds == [1234, 1235] and not result.interrupted
    first, second = (parse_infotext(text) for text in result.infotexts)
    assert first.prompt == "a photo of sks dog" and second.prompt == "a dog, on: the beach"
    assert first.negative_prompt == "blurry" and second.seed == 1235
    assert first.parameters == {
        "Steps": "2",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",  # A1111's Automatic for DPM++ 2M
        "CFG scale": "6.5",
        "Seed": "1234",
        "Size": "64x128",
        "Model hash": "0123456789",
        "Model": "my model",
        "Lora hashes": "sks: abcdef012345",
        "Version": VERSION,
    }


def test_same_seed_same_pixels_and_batch_seeds_count_up(sd1):
    prompts = ["a photo of sks dog", "a painting of sks dog"]
    first = _pixels(generate(sd1, prompts, seeds=7, **FAST))
    again = _pixels(generate(sd1, prompts, seeds=7, **FAST))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # Image i is seed + i: drawn alone with seed 8, prompt 1 gives the same pixels.
    alone = generate(sd1, prompts[1:], seeds=8, **FAST)
    assert alone.seeds == [8] and np.array_equal(_pixels(alone)[0], first[1])
    # ... and so does a per-image seed list, and a batch of several images per call.
    batches = []
    listed = generate(
        sd1, prompts[::-1], seeds=[8, 7], batch_size=2, on_batch=lambda *batch: batches.append(batch), **FAST
    )
    assert len(batches) == 1 and batches[0][0] == [0, 1] and batches[0][2] == listed.infotexts
    # Batched matrix products may differ from single images in the last float bits, not visibly.
    for a, b in zip(_pixels(listed), first[::-1], strict=True):
        assert np.abs(a.astype(int) - b).max() <= 2
    other = _pixels(generate(sd1, prompts[:1], seeds=99, **FAST))
    assert np.abs(other[0].astype(int) - first[0]).max() > 10


def test_random_seed_is_reported_and_reproduces(sd1):
    result = generate(sd1, ["a", "b"], seeds=-1, **FAST)
    seed = result.seeds[0]
    assert isinstance(seed, int) and 0 <= seed < 2**32 and result.seeds == [seed, seed + 1]
    assert parse_infotext(result.infotexts[1]).seed == seed + 1
    again = generate(sd1, ["a", "b"], seeds=seed, **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(result), _pixels(again), strict=True))
    mixed = generate(sd1, ["a", "b"], seeds=[5, -1], **FAST)
    assert mixed.seeds[0] == 5 and mixed.seeds[1] >= 0


def test_sampler_changes_the_image_but_not_the_pipeline(sd1):
    base = _pixels(generate(sd1, ["x"], seeds=3, sampler=None, **FAST))[0]
    euler = _pixels(generate(sd1, ["x"], seeds=3, sampler="Euler", **FAST))[0]
    plms = generate(sd1, ["x"], seeds=3, sampler="PLMS", **FAST)
    assert not np.array_equal(base, euler)
    assert np.array_equal(base, _pixels(plms)[0])  # the tiny sd1 model ships PLMS (PNDM)
    assert parse_infotext(plms.infotexts[0]).parameters["Schedule type"] == "Automatic"
    own = generate(sd1, ["x"], seeds=3, sampler=None, **FAST)
    assert "Schedule type" not in parse_infotext(own.infotexts[0]).parameters  # the model's plain one
    assert parse_infotext(own.infotexts[0]).sampler == "PLMS"


def test_v_prediction_survives_the_sampler_swap(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd2-v"))
    pipeline.set_progress_bar_config(disable=True)
    used = []
    result = generate(
        pipeline,
        ["x"],
        seeds=1,
        sampler="Euler a",
        on_step=lambda progress: used.append(pipeline.scheduler),
        **FAST,
    )
    assert {type(s).__name__ for s in used} == {"EulerAncestralDiscreteScheduler"}
    assert used[0].config.prediction_type == "v_prediction"
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert parse_infotext(result.infotexts[0]).sampler == "Euler a"


def test_progress_and_interrupt(sd1):
    steps, interrupt = [], threading.Event()

    def on_step(progress):
        steps.append((progress.batch, progress.batches, progress.images, progress.step, progress.steps))
        assert progress.latents.shape == (1, 4, 8, 8)
        interrupt.set()  # stop after the first step

    pipeline = CountingPipeline(sd1)
    result = generate(pipeline, ["a", "b", "c"], seeds=1, on_step=on_step, interrupt=interrupt, **FAST)
    assert result.interrupted and pipeline.calls == 1
    assert steps == [(0, 3, [0], 1, 2)]  # diffusers skipped the second step
    assert len(result.images) == len(result.infotexts) == 1 and result.seeds == [1]
    assert pipeline.scheduler is sd1.scheduler

    steps.clear()
    generate(sd1, ["a"], seeds=1, on_step=lambda progress: steps.append(progress.step), **FAST)
    assert steps == [1, 2]


def test_scheduler_is_restored_when_generation_fails(sd1):
    original = sd1.scheduler

    def explode(progress):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(sd1, ["x"], seeds=1, sampler="Euler", on_step=explode, **FAST)
    assert sd1.scheduler is original


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 60}, "width must be a positive multiple of 8, got 60"),
        ({"height": 0}, "height must be a positive multiple of 8, got 0"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"seeds": "1"}, "seeds must be integers.*got '1'"),
        ({"seeds": -2}, "got -2"),
        ({"seeds": [1]}, "1 seeds for 2 prompts"),
        ({"seeds": [1, True]}, "got True"),
        ({"prompts": []}, "prompts must be a non-empty list"),
        ({"prompts": "a dog"}, "prompts must be a non-empty list"),
        ({"negative_prompt": ["x"]}, "1 negative prompts for 2 prompts"),
        ({"guidance_scale": -1}, "guidance_scale must be a number >= 0, got -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"sampler": 3}, "sampler must be a sampler name"),
        ({"schedule": ["Karras"]}, "schedule must be a schedule type"),
    ],
)
def test_bad_settings_fail_before_anything_is_generated(sd1, change, message):
    settings = {"prompts": ["a", "b"], "seeds": 1, **FAST, **change}
    with pytest.raises(ValueError, match=message):
        check_inputs(GenerationSettings(**settings))
    pipeline = CountingPipeline(sd1)
    with pytest.raises(ValueError, match=message):
        generate(pipeline, settings.pop("prompts"), **settings)
    assert pipeline.calls == 0


# --- session models ---------------------------------------------------------------------------------


@pytest.fixture
def empty_slot():
    SESSION_PIPELINES.release()
    yield
    SESSION_PIPELINES.release()


def _session(path, models):
    return types.SimpleNamespace(name="dog", path=path, manifest=types.SimpleNamespace(models=models))


def _full_model(session_dir, tiny_model_dir, name, created):
    shutil.copytree(tiny_model_dir("sd1"), session_dir / "models" / name)
    return ExportedModel(
        name=name,
        kind="full",
        files={"folder": f"models/{name}", "single_file": f"models/{name}.safetensors"},
        family="sd1",
        resolution=64,
        base_model="tiny-sd1",
        created=created,
        sha256={f"models/{name}.safetensors": "ab" * 32},
    )


def _lora_model(session_dir, tiny_model_dir, created):
    """A LoRA trained "by hand": peft adapters with random weights, saved as nbkit exports them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from nbkit.train.lora_export import save_lora

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    files = save_lora(pipeline.unet, None, session_dir / "models" / "dog-lora", family="sd1", metadata={})
    record = ExportedModel(
        name="dog-lora",
        kind="lora",
        files={role: str(path.relative_to(session_dir)) for role, path in files.items()},
        family="sd1",
        resolution=64,
        base_model=str(tiny_model_dir("sd1")),
        created=created,
        sha256={"models/dog-lora/dog-lora.safetensors": "cd" * 32},
    )
    trained = _pixels(generate(pipeline, ["a photo of sks dog"], seeds=0, sampler=None, **FAST))[0]
    return record, trained


def test_session_models_load_through_a_one_slot_cache(tmp_path, tiny_model_dir, empty_slot):
    full = _full_model(tmp_path, tiny_model_dir, "dog-full", "2025-01-01T00:00:00+00:00")
    lora, trained = _lora_model(tmp_path, tiny_model_dir, "2025-01-02T00:00:00+00:00")
    session = _session(tmp_path, [lora, full])

    pipeline = load_session_pipeline(session, "dog-full", device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    assert SESSION_PIPELINES.loaded is full and pipeline.unet.dtype == torch.float32
    assert load_session_pipeline(session, "dog-full", device="cpu") is pipeline  # cached
    base = _pixels(generate(pipeline, ["a photo of sks dog"], seeds=0, sampler=None, **FAST))[0]
    released = weakref.ref(pipeline)
    del pipeline

    newest = load_session_pipeline(session, device="cpu")  # None: the newest, the LoRA
    gc.collect()
    assert released() is None, "the previous model is still in memory"
    assert SESSION_PIPELINES.loaded is lora
    newest.set_progress_bar_config(disable=True)
    with_lora = _pixels(generate(newest, ["a photo of sks dog"], seeds=0, sampler=None, **FAST))[0]
    assert np.abs(with_lora.astype(int) - base).max() > 10, "the LoRA must change the image"
    assert np.abs(with_lora.astype(int) - trained).max() <= 1, "the LoRA must do what it did when trained"


def test_unknown_or_missing_models_are_user_errors(tmp_path, tiny_model_dir, empty_slot):
    full = _full_model(tmp_path, tiny_model_dir, "dog-full", "2025-01-01T00:00:00+00:00")
    gone = ExportedModel(
        name="gone", kind="lora", files={"kohya": "models/gone.safetensors"}, family="sd1", resolution=64,
        base_model="tiny-sd1",
    )  # fmt: skip
    session = _session(tmp_path, [full, gone])
    with pytest.raises(NbkitError, match="has no model named 'dog'; its models are: dog-full, gone"):
        load_session_pipeline(session, "dog", device="cpu")
    with pytest.raises(NbkitError, match=r"models/gone\.safetensors, but none of them exists") as caught:
        load_session_pipeline(session, "gone", device="cpu")
    assert "export the LoRA again" in str(caught.value)
    with pytest.raises(NbkitError, match="has no exported models yet"):
        find_model(_session(tmp_path, []))
    assert SESSION_PIPELINES.loaded is None


def test_infotext_fields_name_the_model_as_a1111_does():
    full = ExportedModel(
        name="dog", kind="full", files={"folder": "models/dog", "single_file": "models/dog-v1.safetensors"},
        family="sd1", resolution=512, base_model="sd15", sha256={"models/dog-v1.safetensors": "0123456789" + "f" * 54},
    )  # fmt: skip
    assert infotext_fields(full) == {
        "model_name": "dog-v1",
        "model_hash": "0123456789",
        "extra_parameters": {},
    }
    lora = ExportedModel(
        name="dog-lora", kind="lora", files={"kohya": "models/l/dog.safetensors"}, family="sd1", resolution=512,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", sha256={"models/l/dog.safetensors": "a" * 64},
    )  # fmt: skip
    assert infotext_fields(lora) == {
        "model_name": "stable-diffusion-v1-5",
        "model_hash": None,
        "extra_parameters": {"Lora hashes": "dog: aaaaaaaaaaaa"},
    }


def test_hires_fix_skip_and_infotext_prompts(sd1):
    from nbkit.generation.generate import GenerationSettings, generate_images
    from nbkit.generation.hires import HiresFix

    settings = GenerationSettings(
        prompts=["a dog"] * 2,
        infotext_prompts=["a dog <lora:x:1>"] * 2,
        seeds=3,
        batch_size=1,
        hires=HiresFix(scale=2, upscaler="Latent (bicubic)", denoising_strength=0.5),
        **{**FAST, "guidance_scale": 7.0},
    )
    skip = threading.Event()

    def on_step(step):
        if step.batch == 0 and not step.hires and step.step == 1:
            skip.set()  # batch 0 ends in its first pass: no hires pass for it

    result = generate_images(sd1, settings, on_step=on_step, skip=skip)
    assert [image.size for image in result.images] == [(64, 64), (128, 128)]
    assert not result.interrupted and not skip.is_set()
    info = parse_infotext(result.infotexts[1])
    assert info.prompt == "a dog <lora:x:1>"
    assert info.parameters["Hires upscaler"] == "Latent (bicubic)" and info.parameters["Hires upscale"] == "2"
    with pytest.raises(ValueError, match="hires scale"):
        generate_images(sd1, dataclasses.replace(settings, hires=HiresFix(scale=0)))
