"""Sample images during training: one image per prompt with fixed seeds, saved as a labelled grid.

Image `i` is drawn with seed `seed + i` on a CPU generator (through `nbkit.generation.generate`), so the grids of
successive checkpoints show the same noise and differ only by what the model learned, on any device.
The pipeline's own scheduler is used, so a grid shows the model as it was trained to sample. The grid
PNG carries an AUTOMATIC1111 `parameters` text chunk (the first image's infotext, as A1111 does for
its grids) so "PNG Info" in A1111 or nbkit's UI reads it back; `nbkit-samples` holds every image's
infotext.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from nbkit.families import family_of_pipeline
from nbkit.generation.generate import generate
from nbkit.generation.infotext import save_image

MAX_COLUMNS = 4
# The sample steps and CFG scale of a model without its own settings (the SD families, FLUX.1-dev).
SAMPLE_STEPS = 25
SAMPLE_CFG = 7.5
SAMPLES_KEY = "nbkit-samples"


def render_samples(
    pipeline: Any,
    prompts: list[str],
    *,
    seed: int,
    steps: int | None,
    resolution: int,
    out_path: Path,
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    model_name: str | None = None,
) -> Path:
    """Render one image per prompt and save them as a labelled grid PNG with A1111 infotext.

    Args:
        pipeline: a diffusers text-to-image pipeline (SD1/SD2/SDXL) with the weights to show.
        prompts: the sample prompts; image `i` uses seed `seed + i`.
        seed: the first image's seed (>= 0: samples are never random).
        steps: inference steps per image; None: the model's own where it has them (Z-Image-Turbo's 8,
            a distilled FLUX.2 [klein]'s 4: `Family.generation_defaults`), else `SAMPLE_STEPS`.
        resolution: width and height in pixels.
        out_path: the grid's path (written atomically).
        negative_prompt: used for every image.
        guidance_scale: classifier-free guidance scale (A1111's "CFG scale"); None: the model's own
            where it has them (Turbo's unguided 1, ...), else `SAMPLE_CFG`.
        model_name: written as `Model` in the infotext, if given.

    Returns:
        `out_path`.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    defaults = family_of_pipeline(pipeline).generation_defaults(pipeline)
    if steps is None:
        steps = defaults.steps if defaults.own else SAMPLE_STEPS
    if guidance_scale is None and not defaults.own:
        guidance_scale = SAMPLE_CFG
    result = generate(
        pipeline,
        prompts,
        negative_prompt=negative_prompt,
        seeds=seed,
        steps=steps,
        width=resolution,
        height=resolution,
        guidance_scale=guidance_scale,
        sampler=None,
        model_name=model_name,
    )
    grid = make_grid(result.images, prompts)
    return save_image(
        grid,
        out_path,
        result.infotexts[0],
        extra_text={SAMPLES_KEY: json.dumps(result.infotexts, ensure_ascii=False)},
    )


def make_grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Tile `images` (same size) in up to four columns, each with its label underneath.

    Args:
        images: the tiles.
        labels: one caption per tile.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    width, height = images[0].size
    font = ImageFont.load_default(size=max(10, width // 24))
    line_height = font.getbbox("Ag")[3] + 2
    wrapped = [_wrap(label, font, width - 4)[:3] for label in labels]
    label_height = line_height * max(len(lines) for lines in wrapped) + 4
    columns = min(MAX_COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        left, top = (index % columns) * width, (index // columns) * (height + label_height)
        grid.paste(image.convert("RGB"), (left, top))
        for line_index, line in enumerate(lines):
            draw.text((left + 2, top + height + 2 + line_index * line_height), line, fill="black", font=font)
    return grid


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines or [""]
