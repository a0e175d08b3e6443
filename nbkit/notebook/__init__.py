"""What the notebooks' cells call (`import nbkit.notebook as nb`): one function per cell, each showing
nbkit's one-paragraph message instead of a traceback. `cells` holds them; `widgets` the session picker
and upload box shown when a form leaves a choice open."""

from nbkit.notebook.cells import (
    CellError,
    add_images,
    base_model,
    captions,
    class_images,
    controlnets,
    export,
    launch_ui,
    scores,
    session,
    setup,
    shown_errors,
    stop_ui,
    storage,
    tidy,
    train,
    try_ui,
    ui_model,
)

__all__ = [
    "CellError",
    "add_images",
    "base_model",
    "captions",
    "class_images",
    "controlnets",
    "export",
    "launch_ui",
    "scores",
    "session",
    "setup",
    "shown_errors",
    "stop_ui",
    "storage",
    "tidy",
    "train",
    "try_ui",
    "ui_model",
]
