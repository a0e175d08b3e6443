"""List, re-crop and remove a session's instance images.

Re-cropping works from the kept originals, so changing the crop mode, the resolution (say, after
switching from SD 1.5 to SDXL) or fixing one crop by hand never compounds resampling losses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath
from typing import TYPE_CHECKING

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_bytes
from nbkit.images.buckets import Sizing
from nbkit.images.captions import caption_path, find_record, token_warnings
from nbkit.images.checks import DEFAULT_MAX_PIXELS, WARNING_PREFIX, CheckedImage, check_image
from nbkit.images.contact_sheet import write_contact_sheet
from nbkit.images.crop import Box, CropChoice, CropMode, FaceDetector, check_crop_mode
from nbkit.images.importing import apply_choice, crop_for_training, describe, encode_png, session_sizing
from nbkit.images.masks import recut_mask
from nbkit.images.report import ImageReport
from nbkit.session.manifest import ImageRecord

if TYPE_CHECKING:
    from nbkit.session.core import Session


def list_images(session: Session, *, tokenizer=None) -> ImageReport:
    """A table of the session's images: caption, crop, and any warning; missing files are errors.

    Args:
        session: the session.
        tokenizer: a CLIP tokenizer, to warn when the instance token is a word the model knows.
    """
    report = ImageReport(title=f'Images of session "{session.name}"')
    for record in session.manifest.images:
        warnings = [note[len(WARNING_PREFIX) :] for note in record.notes if note.startswith(WARNING_PREFIX)]
        notes = [note for note in record.notes if not note.startswith(WARNING_PREFIX)]
        missing = [path for path in (record.file, record.original) if not (session.path / path).is_file()]
        reason = "; ".join(
            [
                f'caption "{record.caption}"',
                f"{record.width}x{record.height}, {record.focus} crop",
                *([f"concept {record.concept}"] if record.concept else []),
                *notes,
                *warnings,
            ]
        )
        if missing:
            report.add(record.file, "error", f"missing {', '.join(missing)}", fix="import the photo again")
        else:
            report.add(
                PurePath(record.file).name, "warning" if warnings else "ok", reason, saved_as=record.file
            )
    report.warnings = token_warnings([record.token for record in session.manifest.images], tokenizer)
    path = session.path / "contact_sheet.png"
    report.contact_sheet = path if path.is_file() else None
    return report


def recrop_images(
    session: Session,
    names: Iterable[str] | None = None,
    *,
    crop: CropMode = "smart",
    resolution: int | None = None,
    box: Box | None = None,
) -> ImageReport:
    """Crop images again from their originals and save session.json once.

    Args:
        session: the session.
        names: the images (see `find_record`); all when None.
        crop: `smart`, `center` or `none`.
        resolution: the processed size; defaults to the session's.
        box: a hand-picked `(left, top, right, bottom)` in pixels of the upright original, square
            unless `crop` is `none` or the session trains in buckets; only with `names`.
    """
    check_crop_mode(crop)
    sizing = session_sizing(session, resolution)
    records = _select(session, names)
    if box is not None and names is None:
        raise NbkitError("a crop box needs the image it is for", fix="name the image(s) to crop by hand")
    report = ImageReport(title=f'Re-crop in session "{session.name}"')
    with session.lock("cropping images"):
        _recrop(session, [(record, crop, box) for record in records], sizing, report)
    return report


def recrop_for_training(session: Session, files: Iterable[str], sizing: Sizing) -> ImageReport:
    """Crop images again at a new training size or bucket setting, each as it was cropped before (its
    mode, its hand-picked box); for a caller that already holds the session's lock (training).

    Args:
        session: the session.
        files: the images' `file` paths (as in session.json).
        sizing: the run's sizing.
    """
    wanted = set(files)
    jobs = [
        (record, record.crop, record.crop_box if record.focus == "manual" else None)
        for record in session.manifest.images
        if record.file in wanted
    ]
    report = ImageReport(title=f'Re-crop at {sizing.describe()} in session "{session.name}"')
    _recrop(session, jobs, sizing, report)
    failed = [row for row in report.rows if row.status == "error"]
    if failed:
        raise NbkitError(
            f"{len(failed)} image(s) could not be cropped again at {sizing.describe()}: {failed[0].reason}",
            path=session.path / "instance_images" / failed[0].file,
            fix="import those photos again, or remove them (`nbkit images remove`)",
        )
    return report


def _recrop(
    session: Session,
    jobs: list[tuple[ImageRecord, CropMode, Box | None]],
    sizing: Sizing,
    report: ImageReport,
) -> None:
    """Crop each (record, mode, box) again and save session.json once (the caller holds the lock)."""
    detector = FaceDetector() if any(crop == "smart" and box is None for _, crop, box in jobs) else None
    results = []
    for record, crop, box in jobs:
        try:
            checked, choice, processed = _recrop_one(session, record, crop, sizing, box, detector)
        except NbkitError as error:
            report.add(PurePath(record.file).name, "error", error.message, fix=error.fix)
            continue
        notes = [*checked.notes, *(WARNING_PREFIX + warning for warning in checked.warnings)]
        results.append((record, crop, choice, notes, encode_png(processed), processed.size))
        reason = f"{describe(checked, choice)}; now {processed.width}x{processed.height}"
        report.add(
            PurePath(record.file).name, "warning" if checked.warnings else "ok", reason, saved_as=record.file
        )
    if not results:
        return
    # Every crop is computed before the first file is replaced, so a bad original changes nothing.
    for record, crop, choice, notes, png, (width, height) in results:
        atomic_write_bytes(session.path / record.file, png)
        apply_choice(record, choice, crop)
        record.notes, record.width, record.height = notes, width, height
        recut_mask(session, record)  # the subject mask follows its photo's new crop
    modes = sorted({crop for _, crop, _ in jobs})
    detail = {"recropped": len(results), "crop": ",".join(modes), "resolution": sizing.resolution}
    session.manifest.record_run("images", "ok", {**detail, "buckets": sizing.buckets})
    session.save()
    report.contact_sheet = write_contact_sheet(session)


def _recrop_one(
    session: Session,
    record: ImageRecord,
    crop: CropMode,
    sizing: Sizing,
    box: Box | None,
    detector: FaceDetector | None,
) -> tuple[CheckedImage, CropChoice, Image.Image]:
    try:
        data = (session.path / record.original).read_bytes()
    except OSError as error:
        raise NbkitError(
            f"its original is unreadable: {error.strerror}", fix="import the photo again"
        ) from None
    checked = check_image(data, name=record.original, max_pixels=DEFAULT_MAX_PIXELS, sizing=sizing)
    if box is not None:
        box = check_box(box, checked.image.size, square=crop != "none" and not sizing.buckets)
    choice, processed = crop_for_training(checked.image, crop, sizing, detector, box)
    return checked, choice, processed


def remove_images(session: Session, names: Iterable[str] | None = None) -> ImageReport:
    """Remove images from the session: record first (one save), then their files.

    Args:
        session: the session.
        names: the images (see `find_record`); all when None.
    """
    records = _select(session, names)
    report = ImageReport(title=f'Remove from session "{session.name}"')
    if not records:
        return report
    doomed = {id(record) for record in records}
    session.manifest.images = [record for record in session.manifest.images if id(record) not in doomed]
    session.manifest.record_run("images", "ok", {"removed": len(records)})
    session.save()
    for record in records:
        # Files go only after session.json no longer names them: a kill in between leaves orphans,
        # never a session that points at missing files.
        for path in (
            session.path / record.file,
            session.path / record.original,
            caption_path(session, record),
            *(session.path / mask for mask in (record.mask, record.mask_original) if mask),
        ):
            path.unlink(missing_ok=True)
        report.add(PurePath(record.file).name, "ok", "removed")
    report.contact_sheet = write_contact_sheet(session)
    return report


def check_box(box: Box, size: tuple[int, int], *, square: bool) -> Box:
    """Validate a hand-picked crop box against a picture's size.

    Args:
        box: `(left, top, right, bottom)`.
        size: the upright picture's `(width, height)`.
        square: whether the box must be square.
    """
    values = tuple(box)
    if len(values) != 4 or not all(
        isinstance(value, int) and not isinstance(value, bool) for value in values
    ):
        raise NbkitError(
            f"crop box {box!r} is not four whole numbers", fix="give left,top,right,bottom in pixels"
        )
    left, top, right, bottom = values
    width, height = size
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise NbkitError(f"crop box {values} is outside the {width}x{height} picture")
    if square and right - left != bottom - top:
        raise NbkitError(
            f"crop box {values} is {right - left}x{bottom - top}, not square",
            fix="make right-left equal bottom-top, or crop with mode 'none'",
        )
    return values  # type: ignore[return-value]


def _select(session: Session, names: Iterable[str] | None) -> list[ImageRecord]:
    if names is None:
        return list(session.manifest.images)
    selected: list[ImageRecord] = []
    for name in names:
        record = find_record(session, name)
        if all(record is not other for other in selected):
            selected.append(record)
    return selected
