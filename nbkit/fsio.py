"""Crash-safe file writes and Drive-tolerant I/O.

Every write into a session goes through here. A write lands in a temporary sibling, is flushed and
fsync'd, then renamed over the target, and the directory is fsync'd, so a SIGKILL or a Drive hiccup at
any moment leaves either the old file or the new one, never half of one.

Google Drive's FUSE mount on Colab drops out now and then with ENOTCONN ("Transport endpoint is not
connected") or EIO; `retry_io` retries those with backoff and then says plainly that Drive is gone.

A full disk or Drive quota (ENOSPC, EDQUOT) is not worth a retry: it becomes a `DiskFullError` naming
the path, the bytes needed and free, and where to make room, here in the atomic writers and through
`storage_errors` at the entry points that write through other libraries (torch, safetensors, pip).
The temporary file of a failed write is removed, so a full disk is not left fuller.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from nbkit.errors import DiskFullError, DriveDisconnectedError, NbkitError

T = TypeVar("T")

# Errors a flaky network mount raises that are worth another try.
TRANSIENT_ERRNOS = {errno.ENOTCONN, errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ESTALE}
TEMP_PREFIX = ".nbkit-tmp-"
OLD_PREFIX = ".nbkit-old-"
# Errors of a full disk or an exhausted quota: retrying cannot help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# The same errors as libraries that wrap them word them (safetensors' Rust I/O, pip's output).
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save to a file name reports a short write only as "file write failed" / "unexpected pos":
# taken for a full disk when the disk it wrote to has less than this left.
TORCH_WRITER_TEXTS = ("file write failed", "unexpected pos")
LOW_SPACE_BYTES = 64 << 20
# Google Drive on Colab: a full Drive is fixed in Drive, not on the runtime's disk.
COLAB_DRIVE_MOUNT = Path("/content/drive")
SCRATCH_ENV = "NBKIT_SCRATCH"


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
            if error.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(error.filename2 or error.filename, error=error, what=what) from error
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


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the disk holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_disk_full(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether `error` (or an error it was raised from) says the disk or quota is full.

    Args:
        error: the exception.
        path: where the failed write went: a bare "file write failed" of torch's writer counts as a
            full disk when this disk has little space left.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return True
        text = str(link).lower()
        if any(words in text for words in DISK_FULL_TEXTS):
            return True
        if path is not None and any(words in text for words in TORCH_WRITER_TEXTS):
            free = free_bytes(path)
            if free is not None and free < LOW_SPACE_BYTES:
                return True
        link = link.__cause__ or link.__context__
    return False


def format_bytes(count: int) -> str:
    """`1.8 GB`, `37.8 MB`, `512 bytes`: a byte count for messages, in decimal units (as disks and
    downloads state their sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def make_room_fix(path: str | os.PathLike | None, then: str = "run this again") -> str:
    """What to do about a full disk at `path`: where to free space, or how to move nbkit's folders."""
    where = Path(path).absolute() if path is not None else None
    if where is not None and where.is_relative_to(COLAB_DRIVE_MOUNT):
        room = (
            "free space on Google Drive (delete old checkpoints or models you no longer need, then empty "
            "Drive's trash, whose files still count) or get more Drive storage"
        )
    else:
        room = (
            f"free space on that disk (`df -h {where or '.'}` shows it), or move nbkit's folders to a "
            f"bigger disk: {SCRATCH_ENV} for the scratch folder (training copies, checkpoint staging), "
            "NBKIT_HOME for sessions"
        )
    return f"{room}; then {then}"


def disk_full_error(
    path: str | os.PathLike | None,
    *,
    needed: int | None = None,
    free: int | None = None,
    error: BaseException | None = None,
    what: str | None = None,
    then: str = "run this again; what was saved before is intact",
) -> DiskFullError:
    """A `DiskFullError` for a write to `path` that did not fit (`error`) or would not (no `error`).

    Args:
        path: the file or folder written.
        needed: the bytes the write needs, when known.
        free: the bytes free there (default: looked up).
        error: the error the disk gave, when there was one.
        what: what is written, for the message, e.g. "saving model.safetensors".
        then: what to do once there is room.
    """
    if free is None and path is not None:
        free = free_bytes(path)
    quota = isinstance(error, OSError) and error.errno == errno.EDQUOT
    if error is None:
        message = f"not enough space for {what or 'this write'}"
    else:
        message = f"{what or 'writing'} failed: the {'storage quota' if quota else 'disk'} is full"
    amounts = [f"it needs about {format_bytes(needed)}"] if needed is not None else []
    if free is not None:
        amounts.append(f"{format_bytes(free)} free")
    if amounts:
        message += f" ({', '.join(amounts)})"
    return DiskFullError(message, path=path, fix=make_room_fix(path, then), needed=needed, free=free)


@contextlib.contextmanager
def storage_errors(
    path: str | os.PathLike | None = None,
    *,
    needed: int | None = None,
    what: str | None = None,
    then: str = "run this again; what was saved before is intact",
) -> Iterator[None]:
    """Turn a full disk into `DiskFullError`, and a raw ENOTCONN into `DriveDisconnectedError`.

    For entry points that write through libraries nbkit does not wrap (torch, safetensors, pip); a
    context manager or a decorator. A temporary file named by the error is replaced by `path`, the
    file the user knows.

    Args:
        path: where the block writes, named when the error itself names no file.
        needed: the bytes it needs, when known.
        what: what is being written, for the message.
        then: what to do once there is room.
    """

    def named(candidate: str | os.PathLike | None) -> str | None:
        if not candidate or (path is not None and TEMP_PREFIX in os.fspath(candidate)):
            candidate = path
        return None if candidate is None else os.fspath(candidate)

    try:
        yield
    except DiskFullError as error:
        error.path = named(error.path)
        raise
    except NbkitError:
        raise
    except Exception as error:
        if is_disk_full(error, path):
            target = named(getattr(error, "filename2", None) or getattr(error, "filename", None))
            raise disk_full_error(target, needed=needed, error=error, what=what, then=then) from error
        if isinstance(error, OSError) and error.errno == errno.ENOTCONN:
            raise DriveDisconnectedError(
                f"{what or 'writing'} failed: {error.strerror} (the storage mount is gone)",
                path=named(error.filename),
                fix="remount Google Drive (run the 'Mount Drive' cell again, or "
                "drive.mount('/content/drive', force_remount=True)) and run this again; "
                "work saved before this point is intact",
            ) from error
        raise


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
def atomic_path(path: str | os.PathLike, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    For writers that want a file name (safetensors' `save_file`, `torch.save`, `zipfile`). On an
    exception the temporary file is removed and `path` is untouched; a full disk is a `DiskFullError`.

    Args:
        path: the file to write.
        needed: the bytes it will take, when known (for the message of a full disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with storage_errors(path, needed=needed, what=f"saving {path.name}"):
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
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as handle:
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
        with storage_errors(path, what=f"saving {path.name}"):
            yield tmp
            _fsync_tree(tmp)
            old = None
            if path.exists():
                old = path.with_name(OLD_PREFIX + path.name)
                if old.exists():
                    shutil.rmtree(old, ignore_errors=True)
                retry_io(lambda: os.replace(path, old), what=f"replacing {path.name}")
            try:
                retry_io(lambda: os.replace(tmp, path), what=f"saving {path.name}")
            except BaseException:
                if old is not None and not path.exists():
                    os.replace(old, path)  # the old version back at once, not at the next open
                raise
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


def sha256_of(path: str | os.PathLike) -> hashlib._Hash:
    """The sha256 of a file's bytes, read 1 MiB at a time (any size, little memory)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
    return hasher


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file through `retry_io`."""
    return retry_io(lambda: json.loads(Path(path).read_text(encoding="utf-8")), what=f"reading {path}")
