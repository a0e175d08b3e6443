"""Import instance images into a session: check, de-duplicate, crop, caption, record.

The import works file by file and never lets one bad file stop the others; each gets a row in the
report. It never touches what the session already has: new files get new names (a clash becomes
`name (2)`), every file is written atomically, session.json is saved once at the end, and if anything
fails before that save the files written so far are removed again. Files kept per image:

- `instance_images/originals/<name>`: the file exactly as uploaded (re-crop and audit need it);
- `instance_images/<stem>.png`: the processed copy training reads, square at the training
  resolution (PNG: lossless, so re-saving never adds JPEG artifacts the model could learn);
- `captions/<stem>.txt`: a mirror of the caption recorded in session.json.

Duplicates are found by `pixel_sha256`, the hash of the decoded, upright RGB pixels, not of the file
bytes: a photo renamed, re-saved losslessly, stripped of its EXIF, or stored rotated with an EXIF tag
instead of rotated pixels is still the same picture and is skipped. (A re-compressed JPEG has
different pixels and is not caught; neither would a file hash catch it.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from PIL import Image

from nbkit.errors import NbkitError, setting
from nbkit.families import get_family
from nbkit.fsio import atomic_write_bytes, clean_temporaries
from nbkit.images.buckets import Sizing
from nbkit.images.captions import (
    CaptionMode,
    check_caption_mode,
    compose_caption,
    decode_caption_file,
    normalise_caption,
    token_from_filename,
    token_warnings,
    write_caption_file,
)
from nbkit.images.checks import DEFAULT_MAX_PIXELS, WARNING_PREFIX, CheckedImage, check_image, pixel_sha256
from nbkit.images.contact_sheet import write_contact_sheet
from nbkit.images.crop import (
    Box,
    CropChoice,
    CropMode,
    FaceDetector,
    check_crop_mode,
    choose_crop,
    fit_box,
    render_crop,
)
from nbkit.images.masks import attach_mask, mask_files, photo_stem, read_mask
from nbkit.images.report import ImageReport
from nbkit.images.sources import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, Candidate, Gathered, Source, gather
from nbkit.models.registry import RESOLUTION_STEP, check_resolution_step
from nbkit.session.concepts import check_name, set_concept
from nbkit.session.manifest import ImageRecord, now_iso

if TYPE_CHECKING:
    from nbkit.session.core import Session

INSTANCE_DIR = "instance_images"
ORIGINALS_DIR = "originals"
PROCESSED_SUFFIX = ".png"
FORMAT_SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "TIFF": ".tif",
}


@dataclasses.dataclass
class _Batch:
    """What one import has decided so far (nothing in session.json changes until the end)."""

    records: list[ImageRecord] = dataclasses.field(default_factory=list)
    written: list[Path] = dataclasses.field(default_factory=list)
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    taken: set[str] = dataclasses.field(default_factory=set)


def session_resolution(session: Session) -> int:
    """The square size instance images are processed at: the session's one training size."""
    return session.manifest.training.resolution


def session_sizing(session: Session, resolution: int | None = None, buckets: bool | None = None) -> Sizing:
    """How the session's photos are sized: `resolution` (default: the session's), checked against the
    step of the session's model family, in buckets or squares (default: the session's setting, which
    when unset is the family's default, `Family.buckets_by_default`).

    Args:
        session: the session.
        resolution: the square training size, or None for the session's.
        buckets: train in aspect-ratio buckets, or None for the session's setting.
    """
    base_model = session.manifest.base_model
    family = get_family(base_model.family) if base_model else None
    step = family.resolution_step if family else RESOLUTION_STEP
    resolution = check_resolution_step(
        resolution if resolution is not None else session_resolution(session), step
    )
    if buckets is None:
        buckets = session.manifest.training.buckets
    if buckets is None:
        buckets = family.buckets_by_default if family else False
    return Sizing(resolution, step, buckets)


