"""The training cell's live view: a status line, the newest sample grid and the loss plot.

They are shown as training writes them and updated in place (IPython display handles, which Colab,
Jupyter and VS Code all update), so a run stopped or disconnected half-way has already shown every
checkpoint's samples. Outside a notebook nothing is displayed.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

STAGES = {"text_encoder": "text encoder", "done": "done"}  # stage 2 is named by its denoiser


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def position(result) -> tuple[int, int]:
    """(steps done, steps in all) over both stages, from a `TrainResult` so far."""
    config = result.config
    first = config.text_encoder_steps if config is not None else 0
    total = first + (config.unet_steps if config is not None else 0)
    done = {"text_encoder": result.step, "unet": first + result.step}.get(result.stage, total)
    return min(done, total), total


class LiveTraining:
    """Shows a training run's progress in the cell's output as it goes.

    Args:
        min_interval: the fewest seconds between two updates of the status line (checkpoints always
            update it).
    """

    def __init__(self, min_interval: float = 1.0):
        self.min_interval = min_interval
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.last_update = 0.0
        self.shown: dict[str, object] = {}
        self.grid: Path | None = None
        self.status = ""

    def __call__(self, result) -> None:
        """Update the view from the `TrainResult` so far (`nbkit.train.train`'s `on_progress`)."""
        now = time.monotonic()
        done, total = position(result)
        if self.first is None:
            self.first = (now, done)  # timed from the first step: loading and a resumed start excluded
        grid = result.samples[-1] if result.samples else None
        new_grid = grid is not None and grid != self.grid
        if not new_grid and now - self.last_update < self.min_interval and done < total:
            return
        self.last_update = now
        self.status = self.line(result, done, total, now)
        self._show("status", _markdown(self.status))
        if new_grid:
            self.grid = grid
            self._show("samples", _image(grid))
            self._show("loss", _image(result.loss_plot))

    def line(self, result, done: int, total: int, now: float) -> str:
        """The status line: step, stage, elapsed and remaining time."""
        started, at = self.first or (now, done)
        rate = (done - at) / (now - started) if now > started and done > at else 0.0
        left = f", about {_clock((total - done) / rate)} left" if rate and done < total else ""
        stage = result.denoiser if result.stage == "unet" else STAGES.get(result.stage, result.stage)
        return f"Step {done}/{total} ({stage}), {_clock(now - self.started)} elapsed{left}"

    def _show(self, key: str, obj) -> None:
        if obj is None:
            return
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        handle = self.shown.get(key)
        if handle is None:
            self.shown[key] = display(obj, display_id=True)
        else:
            handle.update(obj)


def _markdown(text: str):
    try:
        from IPython.display import Markdown
    except ImportError:
        return None
    return Markdown(text)


def _image(path: Path | None):
    if path is None or not Path(path).is_file():
        return None
    from IPython.display import Image

    return Image(data=Path(path).read_bytes(), format="png")
