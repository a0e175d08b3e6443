"""AUTOMATIC1111 infotext: the "parameters" text A1111 writes into every image, and reads back.

An infotext is the prompt (any number of lines), then `Negative prompt: ...` (any number of lines)
when there is one, then one line of `Key: value` pairs:

    a photo of sks dog
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512

FLUX.1-dev images also carry Forge's `Distilled CFG Scale: 3.5` (the distilled guidance; `CFG scale`
is then the true CFG, 1 when off), read back by `Infotext.distilled_cfg_scale`.

A value that holds `,`, `:` or a newline is JSON-quoted, as A1111 does; nbkit also quotes the values
A1111 would read back differently (empty, starting with `"`, or with leading/trailing spaces). The
last line counts as parameters only when it holds at least three pairs (A1111's rule, so a prompt like
`style: anime, masterpiece` is not mistaken for them). `parse_infotext(format_infotext(...))` gives
back exactly what was written.

PNGs carry the text in a `parameters` text chunk; A1111's JPEG and WebP files carry it in the EXIF
UserComment. `save_image` writes either; `read_infotext` reads both.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from nbkit.fsio import atomic_path, retry_io

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111's own pattern for one `Key: value` pair (modules/infotext_utils.py).
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
MIN_PARAMS = 3
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
# EXIF UserComment starts with an 8-byte character code; A1111 (piexif) writes UNICODE + UTF-16BE.
UNICODE_CODE = b"UNICODE\0"
ASCII_CODE = b"ASCII\0\0\0"


def quote(value: Any) -> str:
    """A value as it goes after `Key: `: whole floats without `.0`, JSON-quoted when it must be.

    Args:
        value: a number, string or anything with a `str()`.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    needs_quotes = (
        any(char in text for char in ",:\n")
        or not text
        or text.startswith('"')
        or text != text.strip()  # A1111's parser drops surrounding spaces
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def unquote(text: str) -> str:
    """The value of a `Key: value` pair as written (inverse of `quote` for strings)."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def format_parameters(parameters: dict[str, Any]) -> str:
    """The `Key: value, ...` line; None values are skipped.

    Args:
        parameters: ordered pairs; keys are A1111's ("Steps", "CFG scale", ...).
    """
    return ", ".join(f"{key}: {quote(value)}" for key, value in parameters.items() if value is not None)


def format_infotext(prompt: str, negative_prompt: str, parameters: dict[str, Any]) -> str:
    """An A1111 infotext: the prompt, `Negative prompt: ...` when given, then `Key: value` pairs.

    Args:
        prompt: the positive prompt (may span lines).
        negative_prompt: the negative prompt ("" for none).
        parameters: ordered `Key: value` pairs; None values are skipped.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(format_parameters(parameters))
    return "\n".join(lines)


def parse_parameters(line: str) -> dict[str, str]:
    """The pairs of a `Key: value, ...` line, values unquoted, in order (A1111's parser)."""
    return {key: unquote(value) for key, value in PARAM_RE.findall(line)}


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


@dataclasses.dataclass
class Infotext:
    """A parsed infotext.

    `parameters` keeps every pair as written (strings, in order), so `str(infotext)` gives the text
    back; the properties read the common ones as A1111 does.

    Args:
        prompt: the positive prompt.
        negative_prompt: the negative prompt ("" when there was none).
        parameters: key -> value of the last line.
    """

    prompt: str
    negative_prompt: str = ""
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return format_infotext(self.prompt, self.negative_prompt, self.parameters)

    @property
    def steps(self) -> int | None:
        return _int(self.parameters.get("Steps"))

    @property
    def seed(self) -> int | None:
        return _int(self.parameters.get("Seed"))

    @property
    def cfg_scale(self) -> float | None:
        return _float(self.parameters.get("CFG scale"))

    @property
    def distilled_cfg_scale(self) -> float | None:
        """FLUX.1-dev's distilled guidance, under Forge's key `Distilled CFG Scale`."""
        return _float(self.parameters.get("Distilled CFG Scale"))

    @property
    def denoising_strength(self) -> float | None:
        return _float(self.parameters.get("Denoising strength"))

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) from `Size: WxH`."""
        match = SIZE_RE.match(self.parameters.get("Size", ""))
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def sampler(self) -> str | None:
        """The sampler, without the schedule a legacy name ("DPM++ 2M Karras") carries."""
        from nbkit.generation.samplers import split_legacy_name

        name = self.parameters.get("Sampler")
        return split_legacy_name(name)[0] if name is not None else None

    @property
    def schedule(self) -> str:
        """The schedule type: `Schedule type`, else a legacy sampler name's suffix, else "Automatic"."""
        from nbkit.generation.samplers import split_legacy_name

        if "Schedule type" in self.parameters:
            return self.parameters["Schedule type"]
        name = self.parameters.get("Sampler")
        suffix = split_legacy_name(name)[1] if name is not None else None
        return suffix or "Automatic"

    def to_a1111(self) -> dict[str, str]:
        """The dict A1111's `parse_generation_parameters` returns (its API's png-info `parameters`).

        Prompt and negative prompt under "Prompt" and "Negative prompt", `WxH` values split into
        `Key-1` and `Key-2`, legacy sampler names split into "Sampler" and "Schedule type".
        """
        result = {"Prompt": self.prompt, "Negative prompt": self.negative_prompt}
        for key, value in self.parameters.items():
            match = SIZE_RE.match(value)
            if match:
                result[f"{key}-1"], result[f"{key}-2"] = match.group(1), match.group(2)
            else:
                result[key] = value
        if "Sampler" in result:
            result["Sampler"] = self.sampler
        result["Schedule type"] = self.schedule
        return result


