"""AUTOMATIC1111's API requests and responses: the request models, and their translation to and from
nbkit's `GenerationRequest` and `GenerationOutput` (A1111 keeps its models in `modules/api/models.py`).

Field names and defaults follow A1111; unknown request fields are ignored. `to_generation_request`
decodes the base64 images and maps A1111's fields (`hr_resize_x/y`, `alwayson_scripts`' ControlNet,
`override_settings.sd_vae`) onto `nbkit.webui.requests.make_request`, which checks the caps.
"""

from __future__ import annotations

import base64
import datetime
import io
from typing import Any

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from nbkit.generation.infotext import PNG_KEY, parse_infotext
from nbkit.generation.samplers import resolve
from nbkit.webui.requests import (
    DISTILLED_CFG_SCALE,
    ControlNetUnit,
    GenerationOutput,
    GenerationRequest,
    make_request,
)
from nbkit.webui.security import LimitError, Limits, decode_base64_image_bytes


class ApiError(Exception):
    """An error answered as A1111 answers: JSON `{error, detail, body, errors}` with `status`."""

    def __init__(self, status: int, detail: str, error: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or type(self).__name__


# --- request models (A1111's fields and defaults; unknown fields are ignored) ------------------------


class ApiRequest(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = DISTILLED_CFG_SCALE  # Forge's field: FLUX.1-dev's distilled guidance
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(ApiRequest):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ApiRequest):
    """POST /sdapi/v1/img2img (with `mask`: inpainting)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


# --- conversions -------------------------------------------------------------------------------------


def decode_image(text: str, limits: Limits, what: str) -> Image.Image:
    """A PIL image from base64 (raw or `data:` URL), refused above the byte and pixel caps."""
    data = decode_base64_image_bytes(text, limits, what)
    try:
        image = Image.open(io.BytesIO(data))
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
        raise LimitError(f"{what} is not a readable image: {error}", status=422) from None
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Raw base64 of a PNG carrying the infotext in its `parameters` chunk (no `data:` prefix)."""
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text(PNG_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _sampler(body: ApiRequest) -> tuple[str, str]:
    name = body.sampler_name or body.sampler_index or "Euler"
    scheduler = body.scheduler or "Automatic"
    try:
        resolve(name, scheduler)
    except ValueError as error:
        raise ApiError(400, str(error), "SamplerNotFound") from None
    return name, scheduler


def _controlnet(body: ApiRequest, limits: Limits) -> ControlNetUnit | None:
    """The first enabled unit of A1111's ControlNet extension arguments (`alwayson_scripts`)."""
    scripts = {key.lower(): value for key, value in (body.alwayson_scripts or {}).items()}
    args = (scripts.get("controlnet") or {}).get("args") or []
    for unit in args:
        if not isinstance(unit, dict) or unit.get("enabled", True) is False:
            continue
        model = unit.get("model") or "None"
        image = unit.get("input_image") or unit.get("image")
        if isinstance(image, dict):  # newer extension versions: {"image": ..., "mask": ...}
            image = image.get("image")
        if model == "None" or not image:
            continue
        module = str(unit.get("module") or "none").lower()
        preprocessor = "canny" if "canny" in module else "depth" if "depth" in module else "none"
        return ControlNetUnit(
            model=model,
            image=decode_image(image, limits, "the ControlNet input_image"),
            preprocessor=preprocessor,
            weight=float(unit.get("weight", 1.0)),
        )
    return None


def _hires_size(body: Txt2ImgRequest) -> tuple[int, int] | None:
    if not body.enable_hr:
        return None
    if body.hr_resize_x or body.hr_resize_y:
        width = body.hr_resize_x or round(body.width * body.hr_resize_y / body.height)
        height = body.hr_resize_y or round(body.height * body.hr_resize_x / body.width)
        return width, height
    return int(body.width * body.hr_scale), int(body.height * body.hr_scale)


def to_generation_request(body: ApiRequest, limits: Limits) -> GenerationRequest:
    """An A1111 request as nbkit's `GenerationRequest`, after the caps are checked.

    Raises:
        ApiError: an unknown sampler or schedule type (400), img2img without `init_images` (422).
        LimitError: a request above the caps (400/413), or an unreadable image (422).
    """
    txt2img = isinstance(body, Txt2ImgRequest)
    fields: dict[str, Any] = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        distilled_cfg_scale=body.distilled_cfg_scale,
        width=body.width,
        height=body.height,
        save_images=body.save_images,
    )
    if txt2img:
        fields.update(
            enable_hr=body.enable_hr,
            hr_scale=body.hr_scale,
            hr_upscaler=body.hr_upscaler or "Latent",
            hr_second_pass_steps=body.hr_second_pass_steps,
            denoising_strength=body.denoising_strength if body.denoising_strength is not None else 0.7,
        )
    else:
        assert isinstance(body, Img2ImgRequest)
        fields.update(
            mask_blur=body.mask_blur
            if body.mask_blur is not None
            else max(body.mask_blur_x, body.mask_blur_y),
            inpainting_fill=body.inpainting_fill,
            inpainting_mask_invert=bool(body.inpainting_mask_invert),
            resize_mode=body.resize_mode,
            denoising_strength=body.denoising_strength,
        )

    def read_inputs() -> dict[str, Any]:
        sampler, scheduler = _sampler(body)
        vae = (body.override_settings or {}).get("sd_vae")
        inputs: dict[str, Any] = dict(
            sampler_name=sampler,
            scheduler=scheduler,
            vae=None if vae in (None, "", "Automatic", "None") else vae,
            controlnet=_controlnet(body, limits),
        )
        if not txt2img:
            if not body.init_images:
                raise ApiError(
                    422, "img2img needs init_images: a list with at least one base64 image", "ValidationError"
                )
            inputs.update(
                init_image=decode_image(body.init_images[0], limits, "init_images[0]"),
                mask=decode_image(body.mask, limits, "mask") if body.mask else None,
            )
        return inputs

    # What the client left out takes the loaded model's own settings where it has them (A1111's declared
    # defaults above stay for the others): a few-step distilled model must not run 50 steps at CFG 7.
    given = body.model_fields_set
    left = [name for name in ("steps", "cfg_scale", "scheduler") if name not in given]
    if not given & {"sampler_name", "sampler_index"}:
        left.append("sampler_name")
    if txt2img and body.hr_upscaler is None:
        left.append("hr_upscaler")
    fields["model_defaults"] = tuple(left)
    mode = "txt2img" if txt2img else "inpaint" if body.mask else "img2img"
    final = _hires_size(body) if txt2img else None
    return make_request(mode, fields, limits, final_size=final, read_inputs=read_inputs)


def build_info(body: ApiRequest, request: GenerationRequest, output: GenerationOutput) -> dict[str, Any]:
    """The `info` dict of A1111's txt2img/img2img response (sent as a JSON string)."""
    seeds = output.seeds
    model = output.model
    count = len(output.images)
    sampler, _schedule = resolve(request.sampler_name, request.scheduler)
    # The CFG scale that ran, as the infotext names it: a distilled model ignores the one asked for.
    ran = parse_infotext(output.infotexts[0]).cfg_scale if output.infotexts else None
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": list(seeds),
        "subseed": body.subseed if body.subseed != -1 else (seeds[0] if seeds else -1),
        "all_subseeds": [body.subseed] * count if body.subseed != -1 else list(seeds),
        "subseed_strength": body.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler.name,
        "cfg_scale": request.cfg_scale if ran is None else ran,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.model_name if model else None,
        "sd_model_hash": model.hash if model else None,
        "sd_vae_name": request.vae,
        "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": request.denoising_strength
        if request.mode != "txt2img" or request.enable_hr
        else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(output.infotexts),
        "styles": list(body.styles),
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": _version(),
        "interrupted": output.interrupted,
    }


def _version() -> str:
    from nbkit.generation.generate import VERSION

    return VERSION


def echo_parameters(body: ApiRequest) -> dict[str, Any]:
    """The response's `parameters`: the request as received (without its images, as A1111)."""
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None  # as A1111: the images are not echoed unless asked for
        parameters["mask"] = None
    return parameters
