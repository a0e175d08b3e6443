"""Loss and learning rate per step: a CSV, TensorBoard event files and a loss plot.

`step` is the run's global optimizer step (stage 2 continues the count of stage 1), so one curve
covers both stages. A resumed run writes into the same folder: the first step it logs cuts the CSV
and the TensorBoard history at that step (TensorBoard's `purge_step`), so steps that were trained
after the last checkpoint and are trained again appear once, not twice.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from nbkit.fsio import atomic_path, atomic_write_text, retry_io

CSV_NAME = "loss.csv"
FIELDS = ("step", "stage", "loss", "lr", "time")


class TrainingLog:
    """Per-step training metrics for one session.

    Args:
        log_dir: the folder that holds `loss.csv` and the TensorBoard event files.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, log_dir: Path, *, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.csv_path = self.log_dir / CSV_NAME
        self.tensorboard = tensorboard
        self._handle: io.TextIOBase | None = None
        self._writer = None
        self._last_step: int | None = None

    def log(self, step: int, stage: str, loss: float, lr: float) -> None:
        """Record one optimizer step.

        Args:
            step: the global step, counting across both stages; must increase from call to call.
            stage: `text_encoder` or `unet` (any short name works; the plot draws one curve per stage).
            loss: the step's training loss.
            lr: the learning rate used for the step.
        """
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}; steps must increase")
        if self._handle is None:
            self._open(first_step=step)
        row = [str(step), stage, repr(float(loss)), repr(float(lr)), f"{time.time():.3f}"]
        line = ",".join(row) + "\n"
        retry_io(lambda: (self._handle.write(line), self._handle.flush()), what=f"writing {self.csv_path}")
        if self._writer is not None:
            self._writer.add_scalar(f"loss/{stage}", float(loss), step)
            self._writer.add_scalar(f"lr/{stage}", float(lr), step)
        self._last_step = step

    def _open(self, first_step: int) -> None:
        # Keep the rows of an earlier (interrupted) run that come before this run's first step.
        kept = [row for row in self.read_csv() if row["step"] < first_step]
        text = ",".join(FIELDS) + "\n"
        text += "".join(f"{r['step']},{r['stage']},{r['loss']!r},{r['lr']!r},{r['time']:.3f}\n" for r in kept)
        atomic_write_text(self.csv_path, text)
        # Held open across steps (closed in `close`): reopening per step is slow on Drive.
        self._handle = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), purge_step=first_step)

    def read_csv(self) -> list[dict]:
        """The rows logged so far (a line cut off by a crash is skipped).

        Returns:
            dicts with `step` (int), `stage` (str), `loss`, `lr` and `time` (floats), in file order.
        """
        if not self.csv_path.exists():
            return []
        text = retry_io(lambda: self.csv_path.read_text(encoding="utf-8"), what=f"reading {self.csv_path}")
        rows = []
        for record in csv.DictReader(io.StringIO(text)):
            try:
                rows.append(
                    {
                        "step": int(record["step"]),
                        "stage": record["stage"],
                        "loss": float(record["loss"]),
                        "lr": float(record["lr"]),
                        "time": float(record["time"]),
                    }
                )
            except (TypeError, ValueError, KeyError):
                continue
        return rows

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the CSV is flushed on every step)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the CSV and the TensorBoard writer; a later `log` reopens them and continues."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def plot(self, out_png: Path, *, smoothing: float = 0.9) -> Path:
        """Draw the loss per stage (raw, faint, and an exponential moving average) into a PNG.

        Args:
            out_png: where to write the image (atomically).
            smoothing: the moving average's weight on the past, 0 (none) to <1.
        """
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = self.read_csv()
        # A Figure with its own Agg canvas leaves pyplot's global backend (the notebook's) alone.
        figure = Figure(figsize=(8, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        stages = list(dict.fromkeys(row["stage"] for row in rows))
        for index, stage in enumerate(stages):
            steps = [row["step"] for row in rows if row["stage"] == stage]
            losses = [row["loss"] for row in rows if row["stage"] == stage]
            color = f"C{index}"
            axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(steps, _ema(losses, smoothing), color=color, linewidth=1.8, label=stage)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title("training loss" if rows else "training loss (no steps logged yet)")
        if stages:
            axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        out_png = Path(out_png)
        with atomic_path(out_png) as tmp:
            figure.savefig(tmp, format="png")
        return out_png


def _ema(values: list[float], smoothing: float) -> list[float]:
    smoothed, average = [], None
    for value in values:
        average = value if average is None else smoothing * average + (1 - smoothing) * value
        smoothed.append(average)
    return smoothed
