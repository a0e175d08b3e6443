"""Class images for prior preservation, generated once by the base model and reused.

Image `i` is `class-{i:04d}.png`, drawn with seed `seed + i`, so it does not depend on how many
images were made before it or in which batch: a generation cut off by a disconnect resumes at the
first missing file and ends with the same set as an uninterrupted one. Images come from
`nbkit.generation.generate` with the base model's own scheduler and default guidance, and carry their A1111
infotext. `manifest.json` records what
the set was made from (prompt, seed, steps, resolution, model); when the run asks for something else,
the old images no longer match and the set is regenerated from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_json, clean_temporaries, read_json, retry_io
from nbkit.generation.generate import GenerationSettings, generate_images
from nbkit.generation.generate import check_inputs as check_generation
from nbkit.generation.infotext import save_image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def class_image_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"class-{index:04d}.png"


def _settings(
    prompt: str, negative_prompt: str, seeds: list[int], steps: int, resolution: int, batch_size: int
) -> GenerationSettings:
    return GenerationSettings(
        prompts=[prompt] * len(seeds),
        negative_prompt=negative_prompt,
        seeds=seeds,
        steps=steps,
        width=resolution,
        height=resolution,
        guidance_scale=None,  # the pipeline's default, as the sets made before nbkit.generation.generate
        sampler=None,
        batch_size=batch_size,
    )


def check_inputs(
    prompt: str,
    count: int,
    seed: int,
    steps: int,
    resolution: int,
    batch_size: int,
    negative_prompt: str = "",
) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise NbkitError(
            "prior preservation is on but the class prompt is empty",
            fix="set the class prompt (e.g. --prior-class-prompt 'photo of a person') or --prior-images 0",
        )
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_generation(_settings(prompt, negative_prompt, [seed], steps, resolution, batch_size))


def _is_valid(path: Path, resolution: int) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (resolution, resolution)
    except (OSError, ValueError, SyntaxError):
        return False


def _prepare(out_dir: Path, wanted: dict[str, Any]) -> None:
    """Make `out_dir` hold a set made with `wanted`: keep a matching set, clear a stale one."""
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists():
        recorded = read_json(manifest_path)
        if recorded == wanted:
            return
        logger.warning(
            "%s: class images were made with %s; this run asks for %s, so they are regenerated",
            out_dir,
            recorded,
            wanted,
        )
        for stale in out_dir.glob("class-*.png"):
            retry_io(lambda stale=stale: stale.unlink(missing_ok=True), what=f"removing {stale}")
    else:
        foreign = sorted(path.name for path in out_dir.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if foreign:
            raise NbkitError(
                f"the class image folder holds {len(foreign)} images nbkit did not generate "
                f"(e.g. {foreign[0]}) and has no {MANIFEST_NAME}",
                path=out_dir,
                fix="move those images elsewhere (or delete them) so nbkit can generate the class images, "
                "or turn prior preservation off",
            )
    # The manifest goes first: an image on disk always belongs to the set the manifest describes.
    atomic_write_json(manifest_path, wanted)


def ensure_class_images(
    pipeline: Any,
    prompt: str,
    count: int,
    out_dir: Path,
    *,
    seed: int,
    steps: int,
    resolution: int,
    batch_size: int = 1,
    negative_prompt: str = "",
    model: str = "",
) -> list[Path]:
    """Make sure `out_dir` holds `count` class images for `prompt`, generating only the missing ones.

    Args:
        pipeline: the base model's diffusers text-to-image pipeline (not yet trained).
        prompt: the class prompt, e.g. "photo of a dog".
        count: how many images the run needs.
        out_dir: the session's `class_images/` folder.
        seed: image `i` uses seed `seed + i`.
        steps: inference steps per image.
        resolution: width and height in pixels (the training resolution).
        batch_size: images per pipeline call.
        negative_prompt: used for every image.
        model: an identifier of the base model, recorded so another base model regenerates the set.

    Returns:
        The paths of images 0 to `count - 1`.
    """
    from tqdm.auto import tqdm

    check_inputs(prompt, count, seed, steps, resolution, batch_size, negative_prompt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out_dir)  # half-written images of a generation killed mid-save
    wanted = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "resolution": resolution,
        "model": model,
    }
    _prepare(out_dir, wanted)
    paths = [class_image_path(out_dir, index) for index in range(count)]
    missing = [index for index, path in enumerate(paths) if not _is_valid(path, resolution)]
    if not missing:
        return paths
    progress = tqdm(total=count, initial=count - len(missing), desc="class images", unit="img")
    settings = _settings(
        prompt, negative_prompt, [seed + index for index in missing], steps, resolution, batch_size
    )

    def save(indices: list[int], images: list[Image.Image], infotexts: list[str]) -> None:
        # Saved batch by batch, so a disconnect loses at most the batch being drawn.
        for index, image, infotext in zip(indices, images, infotexts, strict=True):
            save_image(image, paths[missing[index]], infotext)
        progress.update(len(indices))

    try:
        generate_images(pipeline, settings, on_batch=save)
    finally:
        progress.close()
    return paths
