"""Install verified wheels by unpacking them: no pip, no uv, nothing from PATH.

A wheel is a zip whose layout says where each file goes (PEP 427/491): the files are written into the
target interpreter's scheme (`sysconfig.get_paths()` of that interpreter), `*.data/scripts` get the
target's shebang, console and GUI entry points get pip's launcher script, and `INSTALLER` and `RECORD`
are written last, so a package whose files did not all land is not installed (and its files are
removed). Nothing in a wheel is run: no setup script, no byte-compiling (Python compiles on first
import). The bytes unpacked are the bytes whose sha256 was checked against the lock, read once into
memory; a wheel bigger than `MAX_WHEEL`, or one that unpacks to more than `MAX_UNPACKED` or names a path
outside its folder, is refused.

Where the wheelhouse and site-packages share a filesystem, each wheel is also kept unpacked in the
wheelhouse (`nbkit.wheels.trees`), and a warm install hard-links those files instead of inflating the
zip again: the time of creating the links, not of writing the bytes.
"""

from __future__ import annotations

import configparser
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from packaging.utils import canonicalize_name

from nbkit.errors import NbkitError
from nbkit.fsio import DISK_FULL_ERRNOS, disk_full_error, retry_io
from nbkit.wheels.house import refuse, run_quiet
from nbkit.wheels.lockfile import Pin
from nbkit.wheels.profiles import python_json
from nbkit.wheels.trees import Entry, Tree, b64_sha256, checked, new_partial, same_filesystem, save

MAX_WHEEL = 2 << 30  # bytes of one wheel file
MAX_UNPACKED = 8 << 30  # bytes one wheel may unpack to
MAX_MEMBERS = 200_000
SMALL_DEFLATED = 64 << 10  # compressed bytes inflated in one call (at most ~66 MB out)
SCHEME_KEYS = ("purelib", "platlib", "scripts", "data", "headers")
INSTALLER = "nbkit"
LAUNCHER = """\
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {head}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""
_SCHEME_CODE = (
    "import json, sys, sysconfig; p = sysconfig.get_paths(); "
    "print(json.dumps({**p, 'python': sys.executable, 'version': '%d.%d' % sys.version_info[:2]}))"
)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Where an interpreter's packages go.

    Args:
        purelib: pure-Python packages (site-packages).
        platlib: packages with compiled code (the same folder in a venv and on Colab).
        scripts: console scripts (`bin/`).
        data: the prefix `*.data/data` files go under.
        headers: where `*.data/headers` files go.
        python: the interpreter, for scripts' shebangs.
    """

    purelib: Path
    platlib: Path
    scripts: Path
    data: Path
    headers: Path
    python: str

    def path(self, key: str) -> Path:
        return getattr(self, key)

    def site_dirs(self) -> list[Path]:
        return list(dict.fromkeys([self.purelib, self.platlib]))


def target_scheme(python: str) -> Scheme:
    """The install scheme of `python` (this interpreter in-process, another one in a subprocess).

    Args:
        python: the interpreter to install into.
    """
    if Path(python) == Path(sys.executable):
        import sysconfig

        paths = {**sysconfig.get_paths(), "python": sys.executable}
        paths["version"] = f"{sys.version_info.major}.{sys.version_info.minor}"
    else:
        paths = python_json(python, ["-c", _SCHEME_CODE], "read the install folders of")
    data = Path(paths["data"])
    return Scheme(
        purelib=Path(paths["purelib"]),
        platlib=Path(paths["platlib"]),
        scripts=Path(paths["scripts"]),
        data=data,
        headers=data / "include" / "site" / f"python{paths['version']}",
        python=paths["python"],
    )


def _shebang(python: str) -> bytes:
    # pip's rule: a path with spaces, or too long for the kernel, goes through /bin/sh
    if " " in python or len(python) > 127:
        return f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\n".encode()
    return f"#!{python}\n".encode()


