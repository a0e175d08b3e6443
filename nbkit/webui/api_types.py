"""The A1111 API's building blocks: its error, value types with ranges, and base64 image codecs.

`ApiError` is answered as A1111 answers (`{error, detail, body, errors}` with a status);
`field_error` makes a FastAPI-shaped 422 naming a field's path. The value types (`Whole`, `Seed`,
`Fraction`, `Prompt`, `Name`, ...) bound what A1111 leaves unbounded, and `STRICT` refuses `NaN` and
`Infinity` while ignoring unknown fields, as A1111's models do. `decode_image` reads a base64 image (raw
or a `data:` URL) within the server's caps; `encode_b64` writes one in the `samples_format`.
The request models (`nbkit.webui.api_models`) and the ControlNet units (`nbkit.webui.controlnet_units`)
are built from these.
"""

from __future__ import annotations

import base64
import difflib
import io
import math
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import AfterValidator, ConfigDict, Field

from nbkit.generation.generate import MAX_SEED
from nbkit.webui.outputs import ImageFormat, encode_image
from nbkit.webui.security import LimitError, Limits, decode_base64_image_bytes


class ApiError(Exception):
    """An error answered as A1111 answers: JSON `{error, detail, body, errors}` with `status`."""

    def __init__(self, status: int, detail: str, error: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or type(self).__name__


def field_error(
    loc: tuple[str | int, ...], message: str, kind: str = "value_error", value: Any = None
) -> RequestValidationError:
    """A 422 on one field, in the shape of FastAPI's own validation errors (`loc` starts at `body`).

    Args:
        loc: the field's path under the body.
        message: what is wrong.
        kind: the error type.
        value: the value refused (its `input`).
    """
    return RequestValidationError([{"type": kind, "loc": ("body", *loc), "msg": message, "input": value}])


def path_loc(path: str) -> tuple[str | int, ...]:
    """A field path as written in messages (`init_images[0]`, `alwayson_scripts.controlnet.args.0.image`)
    as a validation error's `loc`."""
    parts = path.replace("[", ".").replace("]", "").split(".")
    return tuple(int(part) if part.isdigit() else part for part in parts if part)


def close_names(name: str, known: Any) -> str:
    """`; close names: a, b` for the known names nearest `name` (empty when none is near)."""
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(str(name).lower(), [k.lower() for k in known], n=3, cutoff=0.6)
        close = [k for k in known if k.lower() in close]
    return f"; close names: {', '.join(close)}" if close else ""


# --- value types: A1111's fields with ranges where A1111 has none ------------------------------------

MAX_PROMPT_CHARS = 65536  # far above any prompt (CLIP reads 77 tokens a chunk); bounds the tokenizer's work
MAX_NAME_CHARS = 1024  # a sampler, checkpoint or module name
MAX_LIST_ITEMS = 64  # styles, init images, ControlNet units, script args
INT32 = 2**31 - 1

Whole = Annotated[int, Field(ge=-INT32, le=INT32)]
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Guidance = Annotated[float, Field(ge=0.0, le=100.0)]
Real = Annotated[float, Field(ge=-1e6, le=1e6)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Names = Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)]


def _finite(value: Any, depth: int = 0) -> Any:
    """Refuse NaN or Infinity anywhere in free-form JSON (script args, comments): they cannot be echoed."""
    if depth > 32:
        raise ValueError("nested too deeply (at most 32 levels)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must not hold NaN or Infinity")
    if isinstance(value, dict):
        for item in value.values():
            _finite(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _finite(item, depth + 1)
    return value


FreeList = Annotated[list[Any], Field(max_length=MAX_LIST_ITEMS), AfterValidator(_finite)]
FreeDict = Annotated[dict[str, Any], Field(max_length=MAX_LIST_ITEMS), AfterValidator(_finite)]
STRICT = ConfigDict(extra="ignore", allow_inf_nan=False)


def image_bytes(text: str, limits: Limits, what: str) -> bytes:
    """The bytes of a base64 image (raw or `data:` URL), refused above the byte cap (413); text that
    is not base64 is a 422 on the field `what` names."""
    try:
        return decode_base64_image_bytes(text, limits, what)
    except LimitError as error:
        if error.status != 422:
            raise
        raise field_error(path_loc(what), str(error), value=_shown(text)) from None


def _shown(text: Any) -> Any:
    """A refused value as an error shows it: long text (a base64 image) cut to its start."""
    return text[:64] + "..." if isinstance(text, str) and len(text) > 64 else text


def decode_image(text: str, limits: Limits, what: str) -> Image.Image:
    """A PIL image from base64 (raw or `data:` URL), refused above the byte and pixel caps; an
    unreadable one is a 422 on the field `what` names."""
    data = image_bytes(text, limits, what)
    try:
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # PIL's own bound, far above this server's
            raise LimitError(
                f"{what} declares a picture of more than {Image.MAX_IMAGE_PIXELS} pixels, above this "
                "server's limit",
                fix="send a smaller image",
            ) from None
        # Check the header's size before decoding pixels: a small file can declare a huge image.
        if image.width * image.height > 4 * limits.max_pixels:
            raise LimitError(
                f"{what} is {image.width}x{image.height}, above this server's limit",
                fix="send a smaller image",
            )
        image.load()
    except LimitError:
        raise
    except Exception as error:  # PIL raises many types for a broken file
        raise field_error(
            path_loc(what),
            f"{what} is not a readable image ({type(error).__name__}): send a PNG, JPEG or WebP as base64 "
            "(raw or a data: URL)",
            value=_shown(text),
        ) from None
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Raw base64 of a PNG carrying the infotext in its `parameters` chunk (no `data:` prefix)."""
    return encode_b64(image, infotext, ImageFormat())


def encode_b64(image: Image.Image, infotext: str | None, fmt: ImageFormat) -> str:
    """Raw base64 of the image in `fmt` with its infotext where A1111 writes it (no `data:` prefix)."""
    return base64.b64encode(encode_image(image, infotext, fmt)).decode("ascii")
