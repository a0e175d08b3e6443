"""Operations on the collection of sessions: list, rename, delete, export to a zip, import.

An export is a zip of one session folder (`<name>/...`) without its lock file, its backup manifest and
the temporaries of interrupted writes, written atomically. An import accepts such a zip, any zip of a
session folder, or a folder; it checks every entry before extracting anything (no absolute paths, no
`..`, no links: a zip must not write outside the new session) and validates and upgrades the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import stat
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from nbkit.errors import NbkitError, NbkitWarning, SessionLockedError, setting
from nbkit.fsio import OLD_PREFIX, TEMP_PREFIX, atomic_directory, atomic_path, retry_io
from nbkit.session.core import (
    BACKUP_NAME,
    MANIFEST_NAME,
    Session,
    missing_session_error,
    read_manifest,
    serialise_manifest,
    session_folders,
    session_path,
    sessions_dir,
)
from nbkit.session.lock import LOCK_NAME, SessionLock, live_holder
from nbkit.session.manifest import Manifest, TrainingState, load_manifest

DELETED_PREFIX = f"{TEMP_PREFIX}deleted-"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Worth compressing; images, weights and checkpoints are stored as they are (deflate gains nothing).
CHECKPOINTS_DIR = "checkpoints"
COMPRESSED_SUFFIXES = {".json", ".txt", ".caption", ".csv", ".log", ".md", ".yaml", ".yml", ".toml"}


@dataclasses.dataclass
class SessionInfo:
    """One row of `list_sessions`.

    Args:
        name: the session name.
        path: its folder.
        updated: when its manifest was last saved (ISO 8601), or None if unreadable.
        size: bytes on disk.
        images: image files in `instance_images/`.
        stage: training stage (`idle`, `text_encoder`, `unet`, `done`), or None if unreadable.
        step: training step, or None if unreadable.
        base_model: the base model's source, if set.
        locked_by: who holds the session's lock, if anyone alive does.
        problem: why the manifest could not be read, if it could not.
    """

    name: str
    path: Path
    updated: str | None
    size: int
    images: int
    stage: str | None = None
    step: int | None = None
    base_model: str | None = None
    locked_by: str | None = None
    problem: str | None = None


def _folder_size(folder: Path) -> int:
    total = 0
    for directory, _, files in os.walk(folder):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, file)).st_size
    return total


def list_sessions(root: str | os.PathLike | None = None) -> list[SessionInfo]:
    """Every folder under `Sessions/`, sorted by name; unreadable ones say why in `problem`.

    Args:
        root: the storage root (default: `nbkit.env.storage_root()`).
    """
    folder = sessions_dir(root)
    if folder.is_dir():  # finish deletions a killed kernel left half done
        for leftover in folder.glob(f"{DELETED_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    rows = []
    for path in session_folders(folder):
        images = path / "instance_images"
        count = (
            sum(1 for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else 0
        )
        holder = live_holder(path)
        info = SessionInfo(path.name, path, None, _folder_size(path), count)
        info.locked_by = holder.describe() if holder else None
        try:
            manifest = read_manifest(path).manifest
        except NbkitError as error:
            info.problem = error.message
        else:
            info.updated, info.stage, info.step = manifest.updated, manifest.state.stage, manifest.state.step
            info.base_model = manifest.base_model.source if manifest.base_model else None
        rows.append(info)
    return rows


def _refuse_if_locked(path: Path, action: str) -> None:
    holder = live_holder(path)
    if holder is not None:
        raise SessionLockedError(
            f"cannot {action} session '{path.name}': it is in use by {holder.describe()}",
            path=path,
            fix=f"stop that notebook or kernel, or wait for it to finish; if you are sure nothing uses the "
            f"session, run `nbkit session unlock {path.name}`",
        )


def rename_session(old: str, new: str, root: str | os.PathLike | None = None) -> Session:
    """Rename a session (its folder and its manifest's name); returns the renamed session.

    Args:
        old: the current name.
        new: the new name (validated like any session name).
        root: the storage root (default: `nbkit.env.storage_root()`).
    """
    source = Session.open(old, root=root).path
    target = session_path(new, root)
    if target.exists() and not os.path.samefile(source, target):
        raise NbkitError(
            f"cannot rename '{source.name}' to '{target.name}': that session already exists",
            path=target,
            fix="pick another name, or delete/rename the other session first",
        )
    _refuse_if_locked(source, "rename")
    retry_io(lambda: os.rename(source, target), what=f"renaming {source}")
    session = Session.open(target.name, root=root)
    session.save()  # the manifest's name follows the folder
    return session


def delete_session(name: str, root: str | os.PathLike | None = None, *, confirm: bool) -> None:
    """Delete a session folder and everything in it.

    Args:
        name: the session name.
        root: the storage root (default: `nbkit.env.storage_root()`).
        confirm: must be True; deleting loses the photos, checkpoints and models for good.
    """
    path = session_path(name, root)
    if not confirm:
        raise NbkitError(
            f"not deleting session '{path.name}' without confirmation",
            path=path,
            fix="pass confirm=True (or `--yes` on the command line) if you really want it gone",
        )
    if not path.is_dir():
        raise missing_session_error(path.name, path.parent)
    _refuse_if_locked(path, "delete")
    # One rename makes the session vanish at once; a kill during the slow delete leaves only a
    # hidden leftover that list_sessions removes.
    doomed = path.with_name(f"{DELETED_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    retry_io(lambda: os.rename(path, doomed), what=f"deleting {path}")
    shutil.rmtree(doomed, ignore_errors=True)


def _skipped(relative: PurePosixPath) -> bool:
    """Files that never travel with a session: its lock, its backup manifest, unfinished writes."""
    if relative in (PurePosixPath(LOCK_NAME), PurePosixPath(BACKUP_NAME)):
        return True
    return any(part.startswith((TEMP_PREFIX, OLD_PREFIX)) or part == "__MACOSX" for part in relative.parts)


def _session_files(folder: Path, leave_out: tuple[str, ...] = ()) -> Iterator[tuple[Path, PurePosixPath]]:
    """(path, path relative to `folder`) of every directory and file to export, sorted, links left out.

    Args:
        folder: the session folder.
        leave_out: top-level folders not to walk into (e.g. `checkpoints`).
    """
    for directory, dirs, files in os.walk(folder):
        dirs.sort()
        base = PurePosixPath(Path(directory).relative_to(folder).as_posix())
        for name in [*dirs, *sorted(files)]:
            path, relative = Path(directory) / name, base / name
            if _skipped(relative) or (name in dirs and relative.as_posix() in leave_out):
                if name in dirs:
                    dirs.remove(name)
                continue
            if path.is_symlink():
                warnings.warn(f"{path}: not exporting a symbolic link", NbkitWarning, stacklevel=3)
                continue
            yield path, relative


@dataclasses.dataclass
class SessionExport:
    """What `export_session` wrote; usable as a path (`os.fspath`, `import_session(export)`).

    Args:
        path: the zip file.
        size: its size in bytes.
        left_out: the folders left out of it (relative to the session), with their size in bytes.
    """

    path: Path
    size: int
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:  # the path, as for any os.PathLike; `summary()` has the sizes
        return os.fspath(self.path)

    def summary(self) -> str:
        """One line for people: where the zip is, its size, and what it leaves out."""
        text = f"Exported to {self.path} ({format_size(self.size)})"
        if self.left_out:
            parts = ", ".join(f"{folder}/ ({format_size(size)})" for folder, size in self.left_out.items())
            text += f"; left out {parts}"
        return text


def format_size(size: float) -> str:
    """`512 B`, `14.2 MB`: a byte count for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _without_checkpoints(manifest: Manifest) -> Manifest:
    """The manifest of a copy that has no checkpoints: it points at none, and an unfinished run,
    which cannot be resumed without them, starts over (a finished one stays finished)."""
    # The seed stays in training.seed, so a restart repeats the run.
    done = manifest.state.stage == "done"
    state = dataclasses.replace(manifest.state, last_checkpoint=None) if done else TrainingState()
    return dataclasses.replace(manifest, state=state)


def export_session(
    name: str,
    out_zip: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    include_checkpoints: bool = True,
) -> SessionExport:
    """Write session `name` to a zip file, atomically.

    The session is locked while it is read, so a training run cannot change it half way.

    Args:
        name: the session name.
        out_zip: the zip file to write, or an existing folder to write `<name>.zip` into.
        root: the storage root (default: `nbkit.env.storage_root()`).
        overwrite: replace an existing zip of that name (otherwise it is an error).
        include_checkpoints: also export `checkpoints/` (the training state to resume from, optimizer
            included: often the larger part of a session). Without them the copy's manifest points at
            no checkpoint, and an unfinished run there starts over.

    Returns:
        The zip's path and size and what was left out (`SessionExport.summary()` says it in words).
    """
    folder = session_path(name, root)
    if not folder.is_dir():
        raise missing_session_error(folder.name, folder.parent)
    out = Path(out_zip).expanduser()
    if out.is_dir():
        out = out / f"{folder.name}.zip"
    if out.resolve().is_relative_to(folder.resolve()):
        raise NbkitError(
            "the export would be written inside the session it exports",
            path=out,
            fix="write the zip somewhere outside the session folder",
        )
    if out.exists() and not overwrite:
        raise NbkitError(
            "the export file already exists; not overwriting it",
            path=out,
            fix=f"choose another file name, or replace it with {setting('overwrite')}",
        )
    leave_out = () if include_checkpoints else (CHECKPOINTS_DIR,)
    with SessionLock(folder, "export"), atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        session = Session.open(folder.name, root=root)
        manifest = session.manifest if include_checkpoints else _without_checkpoints(session.manifest)
        for path, relative in _session_files(session.path, leave_out):
            arcname = f"{session.name}/{relative}"
            if relative == PurePosixPath(MANIFEST_NAME):
                archive.writestr(arcname, serialise_manifest(manifest), zipfile.ZIP_DEFLATED)
            elif path.is_dir():
                archive.write(path, arcname)
            else:
                compress = path.suffix.lower() in COMPRESSED_SUFFIXES
                archive.write(path, arcname, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        left_out = {
            name: _folder_size(session.path / name) for name in leave_out if (session.path / name).is_dir()
        }
    return SessionExport(out, out.stat().st_size, left_out)


def _checked_zip_entries(archive: zipfile.ZipFile, src: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Every entry with its path inside the session, refusing any that could land outside it."""
    entries = []
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        relative = PurePosixPath(name)
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in relative.parts:
            raise NbkitError(
                f"zip entry {info.filename!r} points outside the session folder; refusing to import "
                "(a zip-slip archive)",
                path=src,
                fix="import only zips made by `nbkit session export`, or zip the session folder yourself",
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise NbkitError(
                f"zip entry {info.filename!r} is a symbolic link; refusing to import",
                path=src,
                fix="zip the session folder again without links",
            )
        if relative.parts and relative.parts[0] != "__MACOSX":
            entries.append((info, relative))
    # A zip of the session folder has everything under one top folder; a zip of its contents does not.
    names = {relative for _, relative in entries}
    if PurePosixPath(MANIFEST_NAME) not in names:
        tops = {relative.parts[0] for relative in names}
        if len(tops) != 1 or PurePosixPath(*tops, MANIFEST_NAME) not in names:
            raise NbkitError(
                f"no {MANIFEST_NAME} at the top of the zip or of its one top folder; this is not a session",
                path=src,
                fix="import a zip made by `nbkit session export` (or a zip of one session folder)",
            )
        entries = [(info, PurePosixPath(*relative.parts[1:])) for info, relative in entries]
    return [(info, relative) for info, relative in entries if relative.parts]


def _check_manifest_paths(manifest: Manifest, present: set[PurePosixPath], where: str) -> None:
    """Paths in the manifest stay inside the session, and its images come with it."""
    paths = [(f"images[{i}].file", image.file) for i, image in enumerate(manifest.images)]
    if manifest.state.last_checkpoint:
        paths.append(("state.last_checkpoint", manifest.state.last_checkpoint))
    for key, value in paths:
        relative = PurePosixPath(value)
        if relative.is_absolute() or ".." in relative.parts:
            raise NbkitError(f"{key} = {value!r} points outside the session folder", path=where)
        if key.startswith("images") and relative not in present:
            raise NbkitError(
                f"{key} = {value!r} is listed in {MANIFEST_NAME} but missing from the import",
                path=where,
                fix="export the session again (`nbkit session export`), or copy the whole session folder",
            )


def _missing_checkpoint(manifest: Manifest, present: set[PurePosixPath]) -> str | None:
    """The manifest's last checkpoint when the import does not bring it (an export without checkpoints,
    or a hand-made zip), so the new session never points at a folder it does not have."""
    last = manifest.state.last_checkpoint
    if not last:
        return None
    folder = PurePosixPath(last)
    return None if any(path == folder or folder in path.parents for path in present) else last


def import_session(
    src: str | os.PathLike, *, name: str | None = None, root: str | os.PathLike | None = None
) -> Session:
    """Make a new session from an exported zip or a session folder.

    Args:
        src: a zip file (from `export_session`, or of one session folder) or a session folder.
        name: the new session's name (default: the name in its manifest); an existing session is never
            overwritten, so give a new name to import a second copy.
        root: the storage root (default: `nbkit.env.storage_root()`).
    """
    src = Path(src).expanduser()
    if src.is_dir():
        manifest = read_manifest(src).manifest
        openers = {relative: _file_opener(path) for path, relative in _session_files(src)}
        return _build(src, manifest, openers, str(src / MANIFEST_NAME), name, root)
    if not zipfile.is_zipfile(src):
        raise NbkitError(
            "is neither a session folder nor a zip file",
            path=src,
            fix="pass a zip made by `nbkit session export`, or a session folder",
        )
    with zipfile.ZipFile(src) as archive:
        entries = {relative: info for info, relative in _checked_zip_entries(archive, src)}
        manifest_entry = entries[PurePosixPath(MANIFEST_NAME)]
        where = f"{src}!{manifest_entry.filename}"
        try:
            data = json.loads(archive.read(manifest_entry).decode("utf-8"))
        except ValueError as error:
            raise NbkitError(f"{MANIFEST_NAME} is not valid JSON ({error})", path=where) from error
        if not isinstance(data, dict):
            raise NbkitError(f"{MANIFEST_NAME} holds a JSON {type(data).__name__}, not an object", path=where)
        openers = {
            relative: None if info.is_dir() else functools.partial(archive.open, info)
            for relative, info in entries.items()
            if not _skipped(relative)
        }
        return _build(src, load_manifest(data, where=where), openers, where, name, root)


def _file_opener(path: Path) -> Callable[[], BinaryIO] | None:
    return None if path.is_dir() else functools.partial(open, path, "rb")


def _build(
    src: Path,
    manifest: Manifest,
    openers: dict[PurePosixPath, Callable[[], BinaryIO] | None],
    where: str,
    name: str | None,
    root: str | os.PathLike | None,
) -> Session:
    """Write the new session from `openers` (relative path -> opens its bytes, or None for a folder)."""
    target = session_path(name if name is not None else manifest.name, root)
    if target.exists():
        raise NbkitError(
            f"a session named '{target.name}' already exists; not overwriting it",
            path=target,
            fix="import under a new name (name=... or `--name NEW`), or delete/rename the existing session first",
        )
    _check_manifest_paths(manifest, set(openers), where)
    detail = {"source": str(src)}
    missing = _missing_checkpoint(manifest, set(openers))
    if missing is not None:
        manifest = _without_checkpoints(manifest)
        detail["checkpoint_not_included"] = missing
    manifest.name = target.name
    manifest.record_run("import", "ok", detail)
    with atomic_directory(target) as tmp:
        for relative, opener in sorted(openers.items()):
            destination = tmp.joinpath(*relative.parts)
            if opener is None:
                destination.mkdir(parents=True, exist_ok=True)
            elif relative != PurePosixPath(MANIFEST_NAME):
                destination.parent.mkdir(parents=True, exist_ok=True)
                with opener() as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        (tmp / MANIFEST_NAME).write_bytes(serialise_manifest(manifest))
    return Session.open(target.name, root=root)
