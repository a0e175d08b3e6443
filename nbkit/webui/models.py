"""The checkpoints and LoRAs the web UI offers, named as A1111 names them.

Checkpoints come from: the session's exported models (`session.json`'s `models`), the registry's base
models, and single files in `<storage root>/models/`. A checkpoint's A1111 title is
`<file name> [<short hash>]`; POST `/sdapi/v1/options` and the model dropdown accept a title, a
model name or a hash. LoRAs come from the session's LoRA exports and `<storage root>/loras/`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from nbkit.errors import NbkitError
from nbkit.models.registry import MODELS

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A checkpoint the UI can load.

    Args:
        title: A1111's title: `<file name> [<hash10>]`, or the registry key for a base model.
        model_name: the name without suffix (A1111's `model_name`; the infotext's `Model`).
        filename: the file or folder (or the registry key / hub id).
        source: what `nbkit.models.loading.load_pipeline` loads.
        kind: `session` (exported by the session), `base` (the registry) or `file` (the models folder,
            a custom path or URL).
        family: `sd1`, `sd2`, `sd2-v`, `sdxl`, or None when it is only known once loaded.
        sha256: the file's sha256, when known (A1111's `sd_checkpoint_hash`).
    """

    title: str
    model_name: str
    filename: str
    source: str
    kind: Literal["session", "base", "file"]
    family: str | None = None
    sha256: str | None = None

    @property
    def hash(self) -> str | None:
        """A1111's short hash: the first 10 hex of the sha256."""
        return self.sha256[:10] if self.sha256 else None

    def to_api(self) -> dict:
        """The shape of one item of A1111's GET /sdapi/v1/sd-models."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": None,
        }


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    """A LoRA file the prompt can apply as `<lora:name:weight>`.

    Args:
        name: what `<lora:NAME:...>` refers to (the file's stem).
        path: the kohya/A1111 `.safetensors`.
        sha256: its sha256, when known.
    """

    name: str
    path: Path
    sha256: str | None = None

    def to_api(self) -> dict:
        """The shape of one item of A1111's GET /sdapi/v1/loras."""
        return {"name": self.name, "alias": self.name, "path": str(self.path), "metadata": {}}


def _title(name: str, sha256: str | None) -> str:
    return f"{name} [{sha256[:10]}]" if sha256 else name


class ModelCatalog:
    """What can be loaded, re-scanned on `refresh()`.

    Args:
        session: the session whose exports are listed (None: no session).
        storage_root: where `models/` and `loras/` folders are looked for (None: none).
        include_base_models: list the registry's base models (hub downloads at load time).
    """

    def __init__(
        self, session=None, storage_root: str | os.PathLike | None = None, *, include_base_models: bool = True
    ):
        self.session = session
        self.storage_root = Path(storage_root) if storage_root is not None else None
        self.include_base_models = include_base_models
        self._extra: list[ModelEntry] = []
        self.checkpoints: list[ModelEntry] = []
        self.loras: list[LoraEntry] = []
        self.refresh()

    def refresh(self) -> None:
        """Scan the session's `session.json` and the folders again."""
        checkpoints: list[ModelEntry] = []
        loras: list[LoraEntry] = []
        if self.session is not None:
            from nbkit.session import Session

            self.session = Session.open(self.session.name, root=self.session.path.parent.parent)
            for record in reversed(self.session.manifest.models):  # newest first
                if record.kind == "full":
                    relative = record.files.get("single_file") or record.files.get("folder")
                    path = self.session.path / relative
                    sha256 = record.sha256.get(relative)
                    checkpoints.append(
                        ModelEntry(
                            _title(Path(relative).name, sha256),
                            Path(relative).stem,
                            str(path),
                            str(path),
                            "session",
                            record.family,
                            sha256,
                        )
                    )
                elif "kohya" in record.files:
                    relative = record.files["kohya"]
                    loras.append(
                        LoraEntry(
                            Path(relative).stem, self.session.path / relative, record.sha256.get(relative)
                        )
                    )
        if self.storage_root is not None:
            for path in _files(self.storage_root / "models", CHECKPOINT_SUFFIXES):
                checkpoints.append(ModelEntry(path.name, path.stem, str(path), str(path), "file"))
            loras += [
                LoraEntry(path.stem, path) for path in _files(self.storage_root / "loras", (".safetensors",))
            ]
        if self.include_base_models:
            for spec in MODELS.values():
                checkpoints.append(
                    ModelEntry(spec.key, spec.key, spec.repo_id or spec.key, spec.key, "base", spec.family)
                )
        self.checkpoints = checkpoints + [entry for entry in self._extra if entry not in checkpoints]
        self.loras = loras

    def add(self, source: str, family: str | None = None) -> ModelEntry:
        """Offer a custom path, folder, hub id or URL; returns its entry."""
        name = Path(source.rstrip("/")).name or source
        entry = ModelEntry(name, Path(name).stem, source, source, "file", family)
        self._extra.append(entry)
        self.checkpoints.append(entry)
        return entry

    def find(self, key: str) -> ModelEntry:
        """The checkpoint a title, model name, file name or hash names (A1111's rules)."""
        key = key.strip()
        for field in ("title", "model_name", "filename", "source"):
            for entry in self.checkpoints:
                if getattr(entry, field) == key:
                    return entry
        for entry in self.checkpoints:
            if entry.sha256 and (entry.hash == key or entry.sha256 == key):
                return entry
        titles = ", ".join(entry.title for entry in self.checkpoints[:12])
        raise NbkitError(
            f"no checkpoint is called {key!r}",
            fix=f"pick one of: {titles}" if titles else "train or add a model first",
        )

    def find_lora(self, name: str) -> LoraEntry:
        for entry in self.loras:
            if entry.name == name:
                return entry
        known = ", ".join(entry.name for entry in self.loras) or "none"
        raise NbkitError(f"no LoRA is called {name!r}", fix=f"the LoRAs are: {known}")


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in suffixes and path.is_file())
