"""Read the dataset check's flags (`logs/vision_check.json`) for the image report and contact sheet.

Only json: the image commands show the flags without loading torch or a vision model. The flags are
those of the last `nbkit vision check`; photos added since have none until it runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHECK_FILE = Path("logs") / "vision_check.json"


def read_vision_flags(session_path: str | os.PathLike) -> dict[str, list[str]]:
    """The flags per photo (`instance_images/x.png` -> `["near-duplicate of ...", ...]`), only flagged ones.

    An absent or unreadable file gives `{}`: the flags are advice, never a reason to fail a listing.

    Args:
        session_path: the session folder.
    """
    path = Path(session_path) / CHECK_FILE
    try:
        flags = json.loads(path.read_text(encoding="utf-8")).get("flags", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(flags, dict):
        return {}
    return {
        str(file): [str(flag) for flag in found]
        for file, found in flags.items()
        if isinstance(found, list) and found
    }


def short_flags(flags: list[str]) -> str:
    """A few characters for a thumbnail label: ` [dup]`, ` [off?]` or ` [dup,off?]`."""
    marks = []
    if any(flag.startswith("near-duplicate") for flag in flags):
        marks.append("dup")
    if any("off-subject" in flag for flag in flags):
        marks.append("off?")
    return f" [{','.join(marks)}]" if marks else ""
