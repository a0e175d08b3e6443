"""Subject masks: which pixels of a photo are the subject, so training can weigh the background less.

A mask is a grayscale picture the size of its photo, white on the subject and black elsewhere (gray
in between counts in part). It comes from the user, `zwx (1).mask.png` beside `zwx (1).jpg` or a
folder of masks named like the photos, or is made from the class word (`nbkit.images.automask`).

The session keeps the mask as given (`instance_images/originals/<stem>.mask.png`, the upright photo's
size) and cropped and resized like the photo (`instance_images/masks/<stem>.png`), so a re-crop or a
change of bucket cuts the mask again from the original, as it does the photo.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import PurePath
from typing import TYPE_CHECKING

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_bytes
from nbkit.images.checks import check_image
from nbkit.images.sources import MASK_SUFFIX

if TYPE_CHECKING:
    from nbkit.session.core import Session
    from nbkit.session.manifest import ImageRecord

MASK_DIR = "instance_images/masks"
ORIGINAL_MASK_DIR = "instance_images/originals"
# A mask a little off the photo's aspect (an export that rounded a side) is stretched; more is refused.
ASPECT_TOLERANCE = 0.02


def photo_stem(name: str) -> str:
    """The stem of the photo a mask belongs to, case-folded for matching: `Zwx (1).mask.png` -> `zwx (1)`."""
    stem = PurePath(name).stem
    if stem.lower().endswith(MASK_SUFFIX):
        stem = stem[: -len(MASK_SUFFIX)]
    return stem.casefold()


def read_mask(data: bytes, name: str, size: tuple[int, int], *, max_pixels: int) -> Image.Image:
    """Decode a mask and fit it to its photo's upright `size`, as 8-bit grayscale.

    Args:
        data: the mask file's bytes.
        name: its name, for messages.
        size: the photo's upright (width, height).
        max_pixels: the decompression-bomb guard.

    Raises:
        NbkitError: the file is no picture, or its shape is not the photo's.
    """
    mask = check_image(data, name=name, max_pixels=max_pixels).image.convert("L")
    if mask.size != size:
        if abs(mask.width / mask.height - size[0] / size[1]) > ASPECT_TOLERANCE * size[0] / size[1]:
            raise NbkitError(
                f"the mask is {mask.width}x{mask.height} but its photo is {size[0]}x{size[1]}",
                path=name,
                fix="save the mask at the photo's size (white on the subject, black elsewhere)",
            )
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def render_mask(mask: Image.Image, record: ImageRecord) -> Image.Image:
    """Cut and resize a mask the way its photo was: the record's crop box, at its processed size.

    Args:
        mask: the mask at the upright original's size.
        record: the photo's record (crop box and processed size).
    """
    box = tuple(record.crop_box) if record.crop_box else (0, 0, mask.width, mask.height)
    return mask.resize((record.width, record.height), Image.Resampling.BILINEAR, box=box)


def mask_files(record: ImageRecord) -> tuple[str, str]:
    """Where a record's mask lives: (processed, original), relative to the session folder."""
    stem = PurePath(record.file).stem
    return f"{MASK_DIR}/{stem}.png", f"{ORIGINAL_MASK_DIR}/{stem}{MASK_SUFFIX}.png"


def attach_mask(session: Session, record: ImageRecord, mask: Image.Image) -> ImageRecord:
    """Write a mask's two files atomically and return the record naming them (the caller saves).

    Args:
        session: the session.
        record: the photo's record (not changed).
        mask: the mask at the upright original's size (`read_mask`).
    """
    processed, original = mask_files(record)
    for relative, image in ((original, mask), (processed, render_mask(mask, record))):
        atomic_write_bytes(session.path / relative, _png(image))
    return dataclasses.replace(record, mask=processed, mask_original=original, mask_source="file")


def recut_mask(session: Session, record: ImageRecord) -> None:
    """Cut a record's mask again from its original after the photo was cropped again.

    Args:
        session: the session.
        record: the photo's record, with its new crop box and size.
    """
    if not record.mask_original:
        return
    with Image.open(session.path / record.mask_original) as opened:
        mask = opened.convert("L")
    atomic_write_bytes(session.path / record.mask, _png(render_mask(mask, record)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