def parse_infotext(text: str) -> Infotext:
    """Parse an infotext written by nbkit or A1111.

    Multi-line prompts and negative prompts, JSON-quoted values, a missing negative prompt and a
    missing parameters line are all read. Windows line ends count as newlines; surrounding blank
    space of the whole text is ignored.

    Args:
        text: the infotext.
    """
    *lines, last = text.replace("\r\n", "\n").rstrip().split("\n")
    if len(PARAM_RE.findall(last)) < MIN_PARAMS:
        lines, last = [*lines, last], ""
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            negative_lines = []
            line = line[len(NEGATIVE_PREFIX) :]
            line = line[1:] if line.startswith(" ") else line
        (prompt_lines if negative_lines is None else negative_lines).append(line)
    return Infotext("\n".join(prompt_lines), "\n".join(negative_lines or []), parse_parameters(last))


def _png_info(infotext: str | None, extra_text: dict[str, str] | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    # PIL writes an iTXt (UTF-8) chunk when the text is not Latin-1, as A1111's own writer does.
    if infotext is not None:
        info.add_text(PNG_KEY, infotext)
    for key, value in (extra_text or {}).items():
        info.add_text(key, value)
    return info


def _exif(infotext: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_CODE + infotext.encode("utf-16-be")
    return exif


def save_image(
    image: Image.Image,
    path: str | os.PathLike,
    infotext: str | None,
    *,
    extra_text: dict[str, str] | None = None,
    quality: int = 95,
) -> Path:
    """Save `image` atomically with its infotext, where A1111 puts it.

    PNG: a `parameters` text chunk (plus `extra_text` chunks). JPEG and WebP (by the file suffix): the
    EXIF UserComment, UTF-16 as A1111 writes it.

    Args:
        image: the image.
        path: where to save it; `.png`, `.jpg`/`.jpeg` or `.webp`.
        infotext: the text to embed (None for none).
        extra_text: more PNG text chunks (key -> text); PNG only.
        quality: JPEG/WebP quality.

    Returns:
        `path`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        kwargs: dict[str, Any] = {"format": "PNG", "pnginfo": _png_info(infotext, extra_text)}
    elif suffix in (".jpg", ".jpeg", ".webp"):
        if extra_text:
            raise ValueError(f"extra_text is only written into PNG files, not {path.name}")
        kwargs = {"format": "WEBP" if suffix == ".webp" else "JPEG", "quality": quality}
        if infotext is not None:
            kwargs["exif"] = _exif(infotext)
        image = image.convert("RGB") if kwargs["format"] == "JPEG" else image
    else:
        raise ValueError(f"cannot save {path.name}: the suffix must be .png, .jpg, .jpeg or .webp")
    with atomic_path(path) as tmp:
        image.save(tmp, **kwargs)
    return path


def _decode_user_comment(data: bytes | str) -> str | None:
    if isinstance(data, str):
        return data
    code, body = data[:8], data[8:]
    if code == UNICODE_CODE:
        # piexif writes big-endian; some tools write little-endian with a BOM.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        return body.decode("utf-16-be", errors="replace")
    if code == ASCII_CODE:
        return body.decode("ascii", errors="replace")
    return data.decode("utf-8", errors="replace") if data else None


def image_infotext(image: Image.Image) -> str | None:
    """The infotext of an opened image: its PNG `parameters` text or its EXIF UserComment, else None.

    Args:
        image: a PIL image as opened (before conversion, which drops the metadata).
    """
    text = image.info.get(PNG_KEY)
    if isinstance(text, str):
        return text
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    return _decode_user_comment(comment) if comment else None


def read_infotext(source: str | os.PathLike | bytes | Image.Image) -> str | None:
    """The infotext stored in an image file (PNG, JPEG or WebP), or None when it has none.

    Args:
        source: a path, the file's bytes, or an opened PIL image.
    """
    if isinstance(source, Image.Image):
        return image_infotext(source)
    if isinstance(source, bytes):
        with Image.open(io.BytesIO(source)) as image:
            return image_infotext(image)
    data = retry_io(Path(source).read_bytes, what=f"reading {source}")
    with Image.open(io.BytesIO(data)) as image:
        return image_infotext(image)
