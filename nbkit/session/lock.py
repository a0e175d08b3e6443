"""One kernel at a time per session: a lock file with a heartbeat.

`<session>/.lock` is created with O_CREAT|O_EXCL, so exactly one process wins it, and holds JSON
`{pid, host, purpose, started, heartbeat, token}`. A daemon thread refreshes `heartbeat` while the lock
is held. Colab kernels die without running any cleanup (runtime reset, out of memory, a closed tab), so
a lock is stale, and is taken over with a warning, when its process is gone from this host or its
heartbeat stopped long ago (another VM writing to the same Drive). Anything else is a live lock and
raises `SessionLockedError` saying who holds it and what to do.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import socket
import threading
import uuid
import warnings
from pathlib import Path

import psutil

from nbkit.errors import NbkitError, NbkitWarning, SessionLockedError
from nbkit.fsio import atomic_write_json, fsync_dir, retry_io

LOCK_NAME = ".lock"
HEARTBEAT_INTERVAL_S = 30.0
# Ten missed heartbeats: long enough for a Drive sync hiccup, short enough for a user to wait out.
STALE_AFTER_S = 300.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _stamp(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


@dataclasses.dataclass
class LockInfo:
    """The contents of a lock file.

    Args:
        pid: the holder's process id.
        host: the holder's host name.
        purpose: what the holder is doing, e.g. `training`.
        started: when the lock was taken (ISO 8601, UTC).
        heartbeat: when the holder last proved it is alive (ISO 8601, UTC).
        token: a random id telling this holding apart from a later one by the same process.
    """

    pid: int
    host: str
    purpose: str
    started: str
    heartbeat: str
    token: str = ""

    def describe(self) -> str:
        if self.pid <= 0:
            return f"an unknown process (the lock file is empty or half-written, last changed {self.started})"
        return f"pid {self.pid} on {self.host} ({self.purpose!r}, since {self.started})"

    def stale_reason(self, stale_after: float = STALE_AFTER_S) -> str | None:
        """Why this lock is stale, or None when its holder looks alive.

        Args:
            stale_after: seconds without a heartbeat after which a holder counts as dead.
        """
        if self.pid > 0 and self.host == socket.gethostname() and not _process_alive(self.pid, self.started):
            return f"process {self.pid} no longer runs on this host"
        try:
            beat = datetime.datetime.fromisoformat(self.heartbeat)
        except (TypeError, ValueError):
            return f"its heartbeat {self.heartbeat!r} is not a time"
        if beat.tzinfo is None:  # written by hand or by an older nbkit: read it as UTC
            beat = beat.replace(tzinfo=datetime.timezone.utc)
        age = (_now() - beat).total_seconds()
        if age > stale_after:
            return f"its last heartbeat was {age:.0f} s ago (more than {stale_after:.0f} s)"
        return None


def _process_alive(pid: int, started: str) -> bool:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    # A process born after the lock was taken reuses the pid of the one that took it.
    try:
        taken = datetime.datetime.fromisoformat(started).timestamp()
    except (TypeError, ValueError):
        return True
    return created <= taken + 1.0


def lock_path(session_path: str | os.PathLike) -> Path:
    return Path(session_path) / LOCK_NAME


def read_lock(session_path: str | os.PathLike) -> LockInfo | None:
    """The lock file's contents; None when there is no lock or it is unreadable (half-written)."""
    path = lock_path(session_path)
    try:
        data = retry_io(lambda: json.loads(path.read_text(encoding="utf-8")), what=f"reading {path}")
        return LockInfo(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None


def live_holder(session_path: str | os.PathLike, *, stale_after: float = STALE_AFTER_S) -> LockInfo | None:
    """Who holds the session's lock, or None when nobody alive does."""
    info = read_lock(session_path)
    if info is None or info.stale_reason(stale_after) is not None:
        return None
    return info


def force_unlock(session_path: str | os.PathLike) -> LockInfo | None:
    """Remove the lock file whoever holds it; returns what it said (None when there was none)."""
    info = read_lock(session_path)
    path = lock_path(session_path)
    try:
        retry_io(path.unlink, what=f"removing {path}")
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    return info


class SessionLock:
    """Exclusive hold on a session folder, as a context manager.

    Args:
        session_path: the session folder.
        purpose: what the holder does, shown to whoever finds the session locked.
        heartbeat_interval: seconds between heartbeats.
        stale_after: seconds without a heartbeat after which another process may take the lock.
    """

    def __init__(
        self,
        session_path: str | os.PathLike,
        purpose: str,
        *,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        stale_after: float = STALE_AFTER_S,
    ):
        if heartbeat_interval <= 0 or stale_after <= heartbeat_interval:
            raise ValueError(
                f"need 0 < heartbeat_interval < stale_after, got {heartbeat_interval} and {stale_after}"
            )
        self.session_path = Path(session_path)
        self.path = lock_path(session_path)
        self.purpose = purpose
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.info is not None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise `SessionLockedError` if it is live."""
        if self.held:
            raise NbkitError(f"this lock ({self.purpose!r}) is already held", path=self.path)
        if not self.session_path.is_dir():
            raise NbkitError("the session folder does not exist", path=self.session_path)
        stamp = _stamp(_now())
        info = LockInfo(os.getpid(), socket.gethostname(), self.purpose, stamp, stamp, uuid.uuid4().hex)
        for _ in range(3):
            if self._create(info):
                break
            holder = read_lock(self.session_path)
            if holder is None:
                holder = self._unreadable_holder()
            reason = holder.stale_reason(self.stale_after)
            if reason is None:
                raise self._locked_error(holder)
            warnings.warn(
                f"{self.path}: taking over a stale lock held by {holder.describe()}: {reason}",
                NbkitWarning,
                stacklevel=2,
            )
            self._remove_if_unchanged(holder)
        else:
            raise SessionLockedError("could not take the session lock after 3 tries", path=self.path)
        self.info = info
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"nbkit-lock-{self.purpose}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if self.info is None:
            return
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_lock(self.session_path)
        # A forked child inherits this object but must not free its parent's lock.
        if current is not None and current.token == self.info.token and current.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                retry_io(self.path.unlink, what=f"removing {self.path}")
            fsync_dir(self.session_path)
        self.info = None

    def __enter__(self) -> SessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _create(self, info: LockInfo) -> bool:
        data = json.dumps(dataclasses.asdict(info), indent=2).encode("utf-8")
        try:
            fd = retry_io(
                lambda: os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644),
                what=f"creating {self.path}",
            )
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.session_path)
        return True

    def _unreadable_holder(self) -> LockInfo:
        # An empty or half-written lock file is a holder between O_EXCL and its first write, or one
        # killed right there; the file's age tells them apart.
        try:
            modified = datetime.datetime.fromtimestamp(self.path.stat().st_mtime, datetime.timezone.utc)
        except FileNotFoundError:
            modified = _now()
        stamp = _stamp(modified)
        return LockInfo(pid=-1, host="unknown host", purpose="unknown", started=stamp, heartbeat=stamp)

    def _remove_if_unchanged(self, stale: LockInfo) -> None:
        # Another process may have taken the stale lock over in the meantime; leave its lock alone.
        current = read_lock(self.session_path)
        if current is not None and current != stale:
            return
        with contextlib.suppress(FileNotFoundError):
            retry_io(self.path.unlink, what=f"removing {self.path}")

    def _locked_error(self, holder: LockInfo) -> SessionLockedError:
        mine = holder.pid == os.getpid() and holder.host == socket.gethostname()
        who = f"this kernel (pid {holder.pid})" if mine else holder.describe()
        return SessionLockedError(
            f"the session is in use by {who}, last heartbeat {holder.heartbeat}; "
            f"cannot start {self.purpose!r}",
            path=self.session_path,
            fix="stop the other notebook or kernel (Runtime > Interrupt execution / restart), or wait for "
            f"it to finish; a lock whose heartbeat stops is freed after {self.stale_after:.0f} s. If you are "
            f"sure nothing uses the session, run `nbkit session unlock {self.session_path.name}`",
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            info = self.info
            if info is None:
                return
            current = read_lock(self.session_path)
            if current is not None and current.token != info.token:
                warnings.warn(
                    f"{self.path}: the lock was taken over by {current.describe()}; "
                    f"this kernel's {self.purpose!r} no longer holds the session",
                    NbkitWarning,
                    stacklevel=1,
                )
                return
            info.heartbeat = _stamp(_now())
            try:
                atomic_write_json(self.path, dataclasses.asdict(info))
            except (OSError, NbkitError) as error:
                warnings.warn(f"{self.path}: heartbeat failed: {error}", NbkitWarning, stacklevel=1)
