"""Sessions: one folder per personal model, under `<storage root>/Sessions/<name>/`.

A session folder holds the subject's photos and captions, class images, checkpoints, finished models,
outputs and logs (the layout of `sessions_template/`), and `session.json`, its manifest. Every write
goes through `nbkit.fsio`, so a killed kernel or a Drive hiccup leaves the previous state; each save
keeps the previous good `session.json` as `session.json.bak`, which `Session.open` falls back to, with
a warning, when `session.json` is unreadable. Long operations hold the session's lock (`nbkit.session.lock`)
so two kernels never train into the same folder.

Listing, renaming, deleting, exporting and importing sessions live in `nbkit.session.store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.resources
import json
import os
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.env import storage_root
from nbkit.errors import NbkitError, NbkitWarning
from nbkit.families import get_family
from nbkit.fsio import atomic_directory, atomic_write_bytes, clean_temporaries, retry_io
from nbkit.models.registry import RESOLUTION_STEP, check_resolution_step
from nbkit.session.base_model import model_spec, native_resolution
from nbkit.session.lock import SessionLock, live_holder
from nbkit.session.manifest import BaseModelRef, Manifest, RunRecord, load_manifest, now_iso

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SESSIONS_DIR = "Sessions"
MANIFEST_NAME = "session.json"
BACKUP_NAME = "session.json.bak"
KINDS = ("instance_images", "captions", "class_images", "checkpoints", "models", "outputs", "logs")
MAX_NAME_LENGTH = 64
# Folder names are limited to 255 bytes; this leaves room for the prefixes of temporary names.
MAX_NAME_BYTES = 200
FORBIDDEN_NAME_CHARS = '<>:"/\\|?*'
WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL"} | {
    f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)
}
NAME_RULES = (
    f"a session name is 1 to {MAX_NAME_LENGTH} characters (at most {MAX_NAME_BYTES} bytes as UTF-8, "
    "which only emoji reach): letters, digits, spaces (stored as '_') and "
    f"punctuation except {' '.join(FORBIDDEN_NAME_CHARS)}; it may not start with '.', end with '.', "
    "contain '..' or invisible/control characters, or be a Windows device name (CON, NUL, COM1, ...)"
)


def sessions_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds all sessions: `<root>/Sessions`.

    Args:
        root: the storage root (default: `nbkit.env.storage_root()`).
    """
    return Path(root if root is not None else storage_root()) / SESSIONS_DIR


def validate_session_name(name: str) -> str:
    """Check a session name and return it normalised.

    The name is NFC-normalised and stripped, and inner spaces become `_`, as in the fast-DreamBooth
    notebook users know, so `My Dog` names the folder `My_Dog`. Everything else that a folder name on
    Google Drive, Linux, macOS and Windows cannot hold, or that would escape `Sessions/`, is refused.

    Args:
        name: the name as the user typed it.
    """
    if not isinstance(name, str):
        raise NbkitError(f"a session name must be text, got {type(name).__name__} {name!r}", fix=NAME_RULES)
    cleaned = unicodedata.normalize("NFC", name).strip()

    def refuse(why: str) -> NbkitError:
        return NbkitError(f"invalid session name {name!r}: {why}", fix=NAME_RULES)

    if not cleaned:
        raise refuse("it is empty")
    for char in cleaned:
        if unicodedata.category(char).startswith("C"):
            raise refuse(f"it contains the invisible or control character U+{ord(char):04X}")
        if char in FORBIDDEN_NAME_CHARS:
            raise refuse(f"it contains {char!r}")
    cleaned = "".join("_" if char.isspace() else char for char in cleaned)
    if len(cleaned) > MAX_NAME_LENGTH:
        raise refuse(f"it is {len(cleaned)} characters long")
    if len(cleaned.encode("utf-8")) > MAX_NAME_BYTES:
        raise refuse(f"it is {len(cleaned.encode('utf-8'))} bytes long as UTF-8")
    if cleaned.startswith("."):
        raise refuse("it starts with '.'")
    if cleaned.endswith("."):
        raise refuse("it ends with '.'")
    if ".." in cleaned:
        raise refuse("it contains '..'")
    if cleaned.split(".")[0].upper() in WINDOWS_DEVICE_NAMES:
        raise refuse(f"{cleaned.split('.')[0]!r} is a reserved device name on Windows")
    return cleaned


