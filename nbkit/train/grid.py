"""Checkpoints as pipelines: the comparison grid (checkpoints x fixed seeds of one prompt).

A checkpoint folder holds each trained role as `<role>.safetensors` (full weights or a peft LoRA)
and `trainer_state.json` with the run's config and base model, so the base model is loaded once and
each checkpoint's weights are put into it as training restores them (`load_trained_state_dict`).
The same seeds in every row make the rows differ only by what the model learned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from nbkit.device import default_device
from nbkit.errors import NbkitError

GRID_NAME = "checkpoint_grid.png"
GRID_KEY = "nbkit-checkpoint-grid"


class CheckpointLoader:
    """Loads the base model of a run once and gives a pipeline with a checkpoint's weights in it.

    Args:
        device: `cuda` or `cpu` (default: cuda when available); fp16 on CUDA, fp32 on CPU.
    """

    def __init__(self, device: str | None = None):
        import torch

        self.device = default_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.components = None
        self._base: tuple | None = None
        self._changed: set[str] = set()

    def load(self, checkpoint) -> Any:
        """The components (`nbkit.train.components.Components`) with `checkpoint`'s weights.

        Args:
            checkpoint: a complete `nbkit.train.checkpointing.Checkpoint`.
        """
        from nbkit.train import checkpointing
        from nbkit.train.components import add_lora, has_lora, load_components, load_trained_state_dict

        state = checkpoint.state()
        base, config, roles = state["base_model"], state["config"], state["roles"]
        key = (base["source"], base["family"], base.get("prediction_type", "epsilon"))
        # A role an earlier checkpoint replaced but this one does not hold must be the base's again.
        if self.components is None or key != self._base or not self._changed <= set(roles):
            self.components = load_components(*key, self.dtype)
            self.components.pipeline.to(self.device)
            self._base, self._changed = key, set()
        for role, kind in roles.items():
            model = self.components.model(role)
            if kind == "lora" and not has_lora(model):
                add_lora(
                    model,
                    rank=config["lora_rank"],
                    alpha=config.get("lora_alpha"),
                    targets=self.components.lora_targets(role),
                    seed=0,  # overwritten by the checkpoint's weights
                )
            weights = checkpointing.load_weights(checkpoint.path, role)
            load_trained_state_dict(
                model,
                {k: v.to(self.device, self.dtype) for k, v in weights.items()},
                where=str(checkpoint.path),
            )
            model.to(self.device, self.dtype)
            model.eval()
            self._changed.add(role)
        return self.components


def session_checkpoints(session, names: Sequence[str] | None = None) -> list:
    """The session's complete checkpoints in training order, or those named.

    Args:
        session: an open `nbkit.session.core.Session`.
        names: checkpoint folder names (`unet-000500`); None: all.
    """
    from nbkit.train import checkpointing

    folder = session.path / "checkpoints"
    found = checkpointing.list_checkpoints(folder) if folder.is_dir() else []
    if names is None:
        if not found:
            raise NbkitError(
                f"session '{session.name}' has no complete checkpoints.",
                path=folder,
                fix="train it first (`nbkit train SESSION`); checkpoints are kept with --keep-checkpoints.",
            )
        return found
    by_name = {checkpoint.path.name: checkpoint for checkpoint in found}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise NbkitError(
            f"checkpoint {missing[0]!r} is not in session '{session.name}' "
            f"(it has: {', '.join(by_name) or 'none'}).",
            path=folder,
            fix="pick one of the listed names.",
        )
    return [by_name[name] for name in names]


def comparison_grid(
    rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str]
):
    """Tile images (all one size) in rows, with a label column on the left and a header on top.

    Args:
        rows: one list of images per row, each as long as `column_labels`.
        row_labels: one label per row (the checkpoint).
        column_labels: one label per column (the seed).
    """
    if len(rows) != len(row_labels) or not rows:
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if any(len(row) != len(column_labels) for row in rows):
        raise ValueError(f"every row needs {len(column_labels)} images, one per column label")
    width, height = rows[0][0].size
    font = ImageFont.load_default(size=max(10, width // 16))
    text_height = font.getbbox("Ag")[3]
    label_width = int(max(font.getlength(label) for label in row_labels)) + 12
    header = text_height + 8
    grid = Image.new("RGB", (label_width + len(column_labels) * width, header + len(rows) * height), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((label_width + column * width + 4, 4), label, fill="black", font=font)
    for row, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        top = header + row * height
        draw.text((6, top + (height - text_height) // 2), label, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((width, height)), (label_width + column * width, top))
    return grid


def render_checkpoint_grid(
    session,
    prompt: str,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    steps: int = 25,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    checkpoints: Sequence[str] | None = None,
    device: str | None = None,
    out_path: str | os.PathLike | None = None,
) -> Path:
    """Render `prompt` with the same seeds from every checkpoint and save the labelled grid.

    Rows are checkpoints in training order, columns the seeds. The PNG (A1111 infotext of the first
    image, every image's infotext under `nbkit-checkpoint-grid`) is written atomically.

    Args:
        session: an open `nbkit.session.core.Session`.
        prompt: the prompt (with the instance token).
        seeds: one column per seed.
        steps: inference steps.
        resolution: width and height (default: the training resolution).
        guidance_scale: CFG scale.
        negative_prompt: for every image.
        checkpoints: checkpoint names to show (default: all kept ones).
        device: `cuda` or `cpu`.
        out_path: the PNG (default: `logs/checkpoint_grid.png`).

    Returns:
        the grid's path.
    """
    import json

    from nbkit.generation.generate import generate
    from nbkit.generation.infotext import save_image

    seeds = [int(seed) for seed in seeds]
    if not seeds or any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be one or more integers >= 0, got {seeds}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    found = session_checkpoints(session, checkpoints)
    size = resolution or session.manifest.training.resolution
    loader = CheckpointLoader(device)
    rows, infotexts = [], []
    for checkpoint in found:
        components = loader.load(checkpoint)
        result = generate(
            components.pipeline,
            [prompt] * len(seeds),
            seeds=seeds,
            steps=steps,
            width=size,
            height=size,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            sampler=None,
            model_name=f"{session.name}@{checkpoint.path.name}",
        )
        rows.append(result.images)
        infotexts.extend(result.infotexts)
    grid = comparison_grid(rows, [c.path.name for c in found], [f"seed {seed}" for seed in seeds])
    path = Path(out_path) if out_path else session.dir("logs") / GRID_NAME
    return save_image(
        grid, path, infotexts[0], extra_text={GRID_KEY: json.dumps(infotexts, ensure_ascii=False)}
    )