def _inside(base: str, relative: str, wheel: str) -> str:
    """`base/relative`, refusing a path that could land outside `base`."""
    parts = relative.split("/")
    if relative.startswith("/") or "\\" in relative or ".." in parts or "" in parts[:-1] or ":" in parts[0]:
        raise NbkitError(
            f"{wheel} names a file outside its install folder ({relative!r}); refused",
            fix="remove the wheel from the wheelhouse and regenerate the lock from a trusted registry",
        )
    return f"{base}/{relative}"


def _dist_info(archive: zipfile.ZipFile, wheel: str) -> str:
    tops = {name.split("/", 1)[0] for name in archive.namelist()}
    found = [top for top in tops if top.endswith(".dist-info") and f"{top}/WHEEL" in archive.NameToInfo]
    if len(found) != 1:
        raise NbkitError(
            f"{wheel} is not a wheel ({len(found)} .dist-info folders with a WHEEL file)",
            fix="remove it from the wheelhouse; it is fetched again",
        )
    return found[0]


def _entry_points(text: str) -> list[tuple[str, str]]:
    """(script name, `module:attr`) of the console and GUI scripts of an `entry_points.txt`."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]  # names are case-sensitive
    parser.read_string(text)
    found = []
    for section in ("console_scripts", "gui_scripts"):
        if parser.has_section(section):
            found += [(name.strip(), value.split("[", 1)[0].strip()) for name, value in parser.items(section)]
    return found


def _launcher(python: str, target: str) -> bytes:
    module, _, attr = target.partition(":")
    if not re.fullmatch(r"[\w.]+", module) or not re.fullmatch(r"[\w.]+", attr):
        raise NbkitError(f"the entry point {target!r} is not module:attr", fix="remove the wheel")
    head = attr.split(".", 1)[0]
    return _shebang(python) + LAUNCHER.format(module=module, head=head, call=attr).encode()


_T = TypeVar("_T")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# a hard link refused by where it would go (another filesystem, no links there, too many): copied instead
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}


class _Writer:
    """Writes one wheel's files, remembering them (for RECORD, and to remove them on failure).

    Paths are plain strings here: this runs once per file, tens of thousands of times per install.
    """

    def __init__(self, root: str):
        self.root = root
        self.rows: list[tuple[str, str, str]] = []
        self.written: list[str] = []
        self.made: set[str] = set()

    def _create(self, path: str, make: Callable[[], _T]) -> _T:
        """`make()`, which creates the file `path`: its folder made first, or an old file unlinked."""
        parent = os.path.dirname(path)
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        try:
            made = make()
        except FileExistsError:
            # never rewrite a file in place: a running process may have it mapped (a .so)
            os.unlink(path)
            made = make()
        except FileNotFoundError:
            # the folder was removed as empty while an older version of another package went
            os.makedirs(parent, exist_ok=True)
            made = make()
        self.written.append(path)
        return made

    def write(
        self, path: str, data: bytes, executable: bool, digest: str | None = None, record: str = ""
    ) -> None:
        """Write `data` to `path` (a new file) and list it in RECORD (as `record`, default relative to root)."""
        handle = self._create(path, lambda: os.open(path, _CREATE, 0o755 if executable else 0o644))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
        finally:
            os.close(handle)
        if executable:
            os.chmod(path, 0o755)  # the umask may have taken bits off
        name = record or os.path.relpath(path, self.root)
        self.rows.append((name, digest or b64_sha256(data), str(len(data))))

    def link(self, source: str, path: str, entry: Entry, record: str = "") -> None:
        """Hard-link `source` (a tree's file, `entry` its manifest row) as `path` and list it in RECORD;
        copied where a link is refused."""
        try:
            self._create(path, lambda: os.link(source, path))
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            with open(source, "rb") as handle:
                data = handle.read()
            self.write(path, data, entry[4], entry[1], record)
            return
        self.rows.append((record or os.path.relpath(path, self.root), entry[1], str(entry[2])))

    def remove_all(self) -> None:
        for path in reversed(self.written):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _member(data: memoryview, info: zipfile.ZipInfo, archive: zipfile.ZipFile) -> bytes:
    """The bytes of one member: deflated and stored ones inflated straight from `data`, bounded by
    the declared size (no CRC: the whole wheel's sha256 is the lock's); any other kind through zipfile."""
    if info.compress_type not in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED) or info.flag_bits & 1:
        return archive.read(info)
    offset = info.header_offset
    if bytes(data[offset : offset + 4]) != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    start = offset + 30 + int.from_bytes(data[offset + 26 : offset + 28], "little")
    start += int.from_bytes(data[offset + 28 : offset + 30], "little")
    raw = data[start : start + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        content = bytes(raw)
    elif len(raw) <= SMALL_DEFLATED:
        # deflate inflates at most ~1032:1, so this output is bounded; one call, one allocation
        content = zlib.decompress(raw, -15, max(info.file_size, 1))
    else:
        content = zlib.decompressobj(-15).decompress(raw, info.file_size + 1)
    if len(content) != info.file_size:
        raise zipfile.BadZipFile(f"{info.filename} does not unpack to its declared size")
    return content


def _record_hashes(archive: zipfile.ZipFile, dist_info: str) -> dict[str, str]:
    name = f"{dist_info}/RECORD"
    text = archive.read(name).decode("utf-8") if name in archive.NameToInfo else ""
    return {row[0]: row[1] for row in csv.reader(io.StringIO(text)) if len(row) >= 2 and row[1]}


def _check_sizes(archive: zipfile.ZipFile, wheel: str) -> None:
    infos = archive.infolist()
    total = sum(info.file_size for info in infos)
    if len(infos) > MAX_MEMBERS or total > MAX_UNPACKED:
        raise NbkitError(
            f"{wheel} unpacks to {total} bytes in {len(infos)} files, over nbkit's bound "
            f"({MAX_UNPACKED} bytes, {MAX_MEMBERS} files); refused",
            fix="remove the wheel from the wheelhouse and check the lock",
        )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One wheel's folders: its `.dist-info`, `.data`, and the site folder its root goes to."""

    wheel: str
    dist_info: str
    data_dir: str
    root: str
    scheme: Scheme

    @classmethod
    def of(cls, wheel: str, dist_info: str, purelib: bool, scheme: Scheme) -> _Layout:
        root = scheme.purelib if purelib else scheme.platlib
        return cls(wheel, dist_info, dist_info[: -len(".dist-info")] + ".data", str(root), scheme)


def _is_purelib(archive: zipfile.ZipFile, dist_info: str) -> bool:
    meta = archive.read(f"{dist_info}/WHEEL").decode("utf-8", "replace")
    return bool(re.search(r"(?mi)^Root-Is-Purelib:\s*true\s*$", meta))


def _place_data(layout: _Layout, name: str) -> tuple[str, bool]:
    """Where a `*.data/KEY/...` member goes, and whether it is a script (its shebang rewritten)."""
    _, key, rest = [*name.split("/", 2), "", ""][:3]
    if key not in SCHEME_KEYS or not rest:
        raise NbkitError(f"{layout.wheel} has an unknown data folder {key!r}", fix="remove the wheel")
    base = layout.scheme.path(key)
    if key == "headers":
        base = base / canonicalize_name(layout.dist_info.split("-", 1)[0])
    return _inside(str(base), rest, layout.wheel), key == "scripts"


def _script(layout: _Layout, content: bytes) -> bytes:
    if content.startswith((b"#!python", b"#!pythonw")):
        return _shebang(layout.scheme.python) + content.split(b"\n", 1)[-1]
    return content


def _members(archive: zipfile.ZipFile, data: memoryview, dist_info: str) -> Iterator[tuple[str, bytes, bool]]:
    """Each file member but RECORD and INSTALLER (written anew): name, content, executable."""
    skip = {f"{dist_info}/RECORD", f"{dist_info}/INSTALLER"}
    for info in archive.infolist():
        name = info.filename
        if not name.endswith("/") and name not in skip:
            yield name, _member(data, info, archive), bool((info.external_attr >> 16) & 0o111)


def _write_members(archive: zipfile.ZipFile, data: memoryview, layout: _Layout, writer: _Writer) -> None:
    hashes = _record_hashes(archive, layout.dist_info)
    data_prefix = f"{layout.data_dir}/"
    for name, content, executable in _members(archive, data, layout.dist_info):
        if name.startswith(data_prefix):
            path, script = _place_data(layout, name)
            writer.write(path, _script(layout, content) if script else content, script or executable)
        else:
            path = _inside(layout.root, name, layout.wheel)
            writer.write(path, content, executable, hashes.get(name), record=name)


def _write_metadata(layout: _Layout, entry_points: str | None, writer: _Writer) -> None:
    """The entry points' launchers, then INSTALLER, then RECORD (last: it makes the package installed)."""
    for script, target in _entry_points(entry_points or ""):
        launcher = _launcher(layout.scheme.python, target)
        writer.write(_inside(str(layout.scheme.scripts), script, layout.wheel), launcher, True)
    root, dist_info = layout.root, layout.dist_info
    writer.write(_inside(root, f"{dist_info}/INSTALLER", layout.wheel), f"{INSTALLER}\n".encode(), False)
    record = _inside(root, f"{dist_info}/RECORD", layout.wheel)
    lines = io.StringIO()
    csv.writer(lines, lineterminator="\n").writerows([*writer.rows, (os.path.relpath(record, root), "", "")])
    writer.write(record, lines.getvalue().encode("utf-8"), False, "")


def _open_wheel(data: bytes, wheel: str) -> tuple[zipfile.ZipFile, str]:
    """The wheel's archive (its sizes checked against nbkit's bounds) and its `.dist-info`."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    _check_sizes(archive, wheel)
    return archive, _dist_info(archive, wheel)


def unpack_wheel(data: bytes, wheel: str, scheme: Scheme) -> str:
    """Install the wheel whose bytes are `data` (already hash-checked) into `scheme`; returns its dist-info.

    On any failure the files written so far are removed and the error is raised.

    Args:
        data: the wheel file's bytes.
        wheel: its file name, for messages.
        scheme: where to install (`target_scheme`).
    """
    archive, dist_info = _open_wheel(data, wheel)
    layout = _Layout.of(wheel, dist_info, _is_purelib(archive, dist_info), scheme)
    writer = _Writer(layout.root)
    try:
        _write_members(archive, memoryview(data), layout, writer)
        entry_points = f"{dist_info}/entry_points.txt"
        text = archive.read(entry_points).decode("utf-8") if entry_points in archive.NameToInfo else None
        _write_metadata(layout, text, writer)
    except BaseException:
        writer.remove_all()
        raise
    return layout.dist_info


def fill_tree(data: bytes, wheel: Path, digest: str) -> Tree:
    """Unpack the wheel whose bytes are `data` (their sha256 `digest`, one of the lock's) into its tree
    in the wheelhouse (`nbkit.wheels.trees`), replacing any; returns the tree.

    The same paths are refused as by `unpack_wheel`; on any failure nothing is left.

    Args:
        data: the wheel file's bytes.
        wheel: the wheel file.
        digest: their `sha256:<hex>`.
    """
    archive, dist_info = _open_wheel(data, wheel.name)
    purelib = _is_purelib(archive, dist_info)
    partial = new_partial(wheel)
    try:
        files = f"{partial}/files"
        writer = _Writer(files)
        rows: list[Entry] = []
        for name, content, executable in _members(archive, memoryview(data), dist_info):
            # each file's own hash, for checking it later (a wheel's RECORD may lack some, or be wrong)
            writer.write(_inside(files, name, wheel.name), content, executable, record=name)
            rows.append((name, writer.rows[-1][1], len(content), 0, executable))
        return save(partial, wheel, digest, dist_info, purelib, rows)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def place_tree(tree: Tree, scheme: Scheme) -> str:
    """Install a checked tree into `scheme` by hard-linking its files (copied across filesystems),
    scripts and launchers written with the target's shebang; returns its dist-info.

    On any failure the files placed so far are removed and the error is raised.

    Args:
        tree: the tree (`nbkit.wheels.trees.checked` or `fill_tree`).
        scheme: where to install (`target_scheme`).
    """
    layout = _Layout.of(tree.wheel, tree.dist_info, tree.purelib, scheme)
    writer = _Writer(layout.root)
    data_prefix = f"{layout.data_dir}/"
    entry_points = None
    try:
        for entry in tree.files:
            name, source = entry[0], tree.source(entry[0])
            if name.startswith(data_prefix):
                path, script = _place_data(layout, name)
                if script:
                    with open(source, "rb") as handle:
                        writer.write(path, _script(layout, handle.read()), True)
                else:
                    writer.link(source, path, entry)
            else:
                writer.link(source, _inside(layout.root, name, layout.wheel), entry, record=name)
                if name == f"{tree.dist_info}/entry_points.txt":
                    with open(source, encoding="utf-8") as handle:
                        entry_points = handle.read()
        _write_metadata(layout, entry_points, writer)
    except BaseException:
        writer.remove_all()
        raise
    return layout.dist_info


def installed_metadata(scheme: Scheme) -> dict[str, list[Path]]:
    """Canonical name -> its `.dist-info`/`.egg-info` entries in the scheme's site folders."""
    found: dict[str, list[Path]] = {}
    for site in scheme.site_dirs():
        if not site.is_dir():
            continue
        for entry in os.scandir(site):
            if entry.name.endswith((".dist-info", ".egg-info")):
                name = canonicalize_name(entry.name.rsplit(".", 1)[0].split("-", 1)[0])
                found.setdefault(name, []).append(Path(entry.path))
    return found


def remove_installed(entries: Iterable[Path], scheme: Scheme) -> bool:
    """Remove a distribution by its RECORD; False (nothing removed) when one of `entries` has no RECORD.

    Only files inside the scheme's folders are removed, and folders left empty (or holding only
    `__pycache__`) after them.

    Args:
        entries: the distribution's `.dist-info` folders (`installed_metadata`).
        scheme: the interpreter's scheme.
    """
    entries = list(entries)
    if any(not (entry / "RECORD").is_file() for entry in entries):
        return False
    roots = [Path(os.path.abspath(path)) for path in (*scheme.site_dirs(), scheme.scripts, scheme.data)]
    touched: set[Path] = set()
    for entry in entries:
        with open(entry / "RECORD", encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
        for row in rows:
            if not row or not row[0]:
                continue
            path = Path(os.path.abspath(entry.parent / row[0]))
            if not any(path.is_relative_to(root) for root in roots) or path.is_dir():
                continue
            path.unlink(missing_ok=True)
            touched.add(path.parent)
        shutil.rmtree(entry, ignore_errors=True)
    for folder in sorted(touched, key=lambda path: len(path.parts), reverse=True):
        _remove_if_empty(folder, roots)
    return True


def _remove_if_empty(folder: Path, roots: list[Path]) -> None:
    while folder not in roots and any(folder.is_relative_to(root) for root in roots):
        try:
            left = {entry.name for entry in os.scandir(folder)}
        except FileNotFoundError:
            return
        if left - {"__pycache__"}:
            return
        shutil.rmtree(folder / "__pycache__", ignore_errors=True)
        try:
            os.rmdir(folder)  # fails when another wheel has just written into it: then it stays
        except OSError:
            return
        folder = folder.parent


def _read_checked(path: Path, pin: Pin, log: Callable[[str], None]) -> tuple[bytes, str] | None:
    """The bytes of `path` and their `sha256:<hex>` when it is one of `pin`'s; otherwise None (the file
    removed, saying so)."""
    size = path.stat().st_size
    if size > MAX_WHEEL:
        raise NbkitError(f"{path} is {size} bytes, over nbkit's bound of {MAX_WHEEL}", path=path,
                         fix="remove it from the wheelhouse and check the lock")  # fmt: skip
    data = retry_io(path.read_bytes, what=f"reading {path.name}")
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if digest in pin.hashes:
        return data, digest
    refuse(path, digest, pin, log)
    return None


def _kept_tree(data: bytes, path: Path, digest: str, log: Callable[[str], None]) -> Tree | None:
    """`fill_tree`, or None (said) when the wheelhouse cannot hold the tree: the wheel is unpacked instead."""
    try:
        return fill_tree(data, path, digest)
    except OSError as error:
        log(f"nbkit wheels: could not keep {path.name} unpacked in the wheelhouse ({error}); "
            "installing it from the wheel")  # fmt: skip
        return None


def keep_tree(path: Path, pin: Pin, log: Callable[[str], None] = print) -> bool:
    """Give the wheel `path` a checked unpacked tree (`nbkit.wheels.trees`), unpacking it when it has
    none or a damaged one; False when the wheel does not match the lock (removed, saying so) or the
    wheelhouse cannot hold the tree (said).

    Args:
        path: the wheel file.
        pin: the lock's pin it is for.
        log: where messages go.
    """
    if checked(path, pin, log) is not None:
        return True
    found = _read_checked(path, pin, log)
    return found is not None and _kept_tree(found[0], path, found[1], log) is not None


def _replace(
    path: Path, scheme: Scheme, present: dict[str, list[Path]], python: str, tree: Tree | None, data: bytes
) -> None:
    """Remove the installed version of the wheel's package (if any), then place its tree (when there is
    one) or unpack the wheel's bytes."""
    name = canonicalize_name(path.name.split("-", 1)[0])
    if name in present and not remove_installed(present[name], scheme):
        _pip_uninstall(python, [name])  # installed without a RECORD (an old .egg-info)
    try:
        if tree is not None:
            place_tree(tree, scheme)
        else:
            unpack_wheel(data, path.name, scheme)
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(scheme.purelib, error=error, what=f"installing {path.name}",
                                  then="run the install again") from error  # fmt: skip
        raise NbkitError(
            f"installing {path.name} into {scheme.purelib} failed: {error}",
            path=scheme.purelib,
            fix="check that the folder is writable (a venv you own, or run as the runtime's user)",
        ) from error


def default_workers() -> int:
    """Threads that unpack, hash and link wheels at once: the CPU count, 2 to 8 (the work releases
    the GIL)."""
    return min(8, max(2, os.cpu_count() or 2))


def install_wheels(
    wheels: Sequence[tuple[Pin, Sequence[Path]]],
    python: str,
    *,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> list[Pin]:
    """Install each pin from the first of its wheel files whose sha256 is the lock's, replacing other
    versions; returns the pins none of whose files matched (those files removed, saying so).

    Where the wheelhouse shares a filesystem with the interpreter's site-packages, a wheel is installed
    by hard-linking the files of its unpacked tree (`nbkit.wheels.trees`), unpacked from the wheel first
    when it has none or a damaged one; elsewhere it is unpacked from the wheel. Each wheel is read once:
    the bytes checked are the bytes unpacked. A package's installed version is removed only once its new
    wheel (or tree) has been checked, so a refused one leaves it as it was. Several wheels are installed
    at a time (unzipping, hashing, linking and writing release the GIL).

    Args:
        wheels: each pin with its candidate wheel files.
        python: the interpreter to install into.
        workers: threads (default: the CPU count, 2 to 8).
        log: where messages go.
    """
    scheme = target_scheme(python)
    present = installed_metadata(scheme)

    def one(pin: Pin, paths: Sequence[Path]) -> bool:
        for path in paths:
            linked = same_filesystem(path, scheme.purelib)
            tree, data = (checked(path, pin, log) if linked else None), b""
            if tree is None:
                found = _read_checked(path, pin, log)
                if found is None:
                    continue
                data, digest = found
                tree = _kept_tree(data, path, digest, log) if linked else None
            _replace(path, scheme, present, python, tree, data)
            return True
        return False

    workers = workers or default_workers()
    # biggest first, so the long ones start early
    ordered = sorted(
        wheels, key=lambda item: max((p.stat().st_size for p in item[1]), default=0), reverse=True
    )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(pin, pool.submit(one, pin, paths)) for pin, paths in ordered]
        return [pin for pin, future in futures if not future.result()]


def _pip_uninstall(python: str, names: list[str]) -> None:
    run_quiet([python, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *names],
              f"pip uninstall {' '.join(names)}")  # fmt: skip