def import_images(
    session: Session,
    sources: Iterable[Source] | Mapping[str, bytes],
    *,
    crop: CropMode = "smart",
    captions: CaptionMode = "extend",
    resolution: int | None = None,
    tokenizer=None,
    recursive: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT,
    token: str = "",
    concept: str = "",
) -> ImageReport:
    """Import pictures into `session` and return the report (one row per file).

    Args:
        session: the session to add to.
        sources: file paths, folders (a Drive folder), .zip files, http(s) URLs, `(name, bytes)` pairs,
            or a `{name: bytes}` mapping as Colab's `files.upload()` returns. `.txt` files caption the
            image with the same stem.
        crop: `smart` (faces, else saliency), `center`, or `none` (short side scaled, not squared).
        captions: what a `.txt` caption does to the file-name token: `extend` (appended after it, as
            fast-DreamBooth does) or `override`.
        resolution: the processed size; defaults to the session's (`session_resolution`). Crops
            have the shape of the photo's aspect-ratio bucket when the session trains in buckets.
        tokenizer: a CLIP tokenizer, to warn when the instance token is a word the model knows.
        recursive: look into sub-folders of folders.
        max_bytes: the largest file accepted, also for downloads.
        max_pixels: the decompression-bomb guard.
        timeout: seconds a download may wait for the server.
        token: the instance token of every imported picture ("" takes each one's from its file name).
        concept: the concept the pictures show ("": the session's first; a new name adds a concept,
            `nbkit.session.concepts`).
    """
    check_crop_mode(crop)
    concept = check_name(concept)
    check_caption_mode(captions)
    sizing = session_sizing(session, resolution)
    detector = FaceDetector() if crop == "smart" else None
    gathered = gather(sources, max_bytes=max_bytes, timeout=timeout, recursive=recursive)
    report = ImageReport(title=f'Import into session "{session.name}"')
    for source, error in gathered.failures:
        report.add(source, "error", error.message, fix=error.fix)
    with session.lock("importing images"):
        return _import_locked(
            session, gathered, report, sizing, crop, captions, detector, max_pixels, tokenizer, token, concept
        )


def _import_locked(
    session: Session,
    gathered: Gathered,
    report: ImageReport,
    sizing: Sizing,
    crop: CropMode,
    captions: CaptionMode,
    detector: FaceDetector | None,
    max_pixels: int,
    tokenizer,
    token: str = "",
    concept: str = "",
) -> ImageReport:
    folder = session.dir(INSTANCE_DIR)
    had_originals = (folder / ORIGINALS_DIR).is_dir()
    for directory in (folder, folder / ORIGINALS_DIR):
        clean_temporaries(directory)  # what a killed import left half-written; we hold the lock
    texts = _read_caption_files(gathered.captions, report)
    batch = _Batch(
        hashes={record.sha256: PurePath(record.file).name for record in session.manifest.images},
        taken=_taken_stems(session, folder),
    )
    used_texts: set[str] = set()
    new_stems: dict[str, int] = {}  # an uploaded photo's stem -> its record in the batch, for its mask
    started = now_iso()
    try:
        for candidate in gathered.images:
            record = _import_one(candidate, session, batch, report, sizing, crop, detector, max_pixels)
            if record is None:
                continue
            new_stems[PurePath(candidate.name).stem.casefold()] = len(batch.records) - 1
            record.token = normalise_caption(token) or record.token
            record.concept = concept
            stem_key = PurePath(candidate.name).stem.casefold()  # after reading: a download may rename it
            text = texts.get(stem_key, (None, None))[1]
            stem = PurePath(record.file).stem
            if text is None and stem == PurePath(candidate.name).stem:
                text = _existing_caption_file(session, stem)
            record.caption = compose_caption(record.token, text or "", captions)
            record.caption_source = "txt" if text else "filename"
            used_texts.add(stem_key)
        updates = _captions_for_existing(session, texts, used_texts, captions, report)
        updates += _token_for_uncaptioned(session, normalise_caption(token), updates, report, concept)
        updates = _attach_masks(session, gathered.masks, new_stems, batch, updates, report, max_pixels)
        if batch.records or updates:
            _commit(session, batch, updates, report, crop, sizing, started, concept)
    except BaseException:
        for path in batch.written:
            path.unlink(missing_ok=True)
        if not had_originals:
            with contextlib.suppress(OSError):
                (folder / ORIGINALS_DIR).rmdir()
        raise
    for record in [*batch.records, *updates]:
        write_caption_file(session, record)
    if batch.records or updates:
        report.contact_sheet = write_contact_sheet(session)
    report.warnings = token_warnings([record.token for record in session.manifest.images], tokenizer)
    return report


