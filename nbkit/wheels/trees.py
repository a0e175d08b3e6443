"""Unpacked trees: each verified wheel kept unpacked beside it, so a warm install links files instead of
inflating them.

`<wheelhouse>/unpacked/<wheel name>/` holds `files/` (the wheel's members, as unpacked from bytes whose
sha256 was the lock's) and `manifest.json`: that sha256, the wheel file's size and mtime, the
`.dist-info`, and each file's sha256, size, mtime and executable bit. A tree is written under a
temporary name and renamed into place with its manifest, so a killed unpack leaves no tree (only a
temporary folder, which `nbkit wheels prune` removes).

Before a tree is used each file is `stat`ed: a file whose size or mtime is not the manifest's is hashed
again, and one whose sha256 differs (corrupted, truncated, edited) makes the whole tree be unpacked again
from its wheel, which is checked against the lock as ever. The stamps catch damage, not intent: whoever
can write the wheelhouse could also set a file's mtime back. Trees are kept only where the wheelhouse
and the interpreter's site-packages share a filesystem (hard links); across filesystems (a wheelhouse on
Drive, site-packages on the runtime's disk) a wheel is unpacked from its zip as before: reading ~20,000
small files over Drive costs far more than reading ~100 zips, and a tree would triple the space the
wheelhouse takes there.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nbkit.fsio import TEMP_PREFIX, sha256_of
from nbkit.wheels.lockfile import Pin

UNPACKED = "unpacked"
MANIFEST = "manifest.json"
FORMAT = 1

# one file of a tree: (member name, RECORD-style `sha256=<urlsafe b64>`, size, mtime in ns, executable)
Entry = tuple[str, str, int, int, bool]


@dataclasses.dataclass(frozen=True)
class Tree:
    """A wheel's unpacked tree whose files were checked against its manifest.

    Args:
        folder: the tree (`<wheelhouse>/unpacked/<wheel name>`); its files are under `files/`.
        wheel: the wheel's file name, for messages.
        digest: the wheel's `sha256:<hex>`, one of the lock's when the tree was made.
        dist_info: the wheel's `.dist-info` folder name.
        purelib: whether the wheel's root goes to purelib (`Root-Is-Purelib: true`) or platlib.
        files: every member but RECORD and INSTALLER, in the wheel's order.
    """

    folder: Path
    wheel: str
    digest: str
    dist_info: str
    purelib: bool
    files: tuple[Entry, ...]

    def source(self, name: str) -> str:
        return f"{self.folder}/files/{name}"


def tree_of(wheel: Path) -> Path:
    """Where the unpacked tree of the wheel file `wheel` lives."""
    return wheel.parent / UNPACKED / wheel.name.removesuffix(".whl")


def same_filesystem(wheel: Path, site: Path) -> bool:
    """Whether the wheel's folder and `site` are on one filesystem, so a tree's files can be hard-linked."""
    try:
        return os.stat(wheel.parent).st_dev == os.stat(site).st_dev
    except OSError:
        return False


def remove_tree(wheel: Path) -> None:
    """Remove the tree of `wheel` (if any): renamed aside first, so no reader sees half of it.

    Best effort: where the wheelhouse cannot be written, the tree stays (and fails its check again).
    """
    tree = tree_of(wheel)
    if not tree.exists():
        return
    try:
        aside = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=tree.parent))
        with contextlib.suppress(FileNotFoundError):  # another install removed it first
            os.replace(tree, aside / tree.name)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _record_hash(hasher: hashlib._Hash) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode("ascii")


def b64_sha256(data: bytes) -> str:
    """`sha256=<urlsafe base64>` of `data`, as RECORD writes a hash."""
    return _record_hash(hashlib.sha256(data))


def _file_b64_sha256(path: str) -> str:
    return _record_hash(sha256_of(path))


def save(partial: Path, wheel: Path, digest: str, dist_info: str, purelib: bool, rows: list[Entry]) -> Tree:
    """Write the manifest of the tree unpacked into `partial`/files, then rename it into place.

    Args:
        partial: a temporary folder beside the tree (`new_partial`), holding `files/`.
        wheel: the wheel file the files were unpacked from.
        digest: the sha256 (`sha256:<hex>`) of the bytes they were unpacked from.
        dist_info: the wheel's `.dist-info` folder name.
        purelib: whether the wheel's root goes to purelib.
        rows: each file's entry; the mtime is taken here, once all are written.
    """
    files = partial / "files"
    stamped = tuple((n, h, s, os.stat(f"{files}/{n}").st_mtime_ns, x) for n, h, s, _, x in rows)
    stat = wheel.stat()
    manifest = {
        "format": FORMAT,
        "wheel": wheel.name,
        "sha256": digest,
        "wheel_stamp": [stat.st_size, stat.st_mtime_ns],
        "dist_info": dist_info,
        "purelib": purelib,
        "files": stamped,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")  # no fsync: see _write_manifest
    tree = tree_of(wheel)
    remove_tree(wheel)
    try:
        os.rename(partial, tree)
    except OSError:
        if not (tree / MANIFEST).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another install put the same tree in place first
    return Tree(tree, wheel.name, digest, dist_info, purelib, stamped)


def new_partial(wheel: Path) -> Path:
    """A new temporary folder beside the tree of `wheel`, for `save`."""
    root = wheel.parent / UNPACKED
    root.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))


def _load(wheel: Path) -> tuple[Tree, list[int], dict] | None:
    """The tree's manifest as a Tree, the wheel stamp it recorded, and the raw manifest; None if unusable."""
    folder = tree_of(wheel)
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        files = tuple((str(n), str(h), int(s), int(t), bool(x)) for n, h, s, t, x in manifest["files"])
        tree = Tree(folder, wheel.name, str(manifest["sha256"]), str(manifest["dist_info"]),
                    bool(manifest["purelib"]), files)  # fmt: skip
        if manifest["format"] != FORMAT or manifest["wheel"] != wheel.name:
            return None
        return tree, list(manifest["wheel_stamp"]), manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe(name: str) -> bool:
    parts = name.split("/")
    return not (name.startswith("/") or "\\" in name or ".." in parts or "" in parts or ":" in parts[0])


