"""The one exception type users see.

Everything a user can fix (a bad file, a bad name, a missing model, a locked session) raises
`NbkitError`, which reads as one short paragraph: what went wrong, where, and what to do. The CLI and
the notebooks print it without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# A setting or action a message asks for, written once and rendered by each interface in its own words:
# `[[resume]]` is `--resume` on the CLI, `resume=True` in Python, a form field in the notebook.
_MARK = re.compile(r"\[\[([a-z_]+)(\(\))?(?:=([^\]]*))?\]\]")


def setting(name: str, value: str | None = None) -> str:
    """The mark for setting `name` (optionally to `value`) in a message; `render` writes it out.

    Args:
        name: the Python argument's name (`resume`, `tunnel`).
        value: the value the message asks for (`cloudflared`); None for a switch.
    """
    return f"[[{name}]]" if value is None else f"[[{name}={value}]]"


def action(name: str) -> str:
    """The mark for calling method `name` of the object the user holds (`reopen_tunnel`)."""
    return f"[[{name}()]]"


def render(text: str, interface: str = "python", words: Mapping[str, str] | None = None) -> str:
    """`text` with its setting and action marks written for `interface`.

    Args:
        text: a message, with marks from `setting` and `action`.
        interface: `python` (`resume=True`, `call ui.reopen_tunnel()`) or `cli` (`--resume`, `run the
            command again`); the words of any other come from `words`.
        words: the interface's own wording of marks, by `name`, `name=value` or `name()`; it may use
            `{value}`. Marks it lacks are written as Python's.
    """
    words = words or {}

    def word(match: re.Match) -> str:
        name, call, value = match.groups()
        key = f"{name}()" if call else name
        own = words.get(f"{name}={value}") if value is not None else None
        own = own or words.get(key)
        if own is not None:
            return own.format(value=value)
        if interface == "cli" and not call:
            flag = "--" + name.replace("_", "-")
            return flag if value is None else f"{flag} {value}"
        if call:
            return "run the command again" if interface == "cli" else f"call ui.{name}()"
        return f"{name}=True" if value is None else f"{name}={value!r}"

    return _MARK.sub(word, text)


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
        return self.render()

    def render(self, interface: str = "python", words: Mapping[str, str] | None = None) -> str:
        """The paragraph, with the settings it names in `interface`'s words (see `nbkit.errors.render`)."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f"\n  How to fix: {self.fix}"
        return render(text, interface, words)


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