def _attach_masks(
    session: Session,
    masks: list[Candidate],
    new_stems: dict[str, int],
    batch: _Batch,
    updates: list[ImageRecord],
    report: ImageReport,
    max_pixels: int,
) -> list[ImageRecord]:
    """Pair each mask with its photo (one imported now, else one already in the session) and write it;
    returns `updates` with the existing photos that got a mask."""
    if not masks:
        return updates
    by_file = {record.file: record for record in updates}
    existing = {PurePath(record.file).stem.casefold(): record for record in session.manifest.images}
    for candidate in masks:
        stem = photo_stem(candidate.name)
        if stem in new_stems:
            record = batch.records[new_stems[stem]]
        elif stem in existing:
            record = by_file.get(existing[stem].file, existing[stem])
        else:
            report.add(
                candidate.display,
                "error",
                f"no photo named {stem}.* to be the mask of",
                fix="name a mask like its photo plus .mask: `zwx (1).mask.png` for `zwx (1).jpg`",
            )
            continue
        try:
            size = (record.original_width or record.width, record.original_height or record.height)
            mask = read_mask(candidate.read(), candidate.name, size, max_pixels=max_pixels)
        except NbkitError as error:
            report.add(candidate.display, "error", error.message, fix=error.fix)
            continue
        # Only new files are removed if the import fails: an earlier mask replaced now is not lost.
        batch.written += [
            path for path in (session.path / file for file in mask_files(record)) if not path.exists()
        ]
        masked = attach_mask(session, record, mask)
        if stem in new_stems:
            batch.records[new_stems[stem]] = masked
        else:
            by_file[masked.file] = masked
        # No `saved_as`: the report counts photos imported by it, and a mask is none.
        report.add(candidate.display, "ok", f"subject mask of {PurePath(record.file).name}, in {masked.mask}")
    return list(by_file.values())


def _import_one(
    candidate: Candidate,
    session: Session,
    batch: _Batch,
    report: ImageReport,
    sizing: Sizing,
    crop: CropMode,
    detector: FaceDetector | None,
    max_pixels: int,
) -> ImageRecord | None:
    try:
        data = candidate.read()
        checked = check_image(data, name=candidate.name, max_pixels=max_pixels, sizing=sizing)
    except NbkitError as error:
        report.add(candidate.display, "error", error.message, fix=error.fix)
        return None
    digest = pixel_sha256(checked.image)
    if digest in batch.hashes:
        report.add(candidate.display, "duplicate", f"same picture as {batch.hashes[digest]}")
        return None
    choice, processed = crop_for_training(checked.image, crop, sizing, detector)

    stem = unique_stem(PurePath(candidate.name).stem, batch.taken)
    original = f"{INSTANCE_DIR}/{ORIGINALS_DIR}/{stem}{_original_suffix(candidate.name, checked)}"
    file = f"{INSTANCE_DIR}/{stem}{PROCESSED_SUFFIX}"
    for relative, payload in ((original, data), (file, encode_png(processed))):
        batch.written.append(session.path / relative)
        atomic_write_bytes(session.path / relative, payload)
    batch.taken.add(stem.casefold())
    batch.hashes[digest] = PurePath(file).name

    record = ImageRecord(
        file=file,
        original=original,
        sha256=digest,
        caption="",
        width=processed.width,
        height=processed.height,
        notes=[*checked.notes, *(WARNING_PREFIX + warning for warning in checked.warnings)],
        source=candidate.source,
        token=token_from_filename(candidate.name),
        original_width=checked.image.width,
        original_height=checked.image.height,
    )
    apply_choice(record, choice, crop)
    batch.records.append(record)
    report.add(
        candidate.display,
        "warning" if checked.warnings else "ok",
        describe(checked, choice, processed.size),
        saved_as=file,
    )
    return record


