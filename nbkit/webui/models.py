"""The checkpoints and LoRAs the web UI offers, named as A1111 names them.

Checkpoints come from: the session's exported models (`session.json`'s `models`), the registry's base
models, and single files in `<storage root>/models/`. A checkpoint's A1111 title is
`<file name> [<short hash>]`; POST `/sdapi/v1/options` and the model dropdown accept a title, a
model name or a hash. Diffusers folders (a `model_index.json` inside: FLUX.1 ships as one) in
`<storage root>/models/` are offered too, titled by the folder's name, with the family their configs
name. LoRAs come from the session's LoRA exports and `<storage root>/loras/`.

The files of the models and loras folders are hashed once: their sha256 is kept in a small
`.nbkit-hashes.json` beside them, keyed by name, size and modification time, so a refresh re-hashes
only new or changed files (a 7 GB checkpoint on Drive takes a minute to hash).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Literal

from nbkit.errors import NbkitError
from nbkit.families import get_family
from nbkit.fsio import atomic_write_json, read_json
from nbkit.models.registry import MODELS

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HASH_CACHE = ".nbkit-hashes.json"


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
        family: the registry name of its family (`nbkit.families`), or None when it is only known
            once loaded.
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

    `path` is the file A1111, ComfyUI and Civitai know (the kohya `.safetensors` users share): the API
    lists it and the infotext's `Lora hashes` hashes it. `load_path` is the file diffusers loads; it is
    another one only for a session's FLUX.1 LoRA, whose kohya/ComfyUI file diffusers cannot read at
    every model width, while the session's diffusers file of the same weights it reads exactly.

    Args:
        name: what `<lora:NAME:...>` refers to (the kohya file's stem).
        path: the kohya/A1111 `.safetensors`.
        sha256: its sha256, when known.
        load_path: the file to load (None: `path`).
    """

    name: str
    path: Path
    sha256: str | None = None
    load_path: Path | None = None

    @property
    def file_to_load(self) -> Path:
        """The file `load_lora_weights` reads."""
        return self.load_path if self.load_path is not None else self.path

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
            from nbkit.session.core import Session

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
                    # Named, listed and hashed as A1111 does: by the kohya file. FLUX.1 loads the
                    # session's diffusers file of the same weights (see `LoraEntry`).
                    from_diffusers = get_family(record.family).session_lora_from_diffusers
                    loaded = record.files.get("diffusers") if from_diffusers else None
                    loras.append(
                        LoraEntry(
                            Path(relative).stem,
                            self.session.path / relative,
                            record.sha256.get(relative),
                            self.session.path / loaded if loaded else None,
                        )
                    )
                    # The model the LoRA was trained on comes first, so the UI opens on it.
                    if all(entry.source != record.base_model for entry in checkpoints):
                        checkpoints.append(_base_entry(record.base_model, record.family))
        if self.storage_root is not None:
            models = _files(self.storage_root / "models", CHECKPOINT_SUFFIXES)
            for path, sha256 in zip(models, file_hashes(models), strict=True):
                checkpoints.append(
                    ModelEntry(
                        _title(path.name, sha256), path.stem, str(path), str(path), "file", None, sha256
                    )
                )
            for folder in _pipeline_folders(self.storage_root / "models"):
                checkpoints.append(
                    ModelEntry(
                        folder.name, folder.name, str(folder), str(folder), "file", folder_family(folder)
                    )
                )
            lora_files = _files(self.storage_root / "loras", (".safetensors",))
            loras += [
                LoraEntry(path.stem, path, sha256)
                for path, sha256 in zip(lora_files, file_hashes(lora_files), strict=True)
            ]
        if self.include_base_models:
            for spec in MODELS.values():
                if all(entry.source != spec.key for entry in checkpoints):
                    checkpoints.append(
                        ModelEntry(
                            spec.key, spec.key, spec.repo_id or spec.key, spec.key, "base", spec.family
                        )
                    )
        self.checkpoints = checkpoints + [entry for entry in self._extra if entry not in checkpoints]
        self.loras = loras

    def add(self, source: str, family: str | None = None) -> ModelEntry:
        """Offer a custom path, folder, hub id or URL; returns its entry (a local file gets its hash)."""
        name = Path(source.rstrip("/")).name or source
        path = Path(source).expanduser()
        sha256 = None
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            from nbkit.convert.hashes import model_hashes

            sha256 = model_hashes(path)[0]
        entry = ModelEntry(_title(name, sha256), Path(name).stem, source, source, "file", family, sha256)
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


def _base_entry(source: str, family: str) -> ModelEntry:
    """The base model a session's LoRA is applied on, as a checkpoint of the session."""
    spec = MODELS.get(source)
    filename = spec.repo_id or spec.key if spec is not None else source
    name = spec.key if spec is not None else Path(source.rstrip("/")).name or source
    return ModelEntry(name, name, filename, source, "session", family)


def file_hashes(paths: list[Path]) -> list[str | None]:
    """The sha256 of each file, from the `.nbkit-hashes.json` beside it when the file is unchanged.

    New or changed files are hashed and the cache rewritten (atomically); a folder that cannot be
    written (read-only) still gets its hashes, only not cached.

    Args:
        paths: files, any number of folders.
    """
    from nbkit.convert.hashes import model_hashes

    result: list[str | None] = []
    caches: dict[Path, dict] = {}
    changed: set[Path] = set()
    for path in paths:
        folder = path.parent
        if folder not in caches:
            try:
                cache = read_json(folder / HASH_CACHE)
            except (OSError, ValueError, NbkitError):
                cache = {}
            caches[folder] = cache if isinstance(cache, dict) else {}
        stat = path.stat()
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = caches[folder].get(path.name)
        if isinstance(known, dict) and all(known.get(k) == v for k, v in key.items()) and known.get("sha256"):
            result.append(known["sha256"])
            continue
        sha256 = model_hashes(path)[0]
        caches[folder][path.name] = {**key, "sha256": sha256}
        changed.add(folder)
        result.append(sha256)
    for folder in changed:
        with contextlib.suppress(OSError):  # a read-only folder: hashed again next time
            atomic_write_json(folder / HASH_CACHE, caches[folder])
    return result


def _pipeline_folders(folder: Path) -> list[Path]:
    """The diffusers pipeline folders in `folder` (those with a `model_index.json`)."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if (path / "model_index.json").is_file())


def folder_family(source: str | os.PathLike) -> str | None:
    """The family a diffusers folder's configs name, or None (a file, a hub id, an unreadable folder)."""
    from nbkit.families import detect_family_from_config

    folder = Path(source).expanduser()
    if not (folder / "model_index.json").is_file():
        return None
    try:
        return detect_family_from_config(folder).family
    except NbkitError:
        return None


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in suffixes and path.is_file())
