"""Where generated images go: `outputs/<date>/<number>-<seed>.png`, as A1111 names them.

Each PNG carries A1111's `parameters` text chunk, so PNG Info (ours or A1111's) reads how it was made.
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

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.infotext import read_infotext, save_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_NUMBERED = re.compile(r"^(\d{5,})-")


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

    def save(self, images: list[Image.Image], infotexts: list[str], seeds: list[int]) -> list[Path]:
        """Save images with their infotexts as `<date>/<number>-<seed>.png`; returns the paths."""
        day = self._day_folder()
        day.mkdir(parents=True, exist_ok=True)
        numbers = [int(match.group(1)) for entry in day.iterdir() if (match := _NUMBERED.match(entry.name))]
        number = max(numbers, default=-1) + 1
        paths = []
        for image, infotext, seed in zip(images, infotexts, seeds, strict=True):
            path = day / f"{number:05d}-{seed}.png"
            save_image(image, path, infotext)
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
