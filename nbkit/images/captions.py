"""Captions the fast-DreamBooth way, without its surprises.

The instance token comes from the file name, as fast-DreamBooth users expect: `zwx (3).jpg` -> `zwx`,
`phtmejhn (1).jpg` -> `phtmejhn`, `_` becomes a space and `(`, `)` and `-` go. Unlike fast-DreamBooth,
which deletes every digit, only a trailing *copy counter* is removed, so tokens with digits survive:

- stripped (repeatedly): ` (3)`, `_3`, `-3`, ` 3`, ` - Copy`, ` copy` at the end of the stem;
- kept: digits inside or glued to a word: `r2d2 (4).jpg` -> `r2d2`, `zwx3.jpg` -> `zwx3`;
- a stem that is nothing but a counter (`12.jpg`, `(1).jpg`) gives no token, with a warning.

Because `zwx1.jpg, zwx2.jpg` then give different tokens, a warning says so when tokens differ only by
trailing digits. A `.txt` file with the same stem as an image extends the token caption (the text
goes after the token, as fast-DreamBooth's external captions do) or overrides it (`mode="override"`).
The caption training uses is stored in session.json; `captions/<stem>.txt` mirrors it for people.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_text
from nbkit.images.common_words import COMMON_WORDS
from nbkit.images.report import ImageReport
from nbkit.session.manifest import ImageRecord

if TYPE_CHECKING:
    from nbkit.session.core import Session

CaptionMode = Literal["extend", "override"]
CAPTION_MODES: tuple[str, ...] = ("extend", "override")
MAX_CAPTION_BYTES = 64 * 1024
# CLIP reads 77 tokens including <bos> and <eos>; without a tokenizer, words are a rough stand-in.
MAX_CAPTION_WORDS = 60

_TRAILING_COUNTER = re.compile(r"(?:\s*\(\s*\d+\s*\)|[\s_-]+\d+|(?:\s+-)?\s+copy)$", re.IGNORECASE)
_ONLY_COUNTER = re.compile(r"[\d\s_()-]*")


def check_caption_mode(mode: str) -> str:
    if mode not in CAPTION_MODES:
        raise NbkitError(
            f"caption mode {mode!r} is not one nbkit knows",
            fix="use 'extend' (the .txt text goes after the token) or 'override' (the .txt text replaces it)",
        )
    return mode


def token_from_filename(name: str) -> str:
    """The instance token a file name gives, by the convention in this module's docstring.

    Args:
        name: a file name or path, e.g. `zwx (3).jpg`.
    """
    stem = unicodedata.normalize("NFC", PurePath(name.replace("\\", "/")).stem).strip()
    if _ONLY_COUNTER.fullmatch(stem):
        return ""
    while (match := _TRAILING_COUNTER.search(stem)) and match.start() > 0:
        stem = stem[: match.start()]
    words = stem.replace("_", " ").replace("(", " ").replace(")", " ").replace("-", "")
    return " ".join(words.split())


def normalise_caption(text: str) -> str:
    """One line, single spaces, no space before punctuation."""
    return re.sub(r"\s+([,.;:!?])", r"\1", " ".join(text.split()))


def compose_caption(token: str, text: str, mode: CaptionMode = "extend") -> str:
    """The caption from a token and a caption file's text.

    Args:
        token: the instance token from the file name.
        text: the caption file's text ("" when there is none).
        mode: `extend` puts the text after the token (unless it already starts with it); `override`
            uses the text alone.
    """
    check_caption_mode(mode)
    text = normalise_caption(text)
    if not text:
        return token
    if mode == "override" or not token or _starts_with_token(text, token):
        return text
    return normalise_caption(f"{token} {text}")


def decode_caption_file(data: bytes, name: str) -> str:
    """The text of a caption file: UTF-8 (with or without BOM), else Windows-1252 as Notepad wrote it.

    Args:
        data: the file's bytes.
        name: the file name, for messages.
    """
    if len(data) > MAX_CAPTION_BYTES:
        raise NbkitError(
            f"caption file is {len(data)} bytes; a caption is a line of text",
            path=name,
            fix="keep captions under a few hundred characters (CLIP reads about 75 tokens)",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def check_token(token: str, tokenizer=None) -> list[str]:
    """Warnings about an instance token: none, or why the model already has a meaning for it.

    A token warns when none of its words is rare: a common word from `COMMON_WORDS`, or a word that
    `tokenizer` (any CLIP tokenizer) encodes as one known token. A class word beside a rare one
    (`zwx man`) is fine.

    Args:
        token: the instance token.
        tokenizer: optional CLIP tokenizer for the model being trained.
    """
    if not token:
        return [
            "the file names give no instance token: rename the photos after a rare made-up word, "
            "e.g. 'zwx (1).jpg', 'zwx (2).jpg', or give every photo a caption"
        ]
    reasons = [_why_known(word, tokenizer) for word in token.split()]
    if not all(reasons):
        return []
    return [
        f"instance token '{token}': {'; '.join(dict.fromkeys(reasons))}. Its meaning fights your subject; "
        "rename the photos after a rare made-up word, e.g. 'zwx (1).jpg'"
    ]


def token_warnings(tokens: Iterable[str], tokenizer=None) -> list[str]:
    """Warnings about the tokens of a set of images (see `check_token`), plus counters glued to tokens.

    Args:
        tokens: the instance tokens of the images.
        tokenizer: optional CLIP tokenizer.
    """
    tokens = list(tokens)
    distinct = sorted(set(tokens), key=str.casefold)
    warnings = [warning for token in distinct for warning in check_token(token, tokenizer)]
    by_base: dict[str, list[str]] = {}
    for token in distinct:
        base = re.sub(r"\d+$", "", token)
        if base and base != token:
            by_base.setdefault(base.casefold(), []).append(token)
    for glued in by_base.values():
        if len(glued) > 1:
            warnings.append(
                f"the file names give {len(glued)} different tokens that differ only by a number "
                f"({', '.join(glued[:4])}{', ...' if len(glued) > 4 else ''}): digits glued to a word are "
                f"part of the token; for a counter write it as 'name (1).jpg'"
            )
    return warnings


def caption_warnings(caption: str, token: str, tokenizer=None) -> list[str]:
    """Warnings about one caption: too long for CLIP, or missing the instance token.

    Args:
        caption: the caption.
        token: the image's instance token.
        tokenizer: optional CLIP tokenizer, for an exact length check.
    """
    warnings = []
    if tokenizer is not None:
        length = len(tokenizer(caption)["input_ids"])
        too_long = length > tokenizer.model_max_length
    else:
        length, too_long = len(caption.split()), len(caption.split()) > MAX_CAPTION_WORDS
    if too_long:
        warnings.append(
            f"caption is long ({length} {'tokens' if tokenizer else 'words'}): CLIP reads about 75 tokens"
        )
    if token and not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", caption, re.IGNORECASE):
        warnings.append(f"caption does not contain the instance token '{token}'")
    return warnings


def find_record(session: Session, name: str) -> ImageRecord:
    """The session's image record for a processed file, its stem, or its original's name.

    Args:
        session: the session.
        name: e.g. `zwx (1).png`, `instance_images/zwx (1).png`, `zwx (1)` or `zwx (1).jpg`.
    """
    wanted = unicodedata.normalize("NFC", name).casefold()
    for record in session.manifest.images:
        keys = (
            record.file,
            PurePath(record.file).name,
            PurePath(record.file).stem,
            PurePath(record.original).name,
        )
        if wanted in (key.casefold() for key in keys):
            return record
    known = ", ".join(PurePath(record.file).name for record in session.manifest.images) or "none"
    raise NbkitError(f"no image named {name!r} in session {session.name}", fix=f"use one of: {known}")


def caption_path(session: Session, record: ImageRecord) -> Path:
    """`captions/<stem>.txt`, the human-readable mirror of a record's caption."""
    return session.dir("captions") / f"{PurePath(record.file).stem}.txt"


