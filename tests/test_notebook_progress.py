"""The training cell's live view: its status line from a run's progress (step, elapsed, time left)."""

from __future__ import annotations

import types

from nbkit.notebook.progress import LiveTraining, position
from nbkit.session.settings import TrainConfig


def _result(stage: str, step: int, denoiser: str = "UNet", **config) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        stage=stage, step=step, config=TrainConfig(**config), samples=[], loss_plot=None, denoiser=denoiser
    )


def test_the_position_counts_both_stages():
    config = {"text_encoder_steps": 10, "unet_steps": 30}
    assert position(_result("text_encoder", 4, **config)) == (4, 40)
    assert position(_result("unet", 5, **config)) == (15, 40)
    assert position(_result("done", 30, **config)) == (40, 40)
    assert position(_result("unet", 7, text_encoder_steps=0, unet_steps=20)) == (7, 20)


def test_the_time_left_comes_from_this_calls_own_pace(monkeypatch):
    clock = iter([100.0, 110.0, 120.0])  # started; first step seen; 10 steps later
    monkeypatch.setattr("nbkit.notebook.progress.time.monotonic", lambda: next(clock))
    live = LiveTraining(min_interval=0)
    config = {"text_encoder_steps": 0, "unet_steps": 100}
    live(_result("unet", 51, **config))  # a resumed run: its first step here is 51
    assert live.status == "Step 51/100 (UNet), 0:00:10 elapsed"
    live(_result("unet", 61, **config))  # 10 steps in 10 s: 39 left
    assert live.status == "Step 61/100 (UNet), 0:00:20 elapsed, about 0:00:39 left"


def test_the_second_stage_is_named_by_the_familys_denoiser():
    from nbkit.families import get_family

    live = LiveTraining(min_interval=0)
    flux = get_family("flux")
    live(_result("unet", 3, denoiser=flux.denoiser_title, text_encoder_steps=0, unet_steps=10))
    assert live.status.startswith("Step 3/10 (transformer)")
    live(_result("text_encoder", 2, text_encoder_steps=5, unet_steps=10))
    assert live.status.startswith("Step 2/15 (text encoder)")
