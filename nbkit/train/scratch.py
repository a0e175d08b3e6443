"""Training's local scratch folder: one per session identity, tidied when its session is gone or done.

A run copies the photos to fast local disk and stages each checkpoint there before it goes into the
session (on Drive). The folder is `local_scratch()/train/<name>-<key>`, where the key hashes the
session's resolved folder and its creation time, so two sessions of the same name under two storage
roots (or a session deleted and made again) never share one. Each folder holds `owner.json` naming
its session; at the start of a run, folders whose session no longer exists, was made again, or
finished training are removed, unless that session is locked by a live kernel (training elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from nbkit.env import local_scratch
from nbkit.fsio import TEMP_PREFIX, atomic_directory, atomic_write_json
from nbkit.session.core import MANIFEST_NAME, Session, read_manifest
from nbkit.session.lock import live_holder

OWNER_NAME = "owner.json"


def session_key(session: Session) -> str:
    """A short hash of the session's identity: its resolved folder and when it was created."""
    identity = f"{session.path.resolve()}\n{session.manifest.created}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:12]


def scratch_root() -> Path:
    return local_scratch() / "train"


def session_scratch(session: Session, *, create: bool = True) -> Path:
    """The session's scratch folder, made with its `owner.json` (so no folder is ever without one).

    Args:
        session: the open session.
        create: make the folder when it is missing.
    """
    folder = scratch_root() / f"{session.name}-{session_key(session)}"
    if create and not (folder / OWNER_NAME).is_file():
        owner = {"session": str(session.path.resolve()), "created": session.manifest.created}
        if folder.is_dir():
            atomic_write_json(folder / OWNER_NAME, owner)
        else:
            with atomic_directory(folder) as tmp:
                (tmp / OWNER_NAME).write_text(json.dumps(owner, indent=2) + "\n", encoding="utf-8")
    return folder


def stale_reason(folder: Path, current: Session | None = None) -> str | None:
    """Why the scratch `folder` can go (None when it must stay).

    Args:
        folder: a folder under `scratch_root()`.
        current: the session this process is about to train (its own folder stays, and an old
            name-only folder of the same name, from before folders were keyed, is its).
    """
    owner_file = folder / OWNER_NAME
    if not owner_file.is_file():
        if current is not None and folder.name == current.name:
            return "a scratch folder of the old name-only layout"
        return None  # not ours to judge (or being made right now)
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        session_dir = Path(owner["session"])
        created = owner["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if current is not None and folder.name == f"{current.name}-{session_key(current)}":
        return None
    if live_holder(session_dir) is not None:
        return None  # a kernel is training (or importing into) that session right now
    if not (session_dir / MANIFEST_NAME).is_file():
        return f"its session {session_dir} no longer exists"
    try:
        manifest = read_manifest(session_dir).manifest
    except Exception:  # an unreadable session.json is the user's to repair; keep the copies meanwhile
        return None
    if manifest.created != created:
        return f"its session {session_dir} was deleted and made again"
    if manifest.state.stage == "done":
        return f"its session {session_dir} finished training"
    return None


def clean_stale_scratch(current: Session | None = None) -> list[Path]:
    """Remove the scratch folders of deleted or finished sessions; returns those removed.

    Args:
        current: the session about to train, whose folder stays.
    """
    root = scratch_root()
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if (
            not folder.is_dir()
            or folder.name.startswith(TEMP_PREFIX)
            or stale_reason(folder, current) is None
        ):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
