"""The VAEs a request may name: `<storage root>/vae/`, as A1111's `models/VAE` folder.

A VAE is a `.safetensors` file there, or a diffusers VAE folder (a `config.json` inside, or a pipeline
folder's `vae/`). A1111's GET /sd-vae lists them as `{model_name, filename}` (Forge's /sd-modules the
same), and a request's `sd_vae` may give the listed `model_name` instead of the path, as A1111 clients
do. Only `.safetensors` files are offered: a pickled VAE would have to be unpickled to be read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

VAE_FOLDER = "vae"
VAE_SUFFIXES = (".safetensors",)


@dataclasses.dataclass(frozen=True)
class VaeEntry:
    """A VAE on offer.

    Args:
        model_name: the file or folder name (A1111's `model_name`, what `sd_vae` may say).
        path: the file or folder.
    """

    model_name: str
    path: Path

    def to_api(self) -> dict[str, str]:
        """One item of A1111's GET /sdapi/v1/sd-vae (and Forge's /sd-modules)."""
        return {"model_name": self.model_name, "filename": str(self.path)}


def list_vaes(root: str | os.PathLike | None) -> list[VaeEntry]:
    """The VAEs in `<root>/vae/`, by name (none without a root or the folder)."""
    folder = Path(root) / VAE_FOLDER if root is not None else None
    if folder is None or not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir(), key=lambda item: item.name.lower()):
        single_file = path.is_file() and path.suffix.lower() in VAE_SUFFIXES
        folder = (path / "config.json").is_file() or (path / VAE_FOLDER / "config.json").is_file()
        if (single_file or folder) and not path.name.startswith("."):
            entries.append(VaeEntry(path.name, path))
    return entries


def vae_source(root: str | os.PathLike | None, key: str) -> str:
    """The path `sd_vae` means: a listed VAE's path for its `model_name`, else `key` as given."""
    for entry in list_vaes(root):
        if key == entry.model_name:
            return str(entry.path)
    return key
