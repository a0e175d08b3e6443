"""Training checkpoints in the session: written locally, moved in atomically, the last K kept.

A checkpoint is a folder `checkpoints/<stage>-<step:06d>/` holding what accelerate's `save_state`
writes (optimizer, LR scheduler, RNG states), the trained weights as `<role>.safetensors` (full
weights or LoRA), and `trainer_state.json` with the stage, the step, the run's config and the size of
every file. The folder is assembled on local disk and then copied into the session under a temporary
name and renamed, so the session only ever holds complete checkpoints; `trainer_state.json`'s file
list lets `is_complete` reject one damaged some other way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.errors import NbkitError
from nbkit.fsio import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_write_json,
    read_json,
    retry_io,
)

STATE_NAME = "trainer_state.json"
STAGES = ("text_encoder", "unet")
NAME_PATTERN = re.compile(r"^(text_encoder|unet)-(\d{6,})$")
# Tests set this to a checkpoint name to freeze the process halfway through copying it into the
# session, so they can SIGKILL it there.
PAUSE_ENV = "NBKIT_TEST_PAUSE_CHECKPOINT_WRITE"
PAUSE_MARKER = "nbkit-test: paused writing checkpoint"

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder.

    Args:
        stage: `text_encoder` or `unet`, the stage that was training.
        step: optimizer steps done in that stage.
        path: the folder.
    """

    stage: str
    step: int
    path: Path

    @property
    def order(self) -> tuple[int, int]:
        return STAGES.index(self.stage), self.step

    def state(self) -> dict[str, Any]:
        return read_json(self.path / STATE_NAME)


def checkpoint_name(stage: str, step: int) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    return f"{stage}-{step:06d}"


def save_weights(folder: Path, role: str, state: dict[str, torch.Tensor]) -> Path:
    """Write a state dict as `<folder>/<role>.safetensors` (on CPU, contiguous, dtypes kept)."""
    from safetensors.torch import save_file

    path = folder / f"{role}.safetensors"
    save_file({key: value.detach().to("cpu").contiguous() for key, value in state.items()}, os.fspath(path))
    return path


def load_weights(folder: Path, role: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / f"{role}.safetensors"
    if not path.is_file():
        raise NbkitError(
            f"the checkpoint has no {role} weights", path=folder, fix="resume from another checkpoint"
        )
    return load_file(os.fspath(path))


def finish_local(folder: Path, state: dict[str, Any]) -> None:
    """Record the state and every file's size in `trainer_state.json`, written last."""
    files = {entry.name: entry.stat().st_size for entry in sorted(folder.iterdir()) if entry.is_file()}
    files.pop(STATE_NAME, None)
    atomic_write_json(folder / STATE_NAME, {**state, "files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint (None when it is): its state file must read and every
    file it lists must be there with its recorded size."""
    try:
        state = read_json(folder / STATE_NAME)
    except (OSError, ValueError) as error:
        return f"its {STATE_NAME} cannot be read ({type(error).__name__})"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"its {STATE_NAME} lists no files"
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    return None


def is_complete(folder: Path) -> bool:
    return checkpoint_problem(folder) is None


def scan_checkpoints(folder: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """The complete checkpoints in `folder`, oldest first (stage 1 before stage 2, then by step), and
    the damaged ones with the reason each fails its check."""
    if not folder.is_dir():
        return [], []
    found, damaged = [], []
    for entry in folder.iterdir():
        match = NAME_PATTERN.match(entry.name)
        if not (match and entry.is_dir()):
            continue
        problem = checkpoint_problem(entry)
        if problem is None:
            found.append(Checkpoint(match.group(1), int(match.group(2)), entry))
        else:
            damaged.append((entry, problem))
    return sorted(found, key=lambda checkpoint: checkpoint.order), sorted(damaged)


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """The complete checkpoints in `folder`, oldest first."""
    return scan_checkpoints(folder)[0]


def checkpoint_at(path: Path) -> Checkpoint | None:
    """The checkpoint a folder name describes (`unet-000180`), or None for another name."""
    match = NAME_PATTERN.match(path.name)
    return Checkpoint(match.group(1), int(match.group(2)), path) if match else None


def publish(local: Path, checkpoints_dir: Path) -> Path:
    """Copy a finished local checkpoint into the session's `checkpoints/` atomically; returns its path."""
    target = checkpoints_dir / local.name
    pause = os.environ.get(PAUSE_ENV) == local.name
    with atomic_directory(target) as tmp:
        for index, entry in enumerate(sorted(local.iterdir())):
            retry_io(
                lambda entry=entry: shutil.copyfile(entry, tmp / entry.name),
                what=f"saving {local.name}/{entry.name}",
            )
            if pause and index == 0:
                _pause_for_test(tmp)
    return target


def _pause_for_test(partial: Path) -> None:
    print(f"{PAUSE_MARKER} {partial}", flush=True)
    sys.stdout.flush()
    threading.Event().wait()  # until the test kills this process


def prune(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was deleted."""
    found = list_checkpoints(checkpoints_dir)
    doomed = [checkpoint.path for checkpoint in found[: max(0, len(found) - keep)]]
    for path in doomed:
        # Rename first, so a kill halfway through deleting never leaves a "complete-looking" half.
        aside = path.with_name(f"{TEMP_PREFIX}deleting-{path.name}")
        retry_io(lambda path=path, aside=aside: os.replace(path, aside), what=f"removing {path.name}")
        shutil.rmtree(aside, ignore_errors=True)
    return doomed
