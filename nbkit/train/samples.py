"""Sample images during training: one image per prompt with fixed seeds, saved as a labelled grid.

Image `i` is drawn with seed `seed + i` on a CPU generator, so the grids of successive checkpoints
show the same noise and differ only by what the model learned, on any device. The grid PNG carries an
AUTOMATIC1111 `parameters` text chunk (the first image's infotext, as A1111 does for its grids) so
"PNG Info" in A1111 or nbkit's UI reads it back; `nbkit-samples` holds every image's infotext.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from nbkit.fsio import atomic_path

# diffusers scheduler class -> the sampler name A1111 shows for it.
SAMPLER_NAMES = {
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
MAX_COLUMNS = 4


def sampler_name(scheduler: Any) -> str:
    """The A1111 sampler name for a diffusers scheduler (its class name when A1111 has none)."""
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler" and "sde" in str(scheduler.config.get("algorithm_type", "")):
        return "DPM++ 2M SDE"
    return SAMPLER_NAMES.get(name, name)


def _infotext_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    # A1111 JSON-quotes values that would break its `Key: value, ...` parsing.
    return json.dumps(text) if any(char in text for char in ",:\n") else text


def format_infotext(prompt: str, negative_prompt: str, parameters: dict[str, Any]) -> str:
    """An A1111 infotext: the prompt, `Negative prompt: ...` when given, then `Key: value` pairs.

    Args:
        prompt: the positive prompt.
        negative_prompt: the negative prompt ("" for none).
        parameters: ordered `Key: value` pairs; None values are skipped.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        ", ".join(
            f"{key}: {_infotext_value(value)}" for key, value in parameters.items() if value is not None
        )
    )
    return "\n".join(lines)


def check_generation(seed: int, steps: int, resolution: int) -> None:
    """The settings every fixed-seed generation (samples, class images) needs."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def check_inputs(prompts: list[str], seed: int, steps: int, resolution: int, guidance_scale: float) -> None:
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    check_generation(seed, steps, resolution)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")


def render_samples(
    pipeline: Any,
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    resolution: int,
    out_path: Path,
    negative_prompt: str = "",
    guidance_scale: float = 7.5,
    model_name: str | None = None,
) -> Path:
    """Render one image per prompt and save them as a labelled grid PNG with A1111 infotext.

    Args:
        pipeline: a diffusers text-to-image pipeline (SD1/SD2/SDXL) with the weights to show.
        prompts: the sample prompts; image `i` uses seed `seed + i`.
        seed: the first image's seed.
        steps: inference steps per image.
        resolution: width and height in pixels.
        out_path: the grid's path (written atomically).
        negative_prompt: used for every image.
        guidance_scale: classifier-free guidance scale (A1111's "CFG scale").
        model_name: written as `Model` in the infotext, if given.

    Returns:
        `out_path`.
    """
    import torch

    check_inputs(prompts, seed, steps, resolution, guidance_scale)
    images, infotexts = [], []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        result = pipeline(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="pil",
        )
        images.append(result.images[0])
        parameters = {
            "Steps": steps,
            "Sampler": sampler_name(pipeline.scheduler),
            "CFG scale": guidance_scale,
            "Seed": seed + index,
            "Size": f"{resolution}x{resolution}",
            "Model": model_name,
        }
        infotexts.append(format_infotext(prompt, negative_prompt, parameters))
    grid = make_grid(images, prompts)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotexts[0])
    info.add_text("nbkit-samples", json.dumps(infotexts, ensure_ascii=False))
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return out_path


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


def show_samples(path: Path) -> bool:
    """Display the grid in a notebook; does nothing outside one.

    Args:
        path: the grid PNG.

    Returns:
        True when it was shown.
    """
    try:
        from IPython import get_ipython
        from IPython.display import Image as IPythonImage
        from IPython.display import display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    display(IPythonImage(filename=str(path)))
    return True
