"""The one exception type users see.

Everything a user can fix (a bad file, a bad name, a missing model, a locked session) raises
`NbkitError`, which reads as one short paragraph: what went wrong, where, and what to do. The CLI and
the notebooks print it without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class NbkitError(Exception):
    """An error the user can act on.

    Args:
        message: what went wrong, in one sentence.
        path: the file or folder it concerns, if any.
        fix: what the user should do about it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, fix: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f"\n  How to fix: {self.fix}"
        return text


class NbkitWarning(UserWarning):
    """A warning nbkit gives the user (a stale lock taken over, a checkpoint skipped): shown even when
    the libraries are quiet, as one `nbkit: warning: ...` line (`nbkit.quiet`)."""


class SessionLockedError(NbkitError):
    """Another live kernel holds the session's lock."""


class DriveDisconnectedError(NbkitError):
    """The Google Drive FUSE mount went away and did not come back."""


class DiskFullError(NbkitError):
    """A disk or a storage quota is full (ENOSPC, EDQUOT), or is too full to go on safely.

    Args:
        message: what could not be written.
        path: the file or folder that did not fit.
        fix: how to make room.
        needed: the bytes the write needed, when known.
        free: the bytes free on that disk, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        fix: str | None = None,
        needed: int | None = None,
        free: int | None = None,
    ):
        self.needed = needed
        self.free = free
        super().__init__(message, path=path, fix=fix)
