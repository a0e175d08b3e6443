"""What the notebooks' cells call (`import nbkit.notebook as nb`): one function per cell, taking only
form values. What a cell makes for the next ones is kept in `state` (so a cell run out of order says
which cell to run first); an error shows as one paragraph in the notebook's words, the stop button as
one line. `cells`, `training` and `ui_cells` hold the cells; `progress` the training cell's live view;
`widgets` the session picker, upload box and the UI's links."""

from nbkit.notebook.cells import (
    add_images,
    auto_captions,
    auto_masks,
    base_model,
    captions,
    class_images,
    session,
    setup,
    storage,
)
from nbkit.notebook.state import CellError, CellStopped, state
from nbkit.notebook.training import disconnect, export, scores, train, upload
from nbkit.notebook.ui_cells import controlnets, launch_ui, stop_ui, tidy, try_ui, ui_model

__all__ = [
    "CellError",
    "CellStopped",
    "add_images",
    "auto_captions",
    "auto_masks",
    "base_model",
    "captions",
    "class_images",
    "controlnets",
    "disconnect",
    "export",
    "launch_ui",
    "scores",
    "session",
    "setup",
    "state",
    "stop_ui",
    "storage",
    "tidy",
    "train",
    "try_ui",
    "ui_model",
    "upload",
]
