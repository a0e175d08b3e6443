"""The training log: CSV and TensorBoard per step, cut cleanly on resume, and the loss plot."""

from __future__ import annotations

import matplotlib
import pytest
from PIL import Image

from nbkit.train.progress_log import TrainingLog


def _tensorboard_steps(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, round(event.value, 6)) for event in accumulator.Scalars(tag)]


def test_rows_are_flushed_each_step_and_read_back(tmp_path):
    log = TrainingLog(tmp_path)
    log.log(1, "text_encoder", 0.5, 1e-6)
    log.log(2, "text_encoder", 0.25, 1e-6)
    # Readable before close: a Colab disconnect right now must not lose the rows.
    rows = TrainingLog(tmp_path).read_csv()
    assert [(row["step"], row["stage"], row["loss"], row["lr"]) for row in rows] == [
        (1, "text_encoder", 0.5, 1e-6),
        (2, "text_encoder", 0.25, 1e-6),
    ]
    log.log(3, "unet", 0.125, 2e-6)
    log.close()
    assert _tensorboard_steps(tmp_path, "loss/text_encoder") == [(1, 0.5), (2, 0.25)]
    assert _tensorboard_steps(tmp_path, "lr/unet") == [(3, 2e-6)]


def test_resume_drops_rows_at_and_after_the_resume_step(tmp_path):
    with TrainingLog(tmp_path) as first_run:
        for step in range(1, 8):  # killed after step 7; the last checkpoint was at step 4
            first_run.log(step, "unet", 1.0 / step, 1e-4)
    with TrainingLog(tmp_path) as resumed:
        for step in range(5, 10):
            resumed.log(step, "unet", 2.0 / step, 1e-4)
    rows = TrainingLog(tmp_path).read_csv()
    assert [row["step"] for row in rows] == list(range(1, 10))
    assert [row["loss"] for row in rows] == [1.0 / s for s in range(1, 5)] + [2.0 / s for s in range(5, 10)]
    # TensorBoard's purge_step hides the first run's steps 5..7 as well.
    assert _tensorboard_steps(tmp_path, "loss/unet") == [
        (s, round((1.0 if s < 5 else 2.0) / s, 6)) for s in range(1, 10)
    ]


def test_a_line_cut_off_by_a_crash_is_skipped(tmp_path):
    with TrainingLog(tmp_path, tensorboard=False) as log:
        log.log(1, "unet", 0.5, 1e-4)
    with open(tmp_path / "loss.csv", "a") as handle:
        handle.write("2,unet,0.4")  # SIGKILL mid-write
    assert [row["step"] for row in TrainingLog(tmp_path).read_csv()] == [1]
    with TrainingLog(tmp_path, tensorboard=False) as log:
        log.log(2, "unet", 0.3, 1e-4)
    assert [(row["step"], row["loss"]) for row in TrainingLog(tmp_path).read_csv()] == [(1, 0.5), (2, 0.3)]


def test_steps_must_increase(tmp_path):
    with TrainingLog(tmp_path, tensorboard=False) as log:
        log.log(3, "unet", 0.5, 1e-4)
        with pytest.raises(ValueError, match="step 3 logged after step 3"):
            log.log(3, "unet", 0.5, 1e-4)


def test_plot_draws_each_stage_without_touching_pyplot_backend(tmp_path):
    backend = matplotlib.get_backend()
    with TrainingLog(tmp_path, tensorboard=False) as log:
        for step in range(1, 41):
            log.log(step, "text_encoder" if step <= 15 else "unet", 1.0 / step, 1e-4)
        out = log.plot(tmp_path / "plots" / "loss.png")
    assert matplotlib.get_backend() == backend
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 400)
        colors = {color for _, color in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    # matplotlib's first two cycle colours: blue for stage 1, orange for stage 2.
    assert (31, 119, 180) in colors and (255, 127, 14) in colors


def test_plot_of_an_empty_log_still_writes_an_image(tmp_path):
    out = TrainingLog(tmp_path).plot(tmp_path / "loss.png")
    with Image.open(out) as image:
        assert image.size == (800, 400)
