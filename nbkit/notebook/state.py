"""What the notebook's cells share, and how they fail.

The cells pass only form values: what one cell makes for the next (the storage root, the base model,
the session, the training result, the web UI) is kept here, so a cell run out of order finds it missing
and says which cell to run first instead of a `NameError`. A failure the user can fix shows as one
paragraph in the notebook's own words (its form fields, its cells), and the stop button as one line
saying what was saved and how to go on; neither shows a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from nbkit.errors import NbkitError

F = TypeVar("F", bound=Callable[..., Any])

# How the notebooks write the settings and actions nbkit's messages ask for (`nbkit.errors.render`).
WORDS = {
    "resume": "RESUME_TRAINING ticked in Settings",
    "restart": "RESTART_TRAINING ticked in Settings",
    "more": "TRAIN_MORE ticked in Settings",
    "token": 'INSTANCE_TOKEN = "{value}" in Settings',
    "tunnel": 'UI_TUNNEL = "{value}" in Settings',
    "family": 'MODEL_FAMILY = "{value}" in Settings',
    "concept": 'CONCEPT = "{value}" in Settings, with its photos in IMAGES, and the Photos cell run',
    "repeats": "CONCEPT_REPEATS = {value} in Settings",
    "class_word": 'CLASS_WORD = "{value}" in Settings, and the Class word cell run',
    "class_images": "CLASS_IMAGES = {value} in Settings",
    "reopen_tunnel()": "run the Web UI cell again",
}


@dataclasses.dataclass
class State:
    """What the cells have made so far (None: that cell has not run)."""

    root: Any = None
    base: Any = None
    base_asked: bool = False
    session: Any = None
    result: Any = None
    ui: Any = None
    model: str = ""


state = State()


def shown(error: NbkitError) -> str:
    """`error` as the notebook shows it."""
    return error.render("notebook", WORDS)


class CellError(Exception):
    """An `NbkitError` as a notebook shows it: the paragraph alone (IPython calls `_render_traceback_`)."""

    def __init__(self, error: NbkitError):
        super().__init__(shown(error))
        self.error = error

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31mnbkit: {self}\x1b[0m"]


class CellStopped(Exception):
    """The stop button, as one line: what was saved and how to go on."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[33mStopped. {self}\x1b[0m"]


def friendly(
    stopped: str | Callable[[], str] = "nothing was lost: run the cell again to go on",
) -> Callable[[F], F]:
    """Show an `NbkitError` raised by the cell as its paragraph and the stop button as one line.

    Args:
        stopped: the line the stop button shows (or a function writing it from `state`).
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except NbkitError as error:
                raise CellError(error) from None
            except KeyboardInterrupt:
                raise CellStopped(stopped() if callable(stopped) else stopped) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def run_first(what: str, cell: str) -> NbkitError:
    """The error of a cell run before the one that makes what it needs."""
    return NbkitError(f"{what} yet", fix=f"run the {cell} cell first (or Runtime > Run all)")


def need_root():
    if state.root is None:
        raise run_first("no storage is chosen", "Storage")
    return state.root


def need_session():
    if state.session is None:
        raise run_first("no session is open", "Session")
    return state.session


def need_trained():
    """The open session, which must have a trained model."""
    opened = need_session()
    if not opened.manifest.models:
        raise run_first(f"session '{opened.name}' has no trained model", "Train")
    return opened
