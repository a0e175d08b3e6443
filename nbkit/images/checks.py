"""Open one uploaded picture safely and turn it into an upright 8-bit RGB image, or say why not.

Phones and the web hand over every kind of file: EXIF-rotated JPEGs, CMYK exports, 16-bit PNGs,
palette GIFs with transparency, iPhone HEIC renamed to .jpg, truncated uploads, HTML pages saved as
.jpg, and the odd multi-gigapixel decompression bomb. `check_image` decodes the whole file (a header
that opens is no proof the pixels do), refuses what cannot be trained on with a reason and a fix, and
converts the rest, noting every conversion so the user can see what happened to their photo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nbkit.errors import NbkitError
from nbkit.images.buckets import Sizing

# A 108-megapixel phone photo still opens; a 20000x20000 header (1.2 GB of RGB) does not.
DEFAULT_MAX_PIXELS = 120_000_000
# Below this the picture carries nothing a model can learn from, whatever the training size.
MIN_SIDE = 32
ORIENTATION_TAG = 0x0112
WARNING_PREFIX = "warning: "


class BadImageError(NbkitError):
    """This one file cannot be used; the import reports it and goes on with the others."""


@dataclasses.dataclass
class CheckedImage:
    """A fully decoded, upright, 8-bit RGB picture and what was done to get it.

    Args:
        image: the RGB image, EXIF orientation applied.
        format: Pillow's name of the file format (`JPEG`, `PNG`, ...).
        notes: conversions made (CMYK to RGB, first frame of an animation, ...).
        warnings: problems worth the user's attention that did not stop the import.
    """

    image: Image.Image
    format: str
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def check_image(
    data: bytes,
    *,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    sizing: Sizing | None = None,
) -> CheckedImage:
    """Decode `data` completely and return it as an upright RGB image, or raise `BadImageError`.

    Args:
        data: the file's bytes.
        name: the file name, for messages.
        max_pixels: the decompression-bomb guard: larger images are refused before any pixel is decoded.
        sizing: the session's training size; a picture smaller than what it trains at (the square,
            or in buckets its bucket: a 90x300 photo fills a 64x256 bucket at 128 px) gets a warning.

    Raises:
        BadImageError: empty, not an image, truncated or corrupt, too large, or too small.
    """
    if not data:
        raise BadImageError(
            "empty file (0 bytes)",
            path=name,
            fix="upload or copy it again; the transfer was probably cut short",
        )
    if _is_heif(data) and not _register_heif_opener():
        raise BadImageError(
            "HEIC/HEIF photo (the iPhone format), which Pillow cannot read on its own",
            path=name,
            fix="export it as JPEG (iPhone: Settings > Camera > Formats > Most Compatible), "
            "or pip install pillow-heif and import it again",
        )
    with warnings.catch_warnings():
        # Our own max_pixels decides below; Pillow's warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data, name)
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(
                f"{width}x{height} pixels ({width * height / 1e6:.0f} megapixels) is over the "
                f"{max_pixels / 1e6:.0f}-megapixel limit that guards against decompression bombs",
                path=name,
                fix="downscale it (a few megapixels is plenty for training) and import it again",
            )
        checked = CheckedImage(image=image, format=image.format or "unknown")
        frames = getattr(image, "n_frames", 1)
        _decode(image, name)
    if frames > 1 and checked.format == "MPO":  # phones store depth maps and previews beside the photo
        checked.notes.append(f"multi-picture JPEG ({frames} images): the main picture is used")
    elif frames > 1:
        checked.notes.append(f"animated ({frames} frames): the first frame is used")
    checked.image = _upright(image, checked)
    checked.image = to_rgb(checked.image, checked.notes)
    short_side = min(checked.image.size)
    if short_side < MIN_SIDE:
        raise BadImageError(
            f"{checked.image.width}x{checked.image.height} pixels is too small to learn anything from",
            path=name,
            fix="use the full-size photo (at least "
            f"{sizing.resolution if sizing else 512} px on the short side is best)",
        )
    if sizing is not None and sizing.buckets:
        width, height = sizing.target(*checked.image.size)
        if checked.image.width < width or checked.image.height < height:
            checked.warnings.append(
                f"smaller than its {width}x{height} bucket, so upscaled (blurry: costs likeness); "
                "use the full-size photo if you have it"
            )
        return checked
    if sizing is not None and short_side < sizing.resolution:
        checked.warnings.append(
            f"smaller than the {sizing.resolution} px training size, so upscaled (blurry: costs likeness); "
            "use the full-size photo if you have it"
        )
    return checked


def pixel_sha256(image: Image.Image) -> str:
    """The sha256 of an RGB image's size and decoded pixels: the same picture gives the same hash
    whatever its file name, container, metadata or EXIF rotation."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, appending a note for every non-trivial conversion.

    Transparency is composited on white (what a viewer shows); 16-bit and float images are scaled,
    not clipped, to 8 bits; an embedded colour profile other than sRGB is converted to sRGB.

    Args:
        image: a decoded image.
        notes: the list that receives human-readable notes.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = _to_8_bit(image)
        notes.append(f"{'floating-point' if mode == 'F' else '16-bit'} image reduced to 8 bits")
        mode = image.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette image converted to RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return _flatten_alpha(image.convert("RGBA"), notes)
    if mode == "CMYK":
        converted = _profile_to_srgb(image)
        notes.append("CMYK converted to RGB" + (" with its colour profile" if converted else ""))
        return converted or image.convert("RGB")
    if mode in ("1", "L"):
        notes.append("grayscale image stored as RGB")
        return image.convert("RGB")
    if mode != "RGB":
        notes.append(f"{mode} image converted to RGB")
        return image.convert("RGB")
    converted = _profile_to_srgb(image)
    if converted is not None:
        notes.append("colour profile converted to sRGB")
        return converted
    return image


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = (
            f"{int(claimed.group(1)) / 1e6:.0f} megapixels" if claimed else "more pixels than Pillow allows"
        )
        raise BadImageError(
            f"too large to open safely: its header claims {size} (a decompression bomb, or a huge scan)",
            path=name,
            fix="downscale it (a few megapixels is plenty for training) and import it again",
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(
            f"not an image: the file holds {_describe_content(data)}",
            path=name,
            fix="use a JPEG, PNG or WebP photo",
        ) from None
    except Exception as error:  # Pillow's plugins raise assorted types on hostile headers
        raise BadImageError(
            f"not a readable image ({type(error).__name__}: {error})",
            path=name,
            fix="use a JPEG, PNG or WebP photo",
        ) from None


def _decode(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except MemoryError:
        raise BadImageError(
            "not enough memory to decode it", path=name, fix="downscale it and import it again"
        ) from None
    except Exception as error:  # any failure to decode the pixels means this file is damaged
        raise BadImageError(
            f"truncated or corrupt: {error}",
            path=name,
            fix="copy, export or download it again; the file is incomplete or damaged",
        ) from None


def _upright(image: Image.Image, checked: CheckedImage) -> Image.Image:
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        if orientation in (None, 1):
            return image
        upright = ImageOps.exif_transpose(image)
    except Exception:  # EXIF is free-form bytes; a broken block must not cost the photo
        checked.warnings.append("its EXIF data is unreadable, so any rotation it asks for is not applied")
        return image
    checked.notes.append(f"turned upright (EXIF orientation {orientation})")
    return upright


def _to_8_bit(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image)
    if image.mode == "F":
        pixels = pixels.astype(np.float64)
        finite = pixels[np.isfinite(pixels)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        pixels = np.nan_to_num(pixels * scale)
    elif image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        # 16-bit samples: 65535 / 257 == 255 maps the full range onto the full range.
        pixels = pixels.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(image: Image.Image, notes: list[str]) -> Image.Image:
    alpha_min, _ = image.getchannel("A").getextrema()
    if alpha_min == 255:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    notes.append("transparent areas filled with white")
    return Image.alpha_composite(background, image).convert("RGB")


def _profile_to_srgb(image: Image.Image) -> Image.Image | None:
    """Convert through an embedded ICC profile that is not already sRGB; None when there is none."""
    icc = image.info.get("icc_profile")
    if not icc:
        return None
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
            return None
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken or exotic profile: fall back to Pillow's plain conversion
        return None


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in (
        b"heic",
        b"heix",
        b"hevc",
        b"hevx",
        b"mif1",
        b"msf1",
        b"heim",
    )


def _register_heif_opener() -> bool:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _describe_content(data: bytes) -> str:
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (import the .zip itself)"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head")):
        return "a web page (HTML), not the picture it shows"
    if lowered.startswith(b"<svg") or b"<svg" in lowered:
        return "an SVG drawing, which needs converting to PNG first"
    text = head.decode("utf-8", errors="ignore")
    if b"\x00" not in head and text and all(char.isprintable() or char in "\r\n\t" for char in text):
        return "text"  # never its words: the report must not echo what a file holds
    return "data Pillow does not recognise as any image format"
