"""Tokens from the environment or Colab's secrets (`google.colab.userdata`).

The value is returned to the caller only: no message here names it, only where it was (or was not)
found. Colab's secrets are read only when `google.colab` imports, so elsewhere nothing waits on them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def find_secret(names: Sequence[str]) -> tuple[str | None, str]:
    """The first of `names` set in the environment, then among Colab's secrets, and where it came from;
    (None, why none was found) otherwise.

    Args:
        names: the environment variables and Colab secrets to look at, in order (`HF_TOKEN`).
    """
    listed = ", ".join(names)
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value, f"the environment variable {name}"
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None, f"not in the environment ({listed})"
    denied = False
    for name in names:
        try:
            value = (userdata.get(name) or "").strip()
        except Exception as error:  # SecretNotFoundError, NotebookAccessError, TimeoutException
            denied = denied or "Access" in type(error).__name__
            continue
        if value:
            return value, f"the Colab secret {name}"
    if denied:
        return (
            None,
            "the Colab secret exists but this notebook may not read it (turn on its 'Notebook access')",
        )
    return None, f"not in the environment nor in Colab secrets ({listed})"
