"""Real-size memory: the traced peak matches a measured one, and the real configs build at full width.

How the 10% check measures: the same step runs for real on CPU on nbkit's tiny SD 1.x model while
`torch.profiler` records every allocation and free of PyTorch's CPU allocator ("[memory]" events,
their sizes and timestamps). Their running sum from the step's start gives the peak the allocator
reached above what was already live; that baseline (parameters, buffers, optimizer states, which
exist before the step) is summed from the live storages themselves. Nothing of `MemTracker` is used
on that side, so the check compares the fake-tensor trace with the allocator, kernels' own scratch
buffers included.
"""

from __future__ import annotations

import pytest
import torch

from nbkit.models.tiny import build_tiny_pipeline
from nbkit.realsize.memory_trace import (
    GenerateSettings,
    TrainSettings,
    prepare_generation,
    prepare_training,
    track_peak,
)

MODELS = ("unet", "vae", "text_encoder")


def _models(fake_mode=None) -> dict[str, torch.nn.Module]:
    if fake_mode is None:
        pipeline = build_tiny_pipeline("sd1")
    else:
        with fake_mode:
            pipeline = build_tiny_pipeline("sd1")
    return {name: getattr(pipeline, name) for name in MODELS}


def _live_bytes(models, optimizer) -> int:
    tensors = [t for model in models.values() for t in (*model.parameters(), *model.buffers())]
    tensors += [p.grad for model in models.values() for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _measured_peak(prepare, settings) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    models = _models()
    step = prepare(models, settings)
    baseline = _live_bytes(models, getattr(step, "optimizer", None))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return baseline + peak


def _traced_peak(prepare, settings) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    models = _models(fake_mode)
    with fake_mode:
        step = prepare(models, settings)
    return track_peak(step, models, fake_mode=fake_mode).peak_bytes


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(64, precision="fp32", gradient_checkpointing=False),
        TrainSettings(64, batch=2, precision="fp16", gradient_checkpointing=True),
        TrainSettings(64, precision="fp16", lora_rank=4, stage="text_encoder"),
    ],
    ids=["fp32-full", "fp16-full-checkpointing", "fp16-lora-text-encoder"],
)
def test_traced_training_peak_matches_the_allocator_within_10_percent(settings):
    traced = _traced_peak(prepare_training, settings)
    measured = _measured_peak(prepare_training, settings)
    assert traced == pytest.approx(measured, rel=0.10), (traced, measured)


def test_traced_generation_peak_matches_the_allocator_within_10_percent():
    settings = GenerateSettings(64, batch=2, precision="fp32")
    traced = _traced_peak(prepare_generation, settings)
    measured = _measured_peak(prepare_generation, settings)
    assert traced == pytest.approx(measured, rel=0.10), (traced, measured)


def test_every_shipped_real_config_builds_at_full_width_on_meta():
    from nbkit.realsize.random_models import build_meta_models, parameter_count, real_config_folders

    counts = {
        family: {name: parameter_count(model) for name, model in build_meta_models(family).items()}
        for family in real_config_folders()
    }
    assert round(counts["sd1"]["unet"] / 1e6, 1) == 859.5
    assert round(counts["sdxl"]["unet"] / 1e6, 1) == 2567.5
    assert round(counts["flux"]["transformer"] / 1e9, 2) == 11.90
    assert round(counts["flux"]["text_encoder_2"] / 1e9, 2) == 4.76


@pytest.mark.slow
def test_a_full_width_sd1_folder_is_written_and_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from nbkit.realsize.random_models import save_random_model

    folder = save_random_model("sd1", tmp_path / "sd1")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert sum(p.numel() for p in pipeline.unet.parameters()) == 859_520_964
