"""Checking a web UI or API request's own fields before anything loads.

Sizes, steps, seeds and samplers are checked by `nbkit.generation.generate.check_inputs`, with the
loaded model's family.
"""

from __future__ import annotations

from PIL import Image

from nbkit.webui import controlnet as cn
from nbkit.webui.requests import MODES, GenerationRequest


def check_request(request: GenerationRequest) -> None:
    """Check a request's own fields before anything loads; raises ValueError naming the bad value.

    (Sizes, steps, seeds and samplers are checked by `nbkit.generation.generate.check_inputs`.)

    Args:
        request: the request.
    """

    def whole(name: str, low: int, high: int | None = None) -> None:
        value = getattr(request, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be an integer {span}, got {value!r}")

    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {request.mode!r}")
    whole("batch_size", 1)
    whole("n_iter", 1)
    whole("resize_mode", 0, 3)
    if request.mode != "txt2img":
        if not isinstance(request.init_image, Image.Image):
            raise ValueError(f"{request.mode} needs an init image")
        strength = request.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise ValueError(f"denoising_strength must be in (0, 1], got {strength!r}")
        if isinstance(request.steps, int) and int(request.steps * strength) < 1:
            raise ValueError(
                f"denoising_strength {strength} of {request.steps} steps leaves no step to run; "
                "raise the steps or the strength"
            )
    if request.mode == "inpaint":
        if not isinstance(request.mask, Image.Image):
            raise ValueError("inpaint needs a mask (white: repaint)")
        whole("mask_blur", 0, 256)
        whole("inpainting_fill", 0, 3)
    for index, unit in enumerate(request.controlnet):
        name = f"ControlNet unit {index}"
        if unit.image is None and request.mode == "txt2img":
            raise ValueError(f"{name} needs an image (img2img and inpaint use the init image)")
        if unit.image is not None and not isinstance(unit.image, Image.Image):
            raise ValueError(f"{name}: image must be a picture, got {type(unit.image).__name__}")
        if unit.preprocessor.strip().lower() not in cn.PREPROCESSORS:
            raise ValueError(
                f"{name}: preprocessor must be one of {', '.join(cn.PREPROCESSORS)}, got {unit.preprocessor!r}"
            )
        # diffusers runs a ControlNet on the steps between start and end: start == end would run none.
        if not 0 <= unit.guidance_start < unit.guidance_end <= 1:
            raise ValueError(
                f"{name}: guidance must satisfy 0 <= start < end <= 1, got {unit.guidance_start}, "
                f"{unit.guidance_end}"
            )
        if unit.control_mode not in range(len(cn.CONTROL_MODES)) or unit.resize_mode not in range(3):
            raise ValueError(
                f"{name}: control_mode and resize_mode must be 0, 1 or 2, got {unit.control_mode}, "
                f"{unit.resize_mode}"
            )
