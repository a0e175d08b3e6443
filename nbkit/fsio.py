"""Crash-safe file writes and Drive-tolerant I/O.

Every write into a session goes through here. A write lands in a temporary sibling, is flushed and
fsync'd, then renamed over the target, and the directory is fsync'd, so a SIGKILL or a Drive hiccup at
any moment leaves either the old file or the new one, never half of one.

Google Drive's FUSE mount on Colab drops out now and then with ENOTCONN ("Transport endpoint is not
connected") or EIO; `retry_io` retries those with backoff and then says plainly that Drive is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from nbkit.errors import DriveDisconnectedError

T = TypeVar("T")

# Errors a flaky network mount raises that are worth another try.
TRANSIENT_ERRNOS = {errno.ENOTCONN, errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ESTALE}
TEMP_PREFIX = ".nbkit-tmp-"
OLD_PREFIX = ".nbkit-old-"


def retry_io(
    fn: Callable[[], T],
    *,
    what: str = "file operation",
    attempts: int = 5,
    first_delay: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn`, retrying transient mount errors with exponential backoff.

    Args:
        fn: the operation, taking no arguments.
        what: a short description for the error message.
        attempts: how many tries in all.
        first_delay: seconds before the second try; doubles each time.
        sleep: injected for tests.
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as error:
            if error.errno not in TRANSIENT_ERRNOS:
                raise
            if attempt == attempts:
                raise DriveDisconnectedError(
                    f"{what} failed {attempts} times with '{error.strerror}' (errno {error.errno}); "
                    "the storage mount looks disconnected",
                    path=error.filename,
                    fix="remount Google Drive (run the 'Mount Drive' cell again, or "
                    "drive.mount('/content/drive', force_remount=True)) and rerun this cell; "
                    "work saved before this point is intact",
                ) from error
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    For writers that want a file name (safetensors' `save_file`, `torch.save`, `zipfile`). On an
    exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        retry_io(lambda: os.replace(tmp, path), what=f"saving {path.name}")
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync dir)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it becomes `path`.

    An existing `path` is moved aside first and deleted only after the new one is in place, so a
    kill at any point leaves a complete old or a complete new directory: at worst the old one waits
    under its aside name, and `clean_temporaries` puts it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(OLD_PREFIX + path.name)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            retry_io(lambda: os.replace(path, old), what=f"replacing {path.name}")
        retry_io(lambda: os.replace(tmp, path), what=f"saving {path.name}")
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(directory)


def clean_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Tidy up after interrupted atomic writes directly inside `directory`.

    Temporary files are removed; a directory left under its aside name by a kill between the two
    renames of `atomic_directory` is restored when its new version never arrived.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(OLD_PREFIX):
            original = entry.with_name(entry.name[len(OLD_PREFIX) :])
            if not original.exists():
                os.replace(entry, original)
                continue
        if entry.name.startswith((TEMP_PREFIX, OLD_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file through `retry_io`."""
    return retry_io(lambda: json.loads(Path(path).read_text(encoding="utf-8")), what=f"reading {path}")
