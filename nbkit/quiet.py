"""Keep library chatter out of what users read; show nbkit's own warnings as one clean line.

diffusers, transformers and huggingface_hub print warnings about optional packages, deprecations
and loader progress bars that a user cannot act on, interleaved with nbkit's messages. The command
line calls `quiet_libraries()` before every command (`nbkit --verbose ...` lets everything through),
and a notebook can call it in its first cell. It uses the libraries' own switches (verbosity, progress
bars, warnings filters), never patches them. nbkit's own progress bars (training, downloads) are
plain tqdm bars and stay visible.

nbkit's warnings are `NbkitWarning`s (or UserWarnings raised from nbkit's code), shown as
`nbkit: warning: <message>`, without the file and line that Python adds.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

from nbkit.errors import NbkitWarning

# The loggers and progress bars of these libraries are switched off unless verbose.
_VERBOSITY_VARIABLES = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
# Plain `logging` loggers of libraries without a verbosity switch, quieted before they are imported:
# torchao (imported by transformers whenever it is installed) logs each optional kernel library it
# cannot load, and torch's pytree logs a deprecation when torchao registers its enums. bitsandbytes
# (imported by diffusers' model loading and by peft whenever it is installed) logs, on a CPU with
# AVX512-BF16, that the optional `kernels` package for its 4-bit CPU kernel is missing.
_PLAIN_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree")
_LOGGING_MODULES = ("transformers.utils.logging", "diffusers.utils.logging")
_NBKIT_DIR = str(Path(__file__).resolve().parent)
_NBKIT_MODULES = r"nbkit(\..*)?$"
_format_warning = warnings.formatwarning  # Python's own, for everything that is not nbkit's

__all__ = ["NbkitWarning", "format_warning", "quiet_libraries"]


def quiet_libraries(verbose: bool = False, *, import_libraries: bool = True) -> None:
    """Silence the libraries' warnings, log messages and loader progress bars, unless `verbose`.

    Calling it again is harmless. nbkit's warnings are always shown, as one clean line.

    Args:
        verbose: let every library message and warning through (for bug reports).
        import_libraries: import transformers and diffusers now to switch off their progress bars
            (seconds, as they import torch); when False, a library imported later still gets the
            quiet verbosity through its environment variable, but diffusers' loader bar stays on.
    """
    warnings.formatwarning = format_warning
    if verbose:
        return
    # Environment variables reach libraries imported later and processes started later (accelerate).
    for name, value in _VERBOSITY_VARIABLES.items():
        os.environ.setdefault(name, value)
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    disable_progress_bars()  # the hub's "Fetching files" bars; transformers' bars follow this switch
    hub_logging.set_verbosity_error()
    for name in _PLAIN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in _LOGGING_MODULES:
        if name in sys.modules or import_libraries:
            try:
                module = importlib.import_module(name)
            except ImportError:  # an optional library that is not installed has nothing to say
                continue
            module.set_verbosity_error()
            module.disable_progress_bar()
    warnings.simplefilter("ignore")
    # Later filters win: nbkit's own warnings stay visible.
    warnings.filterwarnings("default", category=UserWarning, module=_NBKIT_MODULES)
    warnings.filterwarnings("default", category=NbkitWarning)


def is_nbkit_warning(category: type[Warning], filename: str) -> bool:
    """Whether a warning is nbkit's own: an NbkitWarning, or a UserWarning raised from nbkit's code."""
    if issubclass(category, NbkitWarning):
        return True
    return issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_NBKIT_DIR + os.sep)


def format_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` that writes nbkit's warnings as one `nbkit: warning: ...` line."""
    if not is_nbkit_warning(category, filename):
        return _format_warning(message, category, filename, lineno, line)
    return "nbkit: warning: " + " ".join(str(message).split()) + "\n"