def write_caption_file(session: Session, record: ImageRecord) -> Path:
    """Write the mirror `captions/<stem>.txt` of a record's caption, atomically."""
    path = caption_path(session, record)
    atomic_write_text(path, record.caption + "\n")
    return path


def set_caption(session: Session, name: str, caption: str) -> ImageRecord:
    """Set one image's caption, save session.json, and update its `captions/<stem>.txt`.

    Args:
        session: the session.
        name: the image (see `find_record`).
        caption: the full caption training will use.
    """
    record = find_record(session, name)
    caption = normalise_caption(caption)
    if not caption:
        raise NbkitError(
            f"empty caption for {name!r}", fix=f"write at least the instance token, e.g. {record.token!r}"
        )
    record.caption = caption
    record.caption_source = "editor"
    session.save()
    write_caption_file(session, record)
    return record


def apply_caption_files(
    session: Session, folder: str | Path | None = None, *, mode: CaptionMode = "extend", tokenizer=None
) -> ImageReport:
    """Read `<stem>.txt` files from `folder` (default: the session's `captions/`) into the captions.

    Args:
        session: the session.
        folder: where the caption files are.
        mode: `extend` or `override` (see `compose_caption`).
        tokenizer: optional CLIP tokenizer for the warnings.
    """
    check_caption_mode(mode)
    folder = Path(folder) if folder is not None else session.dir("captions")
    if not folder.is_dir():
        raise NbkitError(
            "no such folder", path=folder, fix="give the folder that holds the .txt caption files"
        )
    report = ImageReport(title=f'Captions for session "{session.name}" from {folder}')
    records = {PurePath(record.file).stem.casefold(): record for record in session.manifest.images}
    changed: list[ImageRecord] = []
    for path in sorted(folder.glob("*.txt"), key=lambda path: path.name.casefold()):
        record = records.get(unicodedata.normalize("NFC", path.stem).casefold())
        if record is None:
            report.add(
                path.name, "warning", "matches no image in the session", fix="name it after an image's stem"
            )
            continue
        try:
            text = decode_caption_file(path.read_bytes(), path.name)
        except NbkitError as error:
            report.add(path.name, "error", error.message, fix=error.fix)
            continue
        caption = compose_caption(record.token, text, mode)
        if caption != record.caption:
            record.caption, record.caption_source = caption, "txt"
            changed.append(record)
        problems = caption_warnings(caption, record.token, tokenizer)
        report.add(
            path.name, "warning" if problems else "ok", "; ".join([f'caption: "{caption}"', *problems])
        )
    if changed:
        session.save()
        for record in changed:
            write_caption_file(session, record)
    report.warnings = token_warnings((record.token for record in session.manifest.images), tokenizer)
    return report


def _starts_with_token(text: str, token: str) -> bool:
    head = text[: len(token)]
    rest = text[len(token) : len(token) + 1]
    return head.casefold() == token.casefold() and not (rest.isalnum() or rest == "_")


def _why_known(word: str, tokenizer) -> str | None:
    if word.casefold() in COMMON_WORDS:
        return f"'{word}' is a common word the model already knows"
    if tokenizer is not None:
        from nbkit.tokenizers import is_known_word

        if is_known_word(tokenizer, word):
            return f"'{word}' is a single token in the model's vocabulary, a word it already knows"
    return None
