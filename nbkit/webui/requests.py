"""The web UI's and the API's requests to the generation service, and what comes back.

`GenerationRequest` holds one request with A1111's field names and the web UI's defaults. The API
(`nbkit.webui.api_models`) and the UI (`nbkit.webui.ui`) parse their values into A1111-named fields and
hand them to `make_request`, which checks the server's caps (`nbkit.webui.security.check_request_caps`)
and keeps the fields the mode uses. The tables the UI's menus and the API's lists share are here too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

from PIL import Image

from nbkit.generation.hires import LATENT_UPSCALERS
from nbkit.generation.upscalers import KNOWN_UPSCALERS, PIL_UPSCALERS
from nbkit.webui.models import ModelEntry
from nbkit.webui.outputs import PNG, ImageFormat
from nbkit.webui.security import Limits, check_request_caps

Mode = Literal["txt2img", "img2img", "inpaint"]
MODES = ("txt2img", "img2img", "inpaint")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
# The hires fix upscalers of the UI's menu, in A1111's order: the latent modes, the PIL upscalers and the
# known downloadable models (the upscalers folder's own files join them when the page opens).
HR_UPSCALERS = (*LATENT_UPSCALERS, *PIL_UPSCALERS, *KNOWN_UPSCALERS)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")  # A1111's resize_mode 0..2
DISTILLED_CFG_SCALE = 3.5  # Forge's default "Distilled CFG Scale" (FLUX.1-dev's guidance)
# The fields a request may leave to the loaded model (`GenerationRequest.model_defaults`).
MODEL_DEFAULT_FIELDS = ("steps", "cfg_scale", "sampler_name", "scheduler", "hr_upscaler")
PIXEL_UPSCALER = "Lanczos"  # the hires upscaler a model that packs its latents gets when none is named

# What `make_request` keeps: every mode's fields, the hires fix's (txt2img with `enable_hr`), and those
# of the modes that start from an image.
_COMMON_FIELDS = (
    "prompt", "negative_prompt", "seed", "batch_size", "n_iter", "steps", "cfg_scale", "distilled_cfg_scale",
    "width", "height", "sampler_name", "scheduler", "vae", "controlnet", "save_images", "model_defaults",
    "styles", "save_format", "clip_skip",
)  # fmt: skip
_HIRES_FIELDS = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength")
_IMAGE_FIELDS = (
    "init_image", "mask", "mask_blur", "inpainting_fill", "inpainting_mask_invert", "resize_mode",
    "denoising_strength",
)  # fmt: skip


@dataclasses.dataclass
class ControlNetUnit:
    """One ControlNet applied to a request (a unit of the sd-webui-controlnet extension).

    Args:
        model: a ControlNet name, hub repo id or local folder (`nbkit.webui.controlnet.find_controlnet`).
        image: the input picture (preprocessed unless `preprocessor` is `none`); None in img2img and
            inpaint: the init image, fitted with the request's resize mode (as the extension does).
        preprocessor: `canny`, `depth` or `none` (the image already is a control map).
        weight: the conditioning scale.
        guidance_start: the fraction of the steps where the ControlNet starts acting.
        guidance_end: the fraction of the steps where it stops.
        low_threshold: Canny's low threshold.
        high_threshold: Canny's high threshold.
        mask: the extension's mask over the image: a scribble drawn on a canvas (see
            `nbkit.webui.controlnet.unit_picture`), or None.
        resize_mode: how the map is fitted to the generation size: 0 just resize, 1 crop and resize,
            2 resize and fill.
        processor_res: the short side Canny sees the picture at (`pixel_perfect` off).
        pixel_perfect: make the map at the generation size (the picture is fitted first).
        control_mode: 0 balanced, 1 my prompt is more important, 2 ControlNet is more important.
        module: the extension's module name the client gave, for the infotext (None: `preprocessor`).
    """

    model: str
    image: Image.Image | None
    preprocessor: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    low_threshold: int = 100
    high_threshold: int = 200
    mask: Image.Image | None = None
    resize_mode: int = 1
    processor_res: int = 512
    pixel_perfect: bool = False
    control_mode: int = 0
    module: str | None = None


@dataclasses.dataclass
class GenerationRequest:
    """One request, with A1111's field names and the web UI's defaults.

    Args:
        mode: `txt2img`, `img2img` or `inpaint`.
        prompt: the prompt; `<lora:NAME:WEIGHT>` tags in it apply LoRAs.
        negative_prompt: the negative prompt.
        seed: the first image's seed (image i gets seed + i); -1 draws one.
        batch_size: images per pipeline call.
        n_iter: batches (A1111's batch count).
        steps: sampling steps.
        cfg_scale: classifier-free guidance (FLUX.1: true CFG, only above 1 with a negative prompt).
        distilled_cfg_scale: FLUX.1-dev's distilled guidance (Forge's "Distilled CFG Scale").
        clip_skip: A1111's "Clip skip" (its `CLIP_stop_at_last_layers` option): 1 is the text encoder's
            last layer, 2 the one before, ...
        width: image width (multiple of 8).
        height: image height (multiple of 8).
        sampler_name: an A1111 sampler ("Euler a", "DPM++ 2M Karras", ...).
        scheduler: an A1111 schedule type ("Automatic", "Karras", ...).
        denoising_strength: img2img/inpaint strength, and the hires pass's.
        init_image: the img2img/inpaint source picture.
        mask: the inpaint mask (white: repaint).
        mask_blur: pixels of blur on the mask edge.
        inpainting_mask_invert: repaint the black part instead.
        inpainting_fill: A1111's masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
        resize_mode: A1111's: 0 just resize, 1 crop and resize, 2 resize and fill.
        enable_hr: txt2img hires fix: upscale, then a second img2img pass.
        hr_scale: the upscale factor.
        hr_upscaler: a latent mode, a PIL upscaler or a model upscaler's name (another is done with Lanczos).
        hr_second_pass_steps: steps of the second pass (0: as many as `steps`).
        vae: a VAE to use instead of the model's (None: the model's).
        controlnet: the ControlNet units, applied together (empty: none).
        save_images: save into the outputs folder.
        save_format: the saved files' format (A1111's `samples_format` and its options).
        styles: A1111 prompt style names to apply to the prompts.
        model_defaults: the fields an API client left out (of `MODEL_DEFAULT_FIELDS`): they take the loaded
            model's own settings where its family has them (`Family.generation_defaults` with `own`:
            Z-Image-Turbo's 8 steps at CFG 1, say), and `hr_upscaler` a pixel upscaler for a model
            whose latents cannot be upscaled; otherwise they keep the values given (A1111's defaults).
    """

    mode: Mode = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = DISTILLED_CFG_SCALE
    clip_skip: int = 1
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    denoising_strength: float = 0.75
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    inpainting_fill: int = 1
    resize_mode: int = 0
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    vae: str | None = None
    controlnet: list[ControlNetUnit] = dataclasses.field(default_factory=list)
    save_images: bool = True
    save_format: ImageFormat = PNG
    styles: list[str] = dataclasses.field(default_factory=list)
    model_defaults: tuple[str, ...] = ()


@dataclasses.dataclass
class GenerationOutput:
    """What a request made.

    Args:
        images: the images, in order.
        infotexts: each image's A1111 infotext.
        seeds: each image's seed.
        paths: where they were saved (empty when not saved).
        request: the request.
        model: the checkpoint used.
        interrupted: True when stopped early.
        seconds: wall time.
        control_images: the control map of each ControlNet unit.
        warnings: what was not done as asked: sampler and schedule fallbacks and substitutions (`Sampler substitution:
            ...`; `nbkit.generation.samplers.SamplerNote`), for the API's `info`.
    """

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    paths: list[Any]
    request: GenerationRequest
    model: ModelEntry | None
    interrupted: bool = False
    seconds: float = 0.0
    control_images: list[Image.Image] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Progress:
    """A snapshot of the running job (A1111's /progress `state`).

    Args:
        job: a short name of the running job ("" when idle).
        job_no: the batch being drawn (0-based).
        job_count: batches in the job (0 when idle).
        sampling_step: steps done in this batch.
        sampling_steps: steps in this batch.
        interrupted: interrupt was asked.
        skipped: skip was asked.
        started: when the job started (time.time()), or None.
        preview: a small preview of the current image, when one was made.
        textinfo: a line for people ("Loading model ...", "Step 3/20").
    """

    job: str = ""
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float | None = None
    preview: Image.Image | None = None
    textinfo: str = ""

    @property
    def fraction(self) -> float:
        """How far the job is, 0..1."""
        if not self.job_count:
            return 0.0
        within = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)

    @property
    def eta(self) -> float:
        """Seconds left, estimated from the time so far."""
        if self.started is None or self.fraction <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / self.fraction - elapsed


def make_request(
    mode: Mode,
    fields: dict[str, Any],
    limits: Limits,
    *,
    final_size: tuple[int, int] | None = None,
    read_inputs: Callable[[], dict[str, Any]] | None = None,
) -> GenerationRequest:
    """A `GenerationRequest` from an API body's or a UI form's A1111-named fields, after the caps.

    The caps go first: the size, steps and image count, and with the hires fix its final size and
    second-pass steps. Only then does `read_inputs` read what is costly or checked on its own (images,
    the API's sampler), so a request above the caps decodes nothing. Of the fields, the request keeps
    those of its mode: the hires fix's for txt2img with `enable_hr`, the image ones for img2img and
    inpaint; a field not given keeps `GenerationRequest`'s default.

    Args:
        mode: `txt2img`, `img2img` or `inpaint`.
        fields: `GenerationRequest` fields by name; `width`, `height`, `steps`, `batch_size` and `n_iter`
            are required.
        limits: the request caps.
        final_size: the hires fix's final size, when the request gives it (A1111's `hr_resize_x/y`); the
            hires scale then is its width over `width`. None: `hr_scale` times the size.
        read_inputs: returns more fields, read once the caps pass (None: none).

    Raises:
        LimitError: a request above the caps.
    """
    width, height = fields["width"], fields["height"]
    hires = mode == "txt2img" and bool(fields.get("enable_hr"))
    scale = fields.get("hr_scale", 2.0)
    final = final_size or (int(width * scale), int(height * scale))
    check_request_caps(
        width=width,
        height=height,
        steps=fields["steps"],
        batch_size=fields["batch_size"],
        n_iter=fields["n_iter"],
        limits=limits,
        final_size=final if hires else None,
        second_pass_steps=fields.get("hr_second_pass_steps", 0),
    )
    if read_inputs is not None:
        fields = {**fields, **read_inputs()}
    names = _COMMON_FIELDS + (_HIRES_FIELDS if hires else ()) + (_IMAGE_FIELDS if mode != "txt2img" else ())
    kept = {name: fields[name] for name in names if name in fields}
    if hires and final_size is not None:
        kept["hr_scale"] = final_size[0] / width
    return GenerationRequest(mode=mode, **kept)