def crop_for_training(
    image: Image.Image,
    crop: CropMode,
    sizing: Sizing,
    detector: FaceDetector | None = None,
    box: Box | None = None,
) -> tuple[CropChoice, Image.Image]:
    """Crop a picture for training: the crop decision and the processed picture.

    With buckets the crop has the shape of the picture's bucket (of the hand-picked box's, when there
    is one, which is then trimmed evenly to the bucket's aspect); without, it is square. Crop mode
    `none` keeps the whole picture, short side at the resolution.

    Args:
        image: the upright RGB picture.
        crop: `smart`, `center` or `none`.
        sizing: the session's sizing (`session_sizing`).
        detector: required for `smart` without a box.
        box: a hand-picked crop, or None to choose one.
    """
    if crop == "none":
        choice = CropChoice(box=box, focus="manual") if box is not None else choose_crop(image, crop)
        return choice, render_crop(image, choice.box, sizing.resolution, square=False)
    if box is None:
        size = sizing.target(*image.size)
        choice = choose_crop(image, crop, detector, aspect=size)
    else:
        size = sizing.target(box[2] - box[0], box[3] - box[1])
        choice = CropChoice(box=_trim_to(box, size), focus="manual")
    return choice, render_crop(image, choice.box, sizing.resolution, size=size)


def fits(record: ImageRecord, sizing: Sizing) -> bool:
    """Whether a record's processed picture has the size `sizing` gives it (else it is cropped again).

    Args:
        record: the image's record.
        sizing: the run's sizing.
    """
    if record.crop == "none":
        return min(record.width, record.height) == sizing.resolution
    if record.focus == "manual" and record.crop_box:
        left, top, right, bottom = record.crop_box
        shape = (right - left, bottom - top)
    else:
        shape = (record.original_width or record.width, record.original_height or record.height)
    return (record.width, record.height) == sizing.target(*shape)


def _trim_to(box: Box, aspect: tuple[int, int]) -> Box:
    """The largest box of `aspect` centred inside `box`."""
    left, top, right, bottom = box
    width, height = fit_box((right - left, bottom - top), aspect)
    left += (right - left - width) // 2
    top += (bottom - top - height) // 2
    return (left, top, left + width, top + height)


def apply_choice(record: ImageRecord, choice: CropChoice, crop: CropMode) -> None:
    """Copy a crop decision into an image record."""
    record.crop = crop
    record.focus = choice.focus
    record.crop_box = list(choice.box)
    record.face_box = list(choice.faces[0]) if choice.faces else None