def checked(wheel: Path, pin: Pin, log: Callable[[str], None]) -> Tree | None:
    """The tree of `wheel` when it was unpacked from bytes the lock allows for `pin` and every file is
    still as it was unpacked; otherwise None (a damaged tree is removed, saying so).

    A file is hashed only when its size or mtime differs from the manifest's; if its hash still
    matches, the manifest takes the new mtime, so the next install need not hash it again.

    Args:
        wheel: the wheel file (its tree is `tree_of(wheel)`).
        pin: the lock's pin it is installed for.
        log: where messages go.
    """
    loaded = _load(wheel)
    if loaded is None:
        if tree_of(wheel).exists():
            remove_tree(wheel)  # unreadable, of another format, or half-removed: unpacked again
        return None
    tree, stamp, manifest = loaded
    try:
        stat = wheel.stat()
    except OSError:
        return None
    if tree.digest not in pin.hashes or stamp != [stat.st_size, stat.st_mtime_ns]:
        remove_tree(wheel)  # the wheel was replaced or the lock changed: the wheel is checked again
        return None
    restamped = []
    for index, (name, digest, size, mtime, _) in enumerate(tree.files):
        path = tree.source(name)
        try:
            if not _safe(name):
                raise ValueError(name)
            file = os.stat(path)
            if file.st_size == size and file.st_mtime_ns == mtime:
                continue
            if file.st_size == size and _file_b64_sha256(path) == digest:
                restamped.append((index, file.st_mtime_ns))  # touched or copied, not changed
                continue
        except (OSError, ValueError):
            pass
        log(
            f"nbkit wheels: {path} is not the file unpacked from {wheel.name} (its size or sha256 changed: "
            f"corrupted, truncated or edited); unpacking {wheel.name} again"
        )
        remove_tree(wheel)
        return None
    if restamped:
        for index, mtime in restamped:
            manifest["files"][index][3] = mtime
        with contextlib.suppress(OSError):  # a read-only wheelhouse: the hashes are checked again next time
            _write_manifest(tree.folder, manifest)
    return tree


def _write_manifest(folder: Path, manifest: dict) -> None:
    # renamed over the old one; not fsynced: a manifest or file lost to a crash only fails a stamp, and
    # the tree is unpacked again
    partial = folder / f"{TEMP_PREFIX}{MANIFEST}"
    partial.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(partial, folder / MANIFEST)