def session_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of session `name` (which need not exist yet)."""
    return sessions_dir(root) / validate_session_name(name)


def _template() -> Traversable:
    try:
        return importlib.resources.files("nbkit.sessions_template")
    except ModuleNotFoundError as error:
        raise NbkitError(
            "nbkit's session template (the package nbkit.sessions_template) is not installed",
            fix="reinstall nbkit (`pip install --force-reinstall nbkit`, or `pip install -e .` in a checkout)",
        ) from error


def _template_manifest(name: str) -> Manifest:
    source = _template() / MANIFEST_NAME
    data = json.loads(source.read_text(encoding="utf-8"))
    data.update(name=name, created=now_iso(), updated=now_iso())
    return load_manifest(data, where=f"session template {source}")


def _copy_layout(template: Traversable, target: Path, top: bool = True) -> None:
    for entry in template.iterdir():
        if entry.is_dir():
            if entry.name != "__pycache__":
                (target / entry.name).mkdir()
                _copy_layout(entry, target / entry.name, top=False)
        elif not top and entry.name != ".keep":  # top-level files are session.json and __init__.py
            (target / entry.name).write_bytes(entry.read_bytes())


@dataclasses.dataclass
class LoadedManifest:
    """A session's manifest as read from its folder.

    Args:
        manifest: the parsed, upgraded manifest.
        raw: `session.json`'s bytes as read (None if missing), to notice another writer before saving.
        fallback_note: set when `session.json` was unreadable and `session.json.bak` was used instead.
    """

    manifest: Manifest
    raw: bytes | None
    fallback_note: str | None = None


_RESTORE_FIX = (
    "restore session.json from Google Drive's version history (right-click it > Manage versions) or from "
    "an export (`nbkit session import`); if the folder is not an nbkit session, move it out of Sessions/"
)


def _parse(data: Any, file: Path) -> Manifest:
    if not isinstance(data, dict):
        raise NbkitError(f"holds a JSON {type(data).__name__}, not an object", path=file, fix=_RESTORE_FIX)
    return load_manifest(data, where=str(file))


def _read_json_bytes(file: Path) -> tuple[bytes | None, Any, str | None]:
    """(raw bytes or None, parsed data, why it is unusable or None)."""
    try:
        raw = retry_io(file.read_bytes, what=f"reading {file}")
    except FileNotFoundError:
        return None, None, "is missing"
    if not raw.strip():
        return raw, None, "is empty"
    try:
        return raw, json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return raw, None, f"is not valid JSON ({error})"


def read_manifest(path: Path) -> LoadedManifest:
    """Read and upgrade the manifest of the session folder `path`, falling back to `session.json.bak`."""
    file, backup = path / MANIFEST_NAME, path / BACKUP_NAME
    raw, data, problem = _read_json_bytes(file)
    if problem is None:
        return LoadedManifest(_parse(data, file), raw)
    _, backup_data, backup_problem = _read_json_bytes(backup)
    if backup_problem is not None:
        raise NbkitError(
            f"{MANIFEST_NAME} {problem}, and its previous copy {BACKUP_NAME} {backup_problem}",
            path=file,
            fix=_RESTORE_FIX,
        )
    manifest = _parse(backup_data, backup)
    note = (
        f"{file} {problem}; using its previous copy {BACKUP_NAME} (saved {manifest.updated}). "
        "Changes after that save are lost; the next save rewrites session.json"
    )
    return LoadedManifest(manifest, raw, note)


class Session:
    """An open session: its folder and its manifest.

    Make one with `Session.create` or `Session.open`; change `manifest` and call `save()`.

    Args:
        name: the session's (validated) name, which is its folder's name.
        path: the session folder.
        manifest: the parsed `session.json`.
    """

    def __init__(self, name: str, path: Path, manifest: Manifest):
        self.name = name
        self.path = Path(path)
        self.manifest = manifest
        self._on_disk: bytes | None = None

    def __repr__(self) -> str:
        return f"Session(name={self.name!r}, path='{self.path}')"

    @classmethod
    def create(
        cls,
        name: str,
        *,
        root: str | os.PathLike | None = None,
        base_model: BaseModelRef | None = None,
        resolution: int | None = None,
        exist_ok: bool = False,
    ) -> Session:
        """Make a new session folder from the template.

        Args:
            name: the session name (see `validate_session_name`; spaces become `_`).
            root: the storage root (default: `nbkit.env.storage_root()`).
            base_model: the model to train on.
            resolution: the training size (`training.resolution`); default: the base model's native size.
            exist_ok: open an existing session of that name instead of failing.
        """
        path = session_path(name, root)
        name = path.name
        if resolution is not None:
            # A size the model cannot take fails here, not at the first image import or training run.
            step = get_family(base_model.family).resolution_step if base_model else RESOLUTION_STEP
            check_resolution_step(resolution, step)
            allowed = model_spec(base_model).allowed_resolutions if base_model else None
            if allowed is not None and resolution not in allowed:
                warnings.warn(
                    f"resolution {resolution} is not one of {base_model.source}'s sizes ({allowed[0]}-{allowed[-1]} "
                    f"in steps of {allowed.step}): training will ask to force it",
                    NbkitWarning,
                    stacklevel=2,
                )
        if path.exists():
            if not (path / MANIFEST_NAME).exists() and not (path / BACKUP_NAME).exists():
                raise NbkitError(
                    f"the folder for session '{name}' exists but is not an nbkit session (no {MANIFEST_NAME})",
                    path=path,
                    fix="pick another name, or move that folder out of Sessions/",
                )
            if not exist_ok:
                raise NbkitError(
                    f"session '{name}' already exists",
                    path=path,
                    fix="open it (Session.open / `nbkit session open`), pick another name, or delete it first",
                )
            return cls._open_existing(name, path, base_model, resolution)
        manifest = _template_manifest(name)
        if base_model is not None:
            manifest.base_model = base_model
            manifest.training = manifest.training.replace(
                resolution=resolution or native_resolution(base_model),
                **get_family(base_model.family).training_defaults,
            )
        elif resolution is not None:
            manifest.training = manifest.training.replace(resolution=resolution)
        with atomic_directory(path) as tmp:
            _copy_layout(_template(), tmp)
            (tmp / MANIFEST_NAME).write_bytes(serialise_manifest(manifest))
        return cls.open(name, root=root)

    @classmethod
    def _open_existing(
        cls, name: str, path: Path, base_model: BaseModelRef | None, resolution: int | None
    ) -> Session:
        session = cls.open(name, root=path.parent.parent)
        current = session.manifest.base_model
        if base_model is not None and current is None:
            session.manifest.base_model = base_model
            session.manifest.training = session.manifest.training.replace(
                resolution=resolution or native_resolution(base_model)
            )
            session.save()
        elif base_model is not None and current != base_model:
            raise NbkitError(
                f"session '{name}' already exists with base model {current.source!r} ({current.family}), "
                f"not {base_model.source!r} ({base_model.family})",
                path=path,
                fix="use a new session name for the other base model, or delete the existing session",
            )
        return session

    @classmethod
    def open(cls, name: str, *, root: str | os.PathLike | None = None) -> Session:
        """Open an existing session, tidying up after interrupted writes.

        Args:
            name: the session name.
            root: the storage root (default: `nbkit.env.storage_root()`).
        """
        path = session_path(name, root)
        name = path.name
        if not path.is_dir():
            raise missing_session_error(name, path.parent)
        # Temporaries of a live holder may be writes in progress; only an idle session is tidied.
        if live_holder(path) is None:
            for folder in (path, path / "checkpoints", path / "models"):
                clean_temporaries(folder)
        loaded = read_manifest(path)
        if loaded.fallback_note:
            warnings.warn(loaded.fallback_note, NbkitWarning, stacklevel=2)
        manifest = loaded.manifest
        manifest.name = name  # the folder is the identity; it may have been renamed by hand
        session = cls(name, path, manifest)
        session._on_disk = loaded.raw
        return session

    def save(self) -> None:
        """Write `session.json` atomically, keeping the previous good copy as `session.json.bak`."""
        file = self.path / MANIFEST_NAME
        current, _, problem = _read_json_bytes(file)
        if current is not None and current != self._on_disk:
            raise NbkitError(
                "session.json was changed by another notebook or kernel since this session was opened",
                path=file,
                fix="reopen the session (`nbkit session open`, Session.open) to load those changes and repeat yours; "
                "stop the other notebook first if it still works on this session",
            )
        self.manifest.name = self.name
        self.manifest.updated = now_iso()
        data = serialise_manifest(self.manifest)
        if current is not None and problem is None:
            atomic_write_bytes(self.path / BACKUP_NAME, current)
        atomic_write_bytes(file, data)
        self._on_disk = data

    def dir(self, kind: str) -> Path:
        """The session's folder for `kind`, created if missing.

        Args:
            kind: one of `KINDS` (instance_images, captions, class_images, checkpoints, models, outputs, logs).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown session folder {kind!r}; allowed: {', '.join(KINDS)}")
        folder = self.path / kind
        retry_io(lambda: folder.mkdir(parents=True, exist_ok=True), what=f"creating {folder}")
        return folder

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[SessionLock]:
        """Hold the session's lock: `with session.lock("training"): ...`.

        Holding it means no other run can be going, so a run the history still calls `running` was
        killed (its kernel never closed it): it is closed as `interrupted` here.
        """
        with SessionLock(self.path, purpose) as held:
            if self.manifest.close_stale_runs():
                self.save()
            yield held

    def record_run(self, kind: str, status: str, detail: dict[str, Any] | None = None) -> RunRecord:
        """Append a finished entry to the session's history (`Manifest.record_run`) and save.

        Args:
            kind: what ran, e.g. `train`, `convert`, `import`.
            status: `ok`, `failed` or `interrupted` (or `running`).
            detail: JSON-serialisable facts about the run.
        """
        record = self.manifest.record_run(kind, status, detail)
        self.save()
        return record

    @contextlib.contextmanager
    def run_record(self, kind: str, detail: dict[str, Any] | None = None) -> Iterator[RunRecord]:
        """Record a run in the history: `running` on entry, then `ok`, `failed` or `interrupted`.

        The yielded record's `detail` may be filled in by the body; it is saved on exit.

        Args:
            kind: what runs, e.g. `train`.
            detail: JSON-serialisable facts known up front.
        """
        record = RunRecord(kind=kind, started=now_iso(), detail=dict(detail or {}))
        self.manifest.history.append(record)
        self.save()
        status = "failed"
        try:
            yield record
            status = "ok" if record.status == "running" else record.status  # the body may have said
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException as error:
            record.detail["error"] = f"{type(error).__name__}: {error}"[:1000]
            raise
        finally:
            record.status = status
            record.finished = now_iso()
            self.save()


def serialise_manifest(manifest: Manifest) -> bytes:
    # Round-trip through the strict loader so a bad in-memory value never reaches the disk.
    data = manifest.to_dict()
    Manifest.from_dict(data, where=f"session '{manifest.name}' before saving")
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def missing_session_error(name: str, folder: Path) -> NbkitError:
    known = [entry.name for entry in session_folders(folder)]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return NbkitError(
        f"there is no session named '{name}'",
        path=folder,
        fix=f"{hint}list sessions with `nbkit session list`, or create it with `nbkit session create {name}` "
        "(Python: Session.create)",
    )


def session_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name.casefold(),
    )
