"""Where generated images go: `outputs/<date>/<number>-<seed>.png`, as A1111 names them, and the file
format they are saved and sent in (A1111's `samples_format` option: PNG, JPEG or WebP).

Each image carries A1111's infotext where A1111 puts it (a PNG's `parameters` text chunk, a JPEG's or
WebP's EXIF UserComment in UTF-16), so PNG Info (ours or A1111's) reads how it was made.
Files are written atomically; the number continues from the highest one in the day's folder, so two
runs never overwrite each other's images. Only files under the outputs folder are ever listed or
zipped: a name from a request never leaves it.
"""

from __future__ import annotations

import datetime
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_bytes
from nbkit.generation.infotext import EXIF_IFD, PNG_KEY, UNICODE_CODE, USER_COMMENT, read_infotext

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")  # A1111's `samples_format` values nbkit writes
_NUMBERED = re.compile(r"^(\d{5,})-")


@dataclass(frozen=True)
class ImageFormat:
    """How an image is written: A1111's `samples_format`, `jpeg_quality`, `webp_lossless` and
    `enable_pnginfo` options.

    Args:
        kind: `png`, `jpg`, `jpeg` or `webp`.
        quality: JPEG and lossy WebP quality (1..100; A1111's default 80).
        lossless: WebP without loss (A1111 applies it to saved files only; nbkit to both).
        infotext: write the infotext into the image.
    """

    kind: str = "png"
    quality: int = 80
    lossless: bool = False
    infotext: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SAMPLES_FORMATS:
            raise ValueError(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, got {self.kind!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg_quality must be from 1 to 100, got {self.quality!r}")

    @property
    def suffix(self) -> str:
        return f".{self.kind}"

    @property
    def mime(self) -> str:
        return {"png": "image/png", "webp": "image/webp"}.get(self.kind, "image/jpeg")


PNG = ImageFormat()  # the default: PNG with the infotext


def encode_image(image: Image.Image, infotext: str | None, fmt: ImageFormat = PNG) -> bytes:
    """The file bytes of `image` in `fmt`, with the infotext where A1111 writes it.

    PNG: a `parameters` text chunk. JPEG and WebP: the EXIF UserComment, `UNICODE` then UTF-16BE, as
    A1111 writes it with piexif (an RGBA image is flattened to RGB first, as A1111 does).

    Args:
        image: the image.
        infotext: its A1111 infotext (None: none).
        fmt: the format and its options.
    """
    text = infotext if fmt.infotext else None
    options: dict[str, Any]
    if fmt.kind == "png":
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_text(PNG_KEY, text)
        options = {"format": "PNG", "pnginfo": info}
    else:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        options = {"format": "WEBP" if fmt.kind == "webp" else "JPEG", "quality": fmt.quality}
        if fmt.kind == "webp":
            options["lossless"] = fmt.lossless
        if text is not None:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_CODE + text.encode("utf-16-be")
            options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class SavedImage:
    """An image in the outputs folder.

    Args:
        path: the file.
        relative: its path under the outputs folder, with `/` (what the UI and the API show).
        infotext: its A1111 parameters, if it has them.
    """

    path: Path
    relative: str
    infotext: str | None


class OutputStore:
    """The outputs folder of a session (or of the storage root when the UI runs without a session).

    Args:
        folder: the outputs folder (created on first save).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _day_folder(self) -> Path:
        return self.folder / datetime.date.today().isoformat()

    def save(
        self,
        images: list[Image.Image],
        infotexts: list[str],
        seeds: list[int],
        fmt: ImageFormat = PNG,
    ) -> list[Path]:
        """Save images with their infotexts as `<date>/<number>-<seed>.<format>`; returns the paths.

        Args:
            images: the images.
            infotexts: each image's infotext.
            seeds: each image's seed (in its file name).
            fmt: the file format (default: PNG with the infotext).
        """
        day = self._day_folder()
        day.mkdir(parents=True, exist_ok=True)
        numbers = [int(match.group(1)) for entry in day.iterdir() if (match := _NUMBERED.match(entry.name))]
        number = max(numbers, default=-1) + 1
        paths = []
        for image, infotext, seed in zip(images, infotexts, seeds, strict=True):
            path = day / f"{number:05d}-{seed}{fmt.suffix}"
            atomic_write_bytes(path, encode_image(image, infotext, fmt))
            paths.append(path)
            number += 1
        return paths

    def resolve(self, relative: str) -> Path:
        """The file `relative` names under the outputs folder; anything that leaves it is refused."""
        root = self.folder.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise NbkitError(f"{relative!r} is not an image in the outputs folder", path=self.folder)
        return path

    def list(self, limit: int = 200) -> list[SavedImage]:
        """The newest `limit` images, newest first."""
        if not self.folder.is_dir():
            return []
        files = [
            path
            for path in self.folder.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        ]
        files.sort(key=lambda path: (path.stat().st_mtime, path.name), reverse=True)
        return [
            SavedImage(path, path.relative_to(self.folder).as_posix(), read_infotext(path))
            for path in files[:limit]
        ]

    def zip_bytes(self, limit: int = 1000) -> bytes:
        """A zip of the newest `limit` images, each under its outputs-relative path."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for saved in self.list(limit):
                archive.write(saved.path, saved.relative)
        return buffer.getvalue()
