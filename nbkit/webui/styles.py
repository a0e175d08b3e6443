"""A1111's prompt styles: `styles.csv` in the storage root, applied to a request's prompts by name.

The file is A1111's (`name,prompt,negative_prompt`, UTF-8 with or without a BOM; the old two-column
`name,text` form too; rows whose name starts with `#` are comments). Besides `styles.csv`, any
`styles*.csv` beside it is read after it, in name order, as A1111 reads the files its `--styles-file`
pattern names; a name defined twice keeps the last definition. The files are re-read when they change.

A style is applied as A1111 applies it: a style text holding `{prompt}` has the prompt put in its place,
any other is appended after a comma; several styles apply in order, and the negative prompt gets the
styles' negative texts the same way. A name that is not a style is ignored, as in A1111. The infotext
holds the prompt with the styles applied, as A1111 writes it; reading an infotext finds the styles in
it again (`extract_styles`), as A1111's png-info does by default (`Styles array`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STYLES_FILE = "styles.csv"
STYLES_PATTERN = "styles*.csv"
PLACEHOLDER = "{prompt}"
MAX_STYLES_BYTES = 8 * 2**20  # a styles file of thousands of rows is a few hundred kilobytes


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """One style.

    Args:
        name: what a request's `styles` call it.
        prompt: the text merged into the prompt.
        negative_prompt: the text merged into the negative prompt.
        path: the file it comes from.
    """

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: str | None = None

    def to_api(self) -> dict[str, str]:
        """One item of A1111's GET /sdapi/v1/prompt-styles."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompt(style_text: str, prompt: str) -> str:
    """A1111's rule: `{prompt}` in the style text takes the prompt; else the style is appended."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_style_texts(prompt: str, style_texts: Sequence[str]) -> str:
    """`prompt` with each style text merged in, in order."""
    for text in style_texts:
        prompt = merge_prompt(text, prompt)
    return prompt


def _strip_style(style_text: str, prompt: str) -> str | None:
    """`prompt` without `style_text` merged into it, or None when it was not (A1111's extraction)."""
    prompt, style_text = prompt.strip(), style_text.strip()
    if PLACEHOLDER in style_text:
        left, _, right = style_text.partition(PLACEHOLDER)
        if prompt.startswith(left) and prompt.endswith(right) and len(prompt) >= len(left) + len(right):
            return prompt[len(left) : len(prompt) - len(right)]
        return None
    if not prompt.endswith(style_text):
        return None
    prompt = prompt[: len(prompt) - len(style_text)]
    return prompt[:-2] if prompt.endswith(", ") else prompt


class StyleDatabase:
    """The styles of `<root>/styles.csv` (and `<root>/styles*.csv`), re-read when a file changes.

    Args:
        root: the folder holding the files (None: no styles).
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._styles: dict[str, PromptStyle] = {}

    def _files(self) -> list[Path]:
        if self.root is None or not self.root.is_dir():
            return []
        first = self.root / STYLES_FILE
        others = sorted(path for path in self.root.glob(STYLES_PATTERN) if path != first)
        return [path for path in (first, *others) if path.is_file()]

    @property
    def styles(self) -> dict[str, PromptStyle]:
        """The styles by name, in file order (the files are read again when one has changed)."""
        files = self._files()
        stamp = tuple((path, *_stat(path)) for path in files)
        with self._lock:
            if stamp != self._stamp:
                styles: dict[str, PromptStyle] = {}
                for path in files:
                    styles.update(read_styles(path))
                self._styles, self._stamp = styles, stamp
            return self._styles

    def names(self) -> list[str]:
        return list(self.styles)

    def apply(self, prompt: str, negative_prompt: str, names: Sequence[str]) -> tuple[str, str]:
        """The prompt and negative prompt with the styles `names` applied, in order (unknown names are
        ignored, as in A1111)."""
        styles = self.styles
        chosen = [styles[name] for name in names if name in styles]
        unknown = [name for name in names if name not in styles]
        if unknown:
            logger.info("no style is called %s: ignored, as A1111 does", ", ".join(map(repr, unknown)))
        return (
            apply_style_texts(prompt, [style.prompt for style in chosen]),
            apply_style_texts(negative_prompt, [style.negative_prompt for style in chosen]),
        )

    def extract_styles(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """A1111's reading of an infotext: the styles whose texts the prompts end with (or wrap), and
        the prompts without them.

        Returns:
            The style names in the order they were applied, the prompt and the negative prompt.
        """
        left = [style for style in self.styles.values() if style.prompt or style.negative_prompt]
        found: list[str] = []
        while True:
            for style in left:
                stripped = _strip_style(style.prompt, prompt)
                negative = (
                    _strip_style(style.negative_prompt, negative_prompt) if stripped is not None else None
                )
                if stripped is not None and negative is not None:
                    prompt, negative_prompt = stripped, negative
                    found.append(style.name)
                    left.remove(style)
                    break
            else:
                return list(reversed(found)), prompt, negative_prompt

    def infotext_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """A1111's parsed infotext (png-info's `parameters`) read with its default "Apply if any": when
        styles are found in the prompts, `Styles array` names them and the prompts are without them."""
        found, prompt, negative = self.extract_styles(
            parameters.get("Prompt", ""), parameters.get("Negative prompt", "")
        )
        if not found:
            return parameters
        return {**parameters, "Prompt": prompt, "Negative prompt": negative, "Styles array": found}


def _stat(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


def read_styles(path: str | os.PathLike) -> dict[str, PromptStyle]:
    """The styles of one A1111 styles file (an unreadable file is logged and gives none, as in A1111).

    Args:
        path: a `name,prompt,negative_prompt` CSV file.
    """
    path = Path(path)
    styles: dict[str, PromptStyle] = {}
    try:
        if path.stat().st_size > MAX_STYLES_BYTES:
            raise ValueError(f"larger than {MAX_STYLES_BYTES // 2**20} MB")
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for row in csv.DictReader(handle, skipinitialspace=True):
                name = row.get("name")
                if not name or name.startswith("#"):
                    continue
                prompt = row.get("prompt") if "prompt" in row else row.get("text")
                styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "", str(path))
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as error:
        logger.warning("styles file %s not read: %s", path, error)
    return styles
