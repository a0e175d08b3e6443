"""Automatic subject masks from the class word, with CLIPSeg.

    from nbkit.images import auto_mask
    report = auto_mask(session)                     # "dog" from the class prompt "photo of a dog"
    report = auto_mask(session, prompt="red car")   # or say what the subject is

The segmenter is CLIPSeg (`clipseg`: CIDAS/clipseg-rd64-refined, transformers'
`CLIPSegForImageSegmentation`), from the hub, from a folder `save_pretrained` wrote, or `tiny:clipseg`,
a random-weight model built offline for tests. It runs batched, fp16 on a GPU and fp32 on the CPU, on
each photo's upright original, and the mask is kept and cut like a mask the user gave
(`nbkit.images.masks`): `instance_images/originals/<stem>.mask.png` and `instance_images/masks/`.

CLIPSeg answers with a coarse map (352 px for the whole photo) of how likely each pixel shows the
prompt. `soft_mask` turns it into a mask:

1. the map, sigmoid(logits), is scaled to the photo's shape (`WORK_SIZE` px on the long side at most:
   the map holds no finer detail, and the mask is scaled up to the photo last);
2. probabilities up to `threshold` (default 0.3) are background, 0; from there the mask rises along a
   smoothstep to 1, the subject, at `threshold + RAMP` (0.5), so the unsure edge counts in part;
3. the subject grows by `DILATION` of the photo's short side (1.5%, by a max filter), so hair, ears
   and other edges the coarse map cuts off are kept: training weighs a little background as subject
   rather than lose the subject's outline;
4. the result is scaled to the photo's size, bilinear, as an 8-bit grayscale picture.

A mask covering less than `MIN_COVERAGE` of a photo is a miss (CLIPSeg found no such thing there): it
is not attached, so the photo counts whole, and the report says so.

Masks the user gave (`<stem>.mask.png`) are kept unless `overwrite`: session.json records where each
mask came from (`mask_source`). A photo masked automatically already is kept too, so running the
notebook again does not load the model for nothing; `overwrite` masks every photo again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter, ImageStat

from nbkit.device import free_memory
from nbkit.errors import NbkitError, setting
from nbkit.images._tiny_segmenters import TINY_SEGMENTERS, build_tiny_segmenter
from nbkit.images.autocaption import (
    LoadedModel,
    ModelTask,
    load_task_model,
    resolve_model,
    session_class_word,
)
from nbkit.images.checks import check_image
from nbkit.images.contact_sheet import write_contact_sheet
from nbkit.images.masks import attach_mask, mask_files
from nbkit.images.report import ImageReport

if TYPE_CHECKING:
    from nbkit.session.core import Session
    from nbkit.session.manifest import ImageRecord

SEGMENTERS: dict[str, str] = {"clipseg": "CIDAS/clipseg-rd64-refined"}
DEFAULT_SEGMENTER = "clipseg"
DEFAULT_BATCH_SIZE = 8
THRESHOLD = 0.3  # CLIPSeg's probability at and below which a pixel is background
RAMP = 0.2  # how much more probability the mask takes to rise from 0 to 1
DILATION = 0.015  # how far the subject grows, as a share of the photo's short side
WORK_SIZE = 512  # the long side the mask is made at; CLIPSeg's 352 px map holds no finer detail
MIN_COVERAGE = 0.01  # a mask of less of its photo is a miss
RUN_KIND = "masks"  # the history entry of a run of the segmenter

MASKING = ModelTask(
    what="masking model",
    role="CLIPSeg model",
    names=SEGMENTERS,
    tiny=TINY_SEGMENTERS,
    classes={"clipseg": "CLIPSegForImageSegmentation"},
    described="a CLIPSeg model",
    native=f"use a CLIPSeg model that transformers loads itself, such as {SEGMENTERS['clipseg']}",
    build_tiny=build_tiny_segmenter,
    # CIDAS's repository predates safetensors and may hold only PyTorch weights, which transformers
    # then reads with torch's weights-only loader.
    use_safetensors=None,
)


# ---------------------------------------------------------------- the mask of one photo


def _work_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, WORK_SIZE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def soft_mask(
    probabilities: np.ndarray, size: tuple[int, int], *, threshold: float = THRESHOLD
) -> Image.Image:
    """CLIPSeg's probability map as a subject mask of the photo's size (the rule is in the module's doc).

    Args:
        probabilities: sigmoid(logits), (height, width) values from 0 to 1, at the model's square size.
        size: the photo's upright (width, height).
        threshold: the probability at and below which a pixel is background, between 0 and 1.

    Returns:
        An 8-bit grayscale mask of `size`: 0 background, 255 subject, in between on the edge.
    """
    work = _work_size(size)
    # Scaled in float: the probabilities near the threshold decide the edge, and 8 bits would band it.
    scaled = Image.fromarray(np.asarray(probabilities, dtype=np.float32))  # mode F
    share = np.asarray(scaled.resize(work, Image.Resampling.BILINEAR), dtype=np.float32)
    rise = np.clip((share - threshold) / min(RAMP, 1.0 - threshold), 0.0, 1.0)
    mask = Image.fromarray(np.rint(rise * rise * (3.0 - 2.0 * rise) * 255.0).astype(np.uint8))  # mode L
    radius = round(DILATION * min(work))
    if radius:
        mask = mask.filter(ImageFilter.MaxFilter(2 * radius + 1))
    return mask.resize(size, Image.Resampling.BILINEAR) if mask.size != size else mask


def mask_coverage(mask: Image.Image) -> float:
    """The share of the photo a mask covers, 0 to 1 (an edge pixel counts in part)."""
    return ImageStat.Stat(mask).mean[0] / 255.0


# ---------------------------------------------------------------- the segmenting models


def resolve_segmenter(model: str) -> str:
    """What `model` loads from: a known name's hub id, a hub id, a model folder, or `tiny:clipseg`.

    Args:
        model: `clipseg`, `tiny:clipseg`, a hub id (`owner/name`) or a folder.
    """
    return resolve_model(model, MASKING)


class SubjectMasker(LoadedModel):
    """A loaded CLIPSeg and its processor: `masks(images, prompt)`.

    Args:
        model: a `CLIPSegForImageSegmentation` in eval mode.
        processor: its `CLIPSegProcessor`.
        name: where it came from (hub id, folder or `tiny:clipseg`); recorded with the masks.
        batch_size: images per forward pass.
    """

    def probabilities(self, images: Sequence[Image.Image], prompt: str) -> list[np.ndarray]:
        """CLIPSeg's map of where `prompt` is in each image: sigmoid(logits), float32 at the model's size.

        Args:
            images: PIL images, any size and mode (each is squashed to the model's square).
            prompt: what to find (`dog`).
        """
        import torch

        maps: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                inputs = self.processor(
                    text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt"
                )
                inputs = {key: value.to(self.device) for key, value in inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
                logits = self.model(**inputs).logits
                # In fp32: fp16's sigmoid saturates to exactly 0 and 1 where the threshold still tells.
                logits = logits.float().reshape(len(batch), *logits.shape[-2:])
                maps += list(torch.sigmoid(logits).cpu().numpy())
        return maps

    def masks(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        *,
        sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float = THRESHOLD,
    ) -> list[Image.Image]:
        """The subject mask of each image (`soft_mask`).

        Args:
            images: PIL images.
            prompt: what the subject is (`dog`).
            sizes: the size of each mask (default: its image's), for images scaled down to save memory.
            threshold: see `soft_mask`.
        """
        sizes = [image.size for image in images] if sizes is None else sizes
        maps = self.probabilities(images, prompt)
        return [soft_mask(found, size, threshold=threshold) for found, size in zip(maps, sizes, strict=True)]


def load_masker(
    model: str = DEFAULT_SEGMENTER,
    *,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    local_files_only: bool | None = None,
) -> SubjectMasker:
    """Load CLIPSeg from a name, hub id, folder or `tiny:clipseg` (see `resolve_segmenter`).

    Args:
        model: the segmenter.
        device: `cuda`, `cpu`, ...; default: CUDA when available. On CUDA the weights are fp16.
        batch_size: images per forward pass.
        local_files_only: passed to `from_pretrained` (default: only when HF_HUB_OFFLINE is set).
    """
    source = resolve_segmenter(model)
    loaded, processor, _ = load_task_model(source, MASKING, device=device, local_files_only=local_files_only)
    return SubjectMasker(loaded, processor, name=source, batch_size=batch_size)


# ---------------------------------------------------------------- masking a session


def _kept_because(record: ImageRecord, source: str) -> str | None:
    if not record.mask:
        return None
    if record.mask_source == "auto":
        return "kept: masked automatically already (overwrite masks it again)"
    return f"kept: its mask is from a file (overwrite makes one with {source} instead)"


def auto_mask(
    session: Session,
    model: str = DEFAULT_SEGMENTER,
    *,
    prompt: str | None = None,
    threshold: float = THRESHOLD,
    overwrite: bool = False,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ImageReport:
    """Make a subject mask for each photo without one, with CLIPSeg and the class word.

    Writes each mask's two files (`nbkit.images.masks.attach_mask`) and session.json once (the masks
    and a `masks` history entry); if anything fails, the files and the manifest are as they were. The
    model is loaded only when some photo needs a mask.

    Args:
        session: the session.
        model: `clipseg`, a hub id, a folder, or `tiny:clipseg`.
        prompt: what the subject is (`dog`, `red car`); None or "" takes the session's class word (the
            last word of the class prompt).
        threshold: CLIPSeg's probability at and below which a pixel is background (`soft_mask`).
        overwrite: mask every photo, also those with a mask from a file.
        device: `cuda`, `cpu`, ...; default: CUDA when available.
        batch_size: images per forward pass.

    Returns:
        A report with a row per photo: how much of it the mask covers, or why it has none.
    """
    if not session.manifest.images:
        raise NbkitError(
            f"session '{session.name}' has no instance images to mask",
            path=session.path,
            fix="add photos first (`nbkit images add SESSION FILES`, or the Photos cell)",
        )
    if not 0.0 < threshold < 1.0:
        raise NbkitError(
            f"the mask threshold {threshold} is no probability between 0 and 1",
            fix=f"use a value such as {THRESHOLD} (higher: a tighter mask)",
        )
    source = resolve_segmenter(model)
    reasons: dict[str, str] = {}
    todo: list[ImageRecord] = []
    for record in session.manifest.images:
        reason = None if overwrite else _kept_because(record, source)
        if reason:
            reasons[record.file] = reason
        elif not (session.path / record.original).is_file():
            reasons[record.file] = "missing"
        else:
            todo.append(record)
    given = " ".join((prompt or "").split())
    subjects = {record.file: given or session_class_word(session, record.concept) for record in todo}
    subject = ", ".join(sorted(set(subjects.values())))
    results: dict[str, float | NbkitError] = {}
    if todo:
        missing = sorted({record.concept for record in todo if not subjects[record.file]})
        if missing and missing != [""]:  # a further concept: the form's CLASS_WORD is the first's
            raise NbkitError(
                f"concept {missing[-1]!r} has no class word to find its subject by",
                fix=f"give it one ({setting('class_word', 'dog')} with {setting('concept', missing[-1])}; "
                f"`nbkit images concept SESSION {missing[-1]} --class-word dog`)",
            )
        if missing:
            raise NbkitError(
                "there is no class word to find the subject by (the class prompt is empty)",
                fix='set CLASS_WORD in Settings ("dog", "woman") and run the Class word cell, or say what '
                'the subject is: `nbkit images mask SESSION --prompt dog` (prompt="dog" in Python)',
            )
        with session.lock("masking images"):
            results = _mask_records(
                session, todo, source, subjects, threshold=threshold, device=device, batch_size=batch_size
            )
    title = f'Automatic masks ({source}, "{subject}")' if todo else f"Automatic masks ({source})"
    report = ImageReport(title=f'{title} in session "{session.name}"')
    for record in session.manifest.images:
        name, result = PurePath(record.file).name, results.get(record.file)
        if isinstance(result, NbkitError):
            report.add(name, "error", result.message, fix=result.fix)
        elif isinstance(result, float) and result < MIN_COVERAGE:
            kept = "its earlier mask is kept" if record.mask else "no mask, so the photo counts whole"
            report.add(
                name,
                "warning",
                f'{source} found no "{subjects[record.file]}" here (its mask would cover {result:.1%}): {kept}',
                fix=f"give its mask as {PurePath(record.file).stem}.mask.png, or another prompt",
            )
        elif result is not None:
            report.add(name, "ok", f"mask covers {result:.0%} of the photo, in {record.mask}")
        elif reasons.get(record.file) == "missing":
            report.add(name, "error", f"missing {record.original}", fix="import the photo again")
        else:
            report.add(name, "ok", reasons.get(record.file, ""))
    if any(isinstance(result, float) and result >= MIN_COVERAGE for result in results.values()):
        report.contact_sheet = write_contact_sheet(session)
        if session.manifest.training.mask_background is None:
            report.warnings.append(
                "masked loss is off, so training does not use the masks yet: set MASK_BACKGROUND in "
                "Settings (`nbkit train --mask-background W`), the weight of the background from 0 to 1"
            )
    return report


def _upright(session: Session, record: ImageRecord) -> tuple[Image.Image, tuple[int, int]]:
    """The record's original upright, scaled down to `WORK_SIZE` (the model squashes it to its square
    anyway), and its full size."""
    path = session.path / record.original
    with check_image(path.read_bytes(), name=record.original).image as image:
        return image.resize(_work_size(image.size), Image.Resampling.BICUBIC), image.size


def _mask_records(
    session: Session,
    records: list[ImageRecord],
    source: str,
    prompts: dict[str, str],
    *,
    threshold: float,
    device: str | None,
    batch_size: int,
) -> dict[str, float | NbkitError]:
    """Mask `records` (each by its prompt, by file: its concept's class word) and save them with one
    session.json write (the caller holds the lock).

    Returns each record's mask coverage, or the error that kept it from being read.
    """
    results: dict[str, float | NbkitError] = {}
    masked: dict[str, ImageRecord] = {}
    # The mask files as they were (None: absent), put back if the run fails before session.json is saved.
    before: dict[Path, bytes | None] = {}
    try:
        masker = load_masker(source, device=device, batch_size=batch_size)
        try:
            # A batch of one prompt at a time: a hundred full-size photos never sit in memory together.
            groups: dict[str, list[ImageRecord]] = {}
            for record in records:
                groups.setdefault(prompts[record.file], []).append(record)
            batches = [
                (prompt, group[start : start + masker.batch_size])
                for prompt, group in groups.items()
                for start in range(0, len(group), masker.batch_size)
            ]
            for prompt, chunk in batches:
                batch: list[tuple[ImageRecord, Image.Image, tuple[int, int]]] = []
                for record in chunk:
                    try:
                        batch.append((record, *_upright(session, record)))
                    except NbkitError as error:
                        results[record.file] = error
                if not batch:
                    continue
                images, sizes = [item[1] for item in batch], [item[2] for item in batch]
                masks = masker.masks(images, prompt, sizes=sizes, threshold=threshold)
                for (record, _, _), mask in zip(batch, masks, strict=True):
                    results[record.file] = coverage = mask_coverage(mask)
                    if coverage < MIN_COVERAGE:
                        continue
                    for relative in mask_files(record):
                        path = session.path / relative
                        before.setdefault(path, path.read_bytes() if path.is_file() else None)
                    record = attach_mask(session, record, mask)
                    masked[record.file] = dataclasses.replace(record, mask_source="auto")
        finally:
            # Training usually comes next and wants the whole GPU.
            del masker
            free_memory()
        if masked:
            detail = {"model": source, "prompt": ", ".join(groups), "threshold": threshold}
            _save(session, masked, detail)
    except BaseException:
        for path, data in before.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        raise
    return results


def _save(session: Session, masked: dict[str, ImageRecord], detail: dict[str, Any]) -> None:
    """Record the masked records and a history entry with one save; on failure the manifest is restored."""
    manifest = session.manifest
    images, history = list(manifest.images), list(manifest.history)
    manifest.images = [masked.get(record.file, record) for record in manifest.images]
    manifest.record_run(RUN_KIND, "ok", {**detail, "masked": len(masked)})
    try:
        session.save()
    except BaseException:
        manifest.images, manifest.history = images, history
        raise
