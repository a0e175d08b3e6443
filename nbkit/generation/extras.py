"""A1111's Extras ("postprocessing"): upscale a picture with one or two upscalers, blended.

`run_extras` follows A1111's `modules/postprocessing.py` with its Upscale script: "Scale by" a factor or
"Scale to" a size (the larger factor, then, with "Crop to fit", the picture centred on a canvas of that
size); a second upscaler's result blended in by its visibility; an upscaler_1 of "None" leaves the
picture as it is. nbkit has no face restorers: A1111 without one set up leaves the picture unchanged
and still writes the visibility into the info, and so does nbkit (`FACE_RESTORATION_NOTE` says so).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from nbkit.generation.upscalers import Upscalers, target_size

RESIZE_MODES = ("Scale by", "Scale to")  # A1111's resize_mode 0 and 1
FACE_RESTORATION_NOTE = "nbkit has no face restorers: GFPGAN and CodeFormer were not applied"


@dataclasses.dataclass(frozen=True)
class ExtrasSettings:
    """One extras job, with A1111's field names (`ExtrasBaseRequest`).

    Args:
        resize_mode: 0 scales by `upscaling_resize`, 1 to `upscaling_resize_w` x `upscaling_resize_h`.
        upscaling_resize: the factor of mode 0.
        upscaling_resize_w: the width of mode 1.
        upscaling_resize_h: the height of mode 1.
        upscaling_crop: in mode 1, centre the upscaled picture on a canvas of exactly that size.
        upscaler_1: the main upscaler ("None": no upscaling).
        upscaler_2: the second upscaler ("None": none).
        extras_upscaler_2_visibility: how much of the second upscaler's result is blended in (0..1).
        gfpgan_visibility: A1111's GFPGAN strength (nbkit has no face restorer: noted, not applied).
        codeformer_visibility: A1111's CodeFormer strength (likewise).
        codeformer_weight: A1111's CodeFormer weight (likewise).
    """

    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0

    def check(self, upscalers: Upscalers) -> None:
        """Refuse settings no picture can run with.

        Raises:
            ValueError: a resize mode other than 0 or 1, a factor or size that is not positive, a
                visibility outside [0, 1], or an unknown upscaler.
        """
        if self.resize_mode not in (0, 1):
            raise ValueError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode!r}")
        if self.resize_mode == 0 and not self.upscaling_resize > 0:
            raise ValueError(f"upscaling_resize must be above 0, got {self.upscaling_resize!r}")
        if self.resize_mode == 1 and not (self.upscaling_resize_w >= 1 and self.upscaling_resize_h >= 1):
            raise ValueError(
                f"upscaling_resize_w and _h must be at least 1, got {self.upscaling_resize_w}x"
                f"{self.upscaling_resize_h}"
            )
        for name in ("extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in (self.upscaler_1, self.upscaler_2):
            upscalers.check_available(name)

    def output_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """The sizes a picture of (width, height) is upscaled to, and cropped to (none without upscaling)."""
        if self.upscaler_1 == "None":
            return []
        sizes = [target_size(width, height, self.factor(width, height))]
        if self.resize_mode == 1 and self.upscaling_crop:
            sizes.append((self.upscaling_resize_w, self.upscaling_resize_h))
        return sizes

    def factor(self, width: int, height: int) -> float:
        """The upscale factor for a picture of (width, height)."""
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        return self.upscaling_resize


def run_extras(
    image: Image.Image, settings: ExtrasSettings, upscalers: Upscalers, *, max_pixels: int | None = None
) -> tuple[Image.Image, dict[str, Any]]:
    """A1111's extras on one picture: (the result, A1111's postprocessing info pairs).

    Args:
        image: the picture (converted to RGB, as A1111 does).
        settings: the job.
        upscalers: the upscalers on offer.
        max_pixels: the most pixels the result may have (None: no cap).
    """
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    first = upscalers.find(settings.upscaler_1) if settings.upscaler_1 != "None" else None
    second = upscalers.find(settings.upscaler_2) if settings.upscaler_2 != "None" else None
    if first is not None:

        def upscale(name: str) -> Image.Image:
            if settings.resize_mode == 1:
                info["Postprocess upscale to"] = (
                    f"{settings.upscaling_resize_w}x{settings.upscaling_resize_h}"
                )
            else:
                info["Postprocess upscale by"] = settings.upscaling_resize
            result = upscalers.upscale(
                image, name, settings.factor(image.width, image.height), max_pixels=max_pixels
            )
            if settings.resize_mode == 1 and settings.upscaling_crop:
                size = (settings.upscaling_resize_w, settings.upscaling_resize_h)
                canvas = Image.new("RGB", size)
                canvas.paste(result, (size[0] // 2 - result.width // 2, size[1] // 2 - result.height // 2))
                result = canvas
                info["Postprocess crop to"] = f"{size[0]}x{size[1]}"
            return result

        upscaled = upscale(first.name)
        info["Postprocess upscaler"] = first.name
        visibility = settings.extras_upscaler_2_visibility
        if second is not None and second.kind != "none" and visibility > 0:
            upscaled = Image.blend(upscaled, upscale(second.name), visibility)
            info["Postprocess upscaler 2"] = second.name
        image = upscaled
    if settings.gfpgan_visibility > 0:
        info["GFPGAN visibility"] = round(settings.gfpgan_visibility, 3)
    if settings.codeformer_visibility > 0:
        info["CodeFormer visibility"] = round(settings.codeformer_visibility, 3)
        info["CodeFormer weight"] = round(settings.codeformer_weight, 3)
    return image, info


def uses_face_restoration(settings: ExtrasSettings) -> bool:
    """Whether the job asks for a face restorer (which nbkit does not have)."""
    return settings.gfpgan_visibility > 0 or settings.codeformer_visibility > 0
