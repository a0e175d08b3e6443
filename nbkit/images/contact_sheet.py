"""A contact sheet: every processed crop in one PNG grid, with file names, for a quick review.

Crops that carry a warning (upscaled, unreadable EXIF, ...) get an amber frame, so the photos worth a
second look stand out among thirty. So do photos `nbkit vision check` flagged (near-duplicate,
off-subject?), with ` [dup]` / ` [off?]` after the name.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from nbkit.fsio import atomic_path
from nbkit.images.checks import WARNING_PREFIX
from nbkit.images.vision_flags import read_vision_flags, short_flags

if TYPE_CHECKING:
    from nbkit.session.core import Session

CONTACT_SHEET = "contact_sheet.png"
MAX_COLUMNS = 8
BACKGROUND = (245, 245, 245)
WARNING_COLOUR = (214, 140, 0)
MISSING_COLOUR = (200, 200, 200)


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
    pad, label_height = 8, 18
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
        draw.text((x, y + thumb + 3), _fit(label, font, thumb), fill=(40, 40, 40), font=font)
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
        label = PurePath(record.file).name + short_flags(found)
        items.append((label, _load(session.path / record.file), flagged))
    sheet = make_contact_sheet(items, thumb=thumb)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _load(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (256, 256))
            return image.convert("RGB")
    except OSError:
        return None


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