def describe(checked: CheckedImage, choice: CropChoice, size: tuple[int, int] | None = None) -> str:
    """The report's reason for an imported picture: size, format, crop (and the size it was cropped
    to: the bucket), conversions and warnings."""
    crop = {"face": "face crop", "saliency": "saliency crop", "center": "center crop"}.get(choice.focus)
    if crop and size:
        crop += f" to {size[0]}x{size[1]}"
    parts = [
        f"{checked.image.width}x{checked.image.height} {checked.format}",
        crop,
        *checked.notes,
        *checked.warnings,
    ]
    return "; ".join(part for part in parts if part)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem (2)`, `stem (3)`, ... whichever is free (compared case-insensitively, as Drive
    and macOS do). The token is unaffected: a trailing ` (n)` is a copy counter."""
    candidate, number = stem, 2
    while candidate.casefold() in taken:
        candidate, number = f"{stem} ({number})", number + 1
    return candidate


def _taken_stems(session: Session, folder: Path) -> set[str]:
    """Stems no new image may use: every recorded image, and any file already in the folders
    (a user's own file or a leftover is never overwritten)."""
    taken = {PurePath(record.file).stem.casefold() for record in session.manifest.images}
    taken |= {PurePath(record.original).stem.casefold() for record in session.manifest.images}
    for directory in (folder, folder / ORIGINALS_DIR):
        if directory.is_dir():
            taken |= {path.stem.casefold() for path in directory.iterdir()}
    return taken


def _original_suffix(name: str, checked: CheckedImage) -> str:
    suffix = PurePath(name).suffix.lower()
    if suffix in Image.registered_extensions():
        return suffix
    return FORMAT_SUFFIXES.get(checked.format, "." + checked.format.lower())


def _read_caption_files(candidates: list[Candidate], report: ImageReport) -> dict[str, tuple[str, str]]:
    texts: dict[str, tuple[str, str]] = {}
    for candidate in candidates:
        try:
            text = decode_caption_file(candidate.read(), candidate.name)
        except NbkitError as error:
            report.add(candidate.display, "error", error.message, fix=error.fix)
            continue
        texts[PurePath(candidate.name).stem.casefold()] = (candidate.display, text)
    return texts


def _existing_caption_file(session: Session, stem: str) -> str | None:
    """A caption put in the session's `captions/` before its image arrived (the fast-DreamBooth way)."""
    path = session.path / "captions" / f"{stem}.txt"
    if not path.is_file():
        return None
    try:
        return decode_caption_file(path.read_bytes(), path.name)
    except NbkitError:
        return None


def _captions_for_existing(
    session: Session,
    texts: dict[str, tuple[str, str]],
    used: set[str],
    mode: CaptionMode,
    report: ImageReport,
) -> list[ImageRecord]:
    """Caption files uploaded without their image caption the session's image of that stem."""
    records = {PurePath(record.file).stem.casefold(): record for record in session.manifest.images}
    updates = []
    for stem_key, (source, text) in texts.items():
        if stem_key in used:
            report.add(source, "ok", "caption file for the image imported with it")
        elif stem_key in records:
            record = records[stem_key]
            updated = dataclasses.replace(
                record, caption=compose_caption(record.token, text, mode), caption_source="txt"
            )
            updates.append(updated)
            # The caption is in session.json and captions/; the report names it, never quotes a file.
            report.add(source, "ok", f"caption for {PurePath(record.file).name}")
        else:
            report.add(
                source,
                "warning",
                "caption file matches no image",
                fix="give it the same name as its image (zwx (1).txt for zwx (1).jpg)",
            )
    return updates


def _token_for_uncaptioned(
    session: Session, token: str, updates: list[ImageRecord], report: ImageReport, concept: str = ""
) -> list[ImageRecord]:
    """A given token also captions the concept's photos that still have no caption (named `1.png`), so
    importing again with a token fixes an earlier import instead of adding nothing."""
    if not token:
        return []
    updated = {record.file for record in updates}
    fixed = []
    for record in session.manifest.images:
        if record.file not in updated and not record.caption.strip() and record.concept == concept:
            fixed.append(dataclasses.replace(record, token=token, caption=token, caption_source="filename"))
            report.add(PurePath(record.file).name, "ok", f"captioned with the token {token!r}")
    return fixed


def uncaptioned_images(session: Session) -> list[str]:
    """The file names of the session's photos whose caption is empty (training would refuse them)."""
    return [PurePath(record.file).name for record in session.manifest.images if not record.caption.strip()]


def check_captions(session: Session) -> None:
    """Refuse a session whose photos lack a caption, naming them and the ways to give one.

    Args:
        session: the open session.

    Raises:
        NbkitError: when any photo's caption is empty (its file name gave no token and no .txt came).
    """
    missing = uncaptioned_images(session)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NbkitError(
            f"{len(missing)} photo(s) have no caption: {shown}: their file names give no instance token "
            "and no .txt caption came with them",
            path=session.dir(INSTANCE_DIR),
            fix=f"import again with a token for them ({setting('token', 'zwx')}, a rare word for your "
            "subject), or name the photos like 'zwx (1).jpg', or put a .txt caption next to each",
        )


def _commit(
    session: Session,
    batch: _Batch,
    updates: list[ImageRecord],
    report: ImageReport,
    crop: str,
    sizing: Sizing,
    started: str,
    concept: str = "",
) -> None:
    """Record the batch in session.json with one save; on failure the in-memory manifest is restored."""
    manifest = session.manifest
    images, history, known = list(manifest.images), list(manifest.history), list(manifest.concepts)
    if concept and all(record.name != concept for record in manifest.concepts):
        set_concept(manifest, concept)
    by_file = {record.file: record for record in updates}
    manifest.images = [by_file.get(record.file, record) for record in manifest.images] + batch.records
    detail = {
        "imported": len(batch.records),
        "duplicates": len(report.by_status("duplicate")),
        "errors": len(report.by_status("error")),
        "captions_updated": len(updates),
        "crop": crop,
        "resolution": sizing.resolution,
        "buckets": sizing.buckets,
        "concept": concept,
    }
    manifest.record_run("images", "ok", detail, started=started)
    try:
        session.save()
    except BaseException:
        manifest.images, manifest.history, manifest.concepts = images, history, known
        raise
