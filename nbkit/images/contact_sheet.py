"""A contact sheet: every photo in one PNG grid, with file names, for a quick review.

Each cell shows the upright original with its crop drawn on it (and, with a subject mask, everything
outside the subject dimmed), and under the name the size the crop trains at (its aspect-ratio bucket),
so a cut-off head, a mask that misses the subject or a photo in an odd bucket is seen at once.

Crops that carry a warning (upscaled, unreadable EXIF, ...) get an amber frame, so the photos worth a
second look stand out among thirty. So do photos `nbkit vision check` flagged (near-duplicate,
off-subject?), with ` [dup]` / ` [off?]` after the name.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont, ImageOps

from nbkit.fsio import atomic_path
from nbkit.images.checks import WARNING_PREFIX
from nbkit.images.vision_flags import read_vision_flags, short_flags

if TYPE_CHECKING:
    from nbkit.session.core import Session
    from nbkit.session.manifest import ImageRecord

CONTACT_SHEET = "contact_sheet.png"
MAX_COLUMNS = 8
BACKGROUND = (245, 245, 245)
WARNING_COLOUR = (214, 140, 0)
MISSING_COLOUR = (200, 200, 200)
CROP_COLOUR = (0, 160, 255)
MASK_DIMMING = 0.6  # how far the background outside a subject mask is darkened


def make_contact_sheet(
    items: list[tuple[str, Image.Image | None, bool]], *, thumb: int = 160, columns: int | None = None
) -> Image.Image:
    """Lay out labelled thumbnails in a grid.

    Args:
        items: `(label, image or None when missing, flagged)` per picture.
        thumb: the thumbnail size in pixels (square box; aspect ratio kept).
        columns: grid width; defaults to a near-square grid of at most 8 columns.
    """
    if thumb < 16:
        raise ValueError(f"thumb {thumb} is too small to show anything")
    count = max(1, len(items))
    columns = columns or min(MAX_COLUMNS, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    pad = 8
    label_height = 18 * max((label.count("\n") + 1 for label, _, _ in items), default=1)
    font = _font(12)
    cell_w, cell_h = thumb + pad, thumb + label_height + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, (label, image, flagged) in enumerate(items):
        x = pad + (index % columns) * cell_w
        y = pad + (index // columns) * cell_h
        if image is None:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=MISSING_COLOUR)
            draw.text((x + 4, y + thumb // 2 - 6), "missing", fill=(90, 90, 90), font=font)
        else:
            small = image.convert("RGB")
            small.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
            sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        if flagged:
            draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=WARNING_COLOUR, width=3)
        lines = "\n".join(_fit(line, font, thumb) for line in label.split("\n"))
        draw.multiline_text((x, y + thumb + 3), lines, fill=(40, 40, 40), font=font, spacing=4)
    return sheet


def write_contact_sheet(session: Session, *, thumb: int = 160) -> Path | None:
    """Write `contact_sheet.png` of the session's processed images into the session folder, atomically.

    Args:
        session: the session.
        thumb: the thumbnail size in pixels.

    Returns:
        Its path, or None when the session has no images (any old sheet is then removed).
    """
    path = session.path / CONTACT_SHEET
    if not session.manifest.images:
        path.unlink(missing_ok=True)
        return None
    items = []
    vision = read_vision_flags(session.path)
    for record in session.manifest.images:
        found = vision.get(record.file, [])
        flagged = bool(found) or any(note.startswith(WARNING_PREFIX) for note in record.notes)
        size = f"{record.width}x{record.height}" + (f", {record.concept}" if record.concept else "")
        label = f"{PurePath(record.file).name}{short_flags(found)}\n{size}"
        items.append((label, _with_crop(session, record), flagged))
    sheet = make_contact_sheet(items, thumb=thumb)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _load(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (256, 256))  # JPEGs decode at a fraction of their size
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError:
        return None


def _with_crop(session: Session, record: ImageRecord) -> Image.Image | None:
    """The original, upright, with the crop outlined; the processed picture when that cannot be drawn."""
    original = _load(session.path / record.original) if record.crop_box and record.original_width else None
    if original is None:
        return _load(session.path / record.file)
    if record.mask_original:
        with contextlib.suppress(OSError), Image.open(session.path / record.mask_original) as opened:
            mask = opened.convert("L").resize(original.size, Image.Resampling.BILINEAR)
            dimmed = Image.blend(original, Image.new("RGB", original.size), MASK_DIMMING)
            original = Image.composite(original, dimmed, mask)
    scale = original.width / record.original_width
    left, top, right, bottom = (round(value * scale) for value in record.crop_box)
    line = max(2, round(max(original.size) / 80))
    ImageDraw.Draw(original).rectangle((left, top, right - 1, bottom - 1), outline=CROP_COLOUR, width=line)
    return original


def _fit(label: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """Shorten from the middle: names of one set differ at the end (`zwx (12).png`)."""
    if font.getlength(label) <= width:
        return label
    head, tail = label[: len(label) // 2], label[len(label) // 2 :]
    while (head or tail) and font.getlength(head + "…" + tail) > width:
        head, tail = (head[:-1], tail) if len(head) >= len(tail) else (head, tail[1:])
    return head + "…" + tail


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()
