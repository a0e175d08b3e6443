"""AUTOMATIC1111's API requests and responses: the request models, and their translation to and from
nbkit's `GenerationRequest` and `GenerationOutput` (A1111 keeps its models in `modules/api/models.py`).

Field names and defaults follow A1111; unknown request fields are ignored. Every value is checked
where it is parsed, so a bad one is a 422 naming its field path before anything queues: numbers are
finite (JSON's `NaN` and `Infinity` are refused) and within ranges that make sense where A1111 sets
none (a seed fits `torch.Generator`, a fraction is in [0, 1], a prompt is at most `MAX_PROMPT_CHARS`).
The server's own caps (size, steps, images) stay in `nbkit.webui.security` and answer 400 with the cap.

`alwayson_scripts` takes the scripts nbkit has (ControlNet); another name is a 422, as A1111 answers
for an always-on script it does not have. `override_settings` and `POST /options` take A1111's option
names of `OPTION_TYPES` with typed values; an unknown name is a 422 listing close names.

`to_generation_request` decodes the base64 images and maps A1111's fields (`hr_resize_x/y`,
`alwayson_scripts`' ControlNet, `override_settings.sd_vae`) onto `nbkit.webui.requests.make_request`,
which checks the caps.
"""

from __future__ import annotations

import base64
import datetime
import difflib
import io
import math
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from PIL import Image, PngImagePlugin
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from nbkit.generation.generate import MAX_SEED
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


def field_error(
    loc: tuple[str | int, ...], message: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 on one field, in the shape of FastAPI's own validation errors (`loc` starts at `body`)."""
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": kind}])


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


# --- A1111's options (GET/POST /options, override_settings): one table of names and value types -------

Flag = bool
Text = Name
Texts = Names
OPTION_TYPES: dict[str, Any] = {
    # the checkpoint and its parts (sd_model_checkpoint switches the model; the others are kept)
    "sd_model_checkpoint": Text, "sd_checkpoint_hash": Text | None, "sd_vae": Text, "sd_unet": Text,
    "sd_lora": Text, "sd_hypernetwork": Text, "sd_checkpoints_limit": Whole,
    "sd_checkpoints_keep_in_cpu": Flag, "sd_checkpoint_cache": Whole, "sd_vae_checkpoint_cache": Whole,
    "sd_vae_overrides_per_model_preferences": Flag, "sd_vae_encode_method": Text,
    "sd_vae_decode_method": Text, "auto_vae_precision": Flag,
    "CLIP_stop_at_last_layers": Annotated[int, Field(ge=1, le=12)],
    # sampling
    "eta_noise_seed_delta": Annotated[int, Field(ge=0, le=INT32)], "eta_ancestral": Real, "eta_ddim": Real,
    "ddim_discretize": Text, "s_churn": Real, "s_tmin": Real, "s_tmax": Real, "s_noise": Real,
    "s_min_uncond": Real, "sigma_min": Real, "sigma_max": Real, "rho": Real, "k_sched_type": Text,
    "always_discard_next_to_last_sigma": Flag, "sgm_noise_multiplier": Flag, "uni_pc_variant": Text,
    "uni_pc_skip_type": Text, "uni_pc_order": Whole, "uni_pc_lower_order_final": Flag,
    "randn_source": Text, "enable_quantization": Flag, "enable_emphasis": Flag,
    "enable_batch_seeds": Flag, "comma_padding_backtrack": Whole, "upcast_attn": Flag, "tiling": Flag,
    "token_merging_ratio": Real, "token_merging_ratio_img2img": Real, "token_merging_ratio_hr": Real,
    "pad_cond_uncond": Flag, "persistent_cond_cache": Flag, "batch_cond_uncond": Flag,
    "cross_attention_optimization": Text, "use_old_emphasis_implementation": Flag,
    "use_old_karras_scheduler_sigmas": Flag, "no_dpmpp_sde_batch_determinism": Flag,
    "use_old_hires_fix_width_height": Flag, "hires_fix_use_firstpass_conds": Flag,
    "use_old_scheduling": Flag, "dont_fix_second_order_samplers_schedule": Flag,
    # img2img and inpainting
    "initial_noise_multiplier": Real, "img2img_extra_noise": Real, "inpainting_mask_weight": Real,
    "img2img_color_correction": Flag, "img2img_fix_steps": Flag, "img2img_background_color": Text,
    "return_mask": Flag, "return_mask_composite": Flag, "upscaler_for_img2img": Text | None,
    "sdxl_crop_top": Whole, "sdxl_crop_left": Whole, "sdxl_refiner_low_aesthetic_score": Real,
    "sdxl_refiner_high_aesthetic_score": Real,
    # saving and infotext
    "samples_save": Flag, "samples_format": Text, "samples_filename_pattern": Text,
    "save_images_add_number": Flag, "grid_save": Flag, "grid_format": Text, "grid_only_if_multiple": Flag,
    "n_rows": Whole, "enable_pnginfo": Flag, "save_txt": Flag, "save_images_before_face_restoration": Flag,
    "save_images_before_highres_fix": Flag, "save_images_before_color_correction": Flag,
    "save_mask": Flag, "save_mask_composite": Flag, "jpeg_quality": Annotated[int, Field(ge=1, le=100)],
    "webp_lossless": Flag, "export_for_4chan": Flag, "save_init_img": Flag, "save_incomplete_images": Flag,
    "save_to_dirs": Flag, "grid_save_to_dirs": Flag, "directories_filename_pattern": Text,
    "add_model_hash_to_info": Flag, "add_model_name_to_info": Flag, "add_version_to_infotext": Flag,
    "return_grid": Flag, "do_not_show_images": Flag,
    # face restoration, upscaling, extra networks
    "face_restoration": Flag, "face_restoration_model": Text | None, "code_former_weight": Real,
    "face_restoration_unload": Flag, "ESRGAN_tile": Whole, "ESRGAN_tile_overlap": Whole,
    "realesrgan_enabled_models": Texts, "extra_networks_default_multiplier": Real,
    "lora_preferred_name": Text, "lora_add_hashes_to_infotext": Flag,
    # live previews and the UI
    "show_progressbar": Flag, "live_previews_enable": Flag, "live_previews_image_format": Text,
    "show_progress_grid": Flag, "show_progress_every_n_steps": Whole, "show_progress_type": Text,
    "live_preview_content": Text, "live_preview_refresh_period": Real, "interrupt_after_current": Flag,
    "quicksettings_list": Texts, "hidden_tabs": Texts, "ui_tab_order": Texts, "localization": Text,
    "samples_log_stdout": Flag, "multiple_tqdm": Flag, "memmon_poll_rate": Whole,
}  # fmt: skip

# One model for POST /options and override_settings: known names, typed values, nothing else; so the
# store never holds more than these names with values of bounded size.
Options = create_model(
    "Options",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (kind | None, None) for name, kind in OPTION_TYPES.items()},
)


# --- always-on scripts: ControlNet (the sd-webui-controlnet extension's unit fields) ---------------------


class ControlNetImage(BaseModel):
    """Newer extension versions send `{"image": base64, "mask": base64}`."""

    model_config = STRICT
    image: str
    mask: str | None = None


class ControlNetUnitArgs(BaseModel):
    """One unit of `alwayson_scripts.controlnet.args`; nbkit uses the fields up to `guidance_end`."""

    model_config = STRICT
    enabled: bool = True
    module: Name | None = "none"
    model: Name | None = "None"
    weight: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0
    input_image: str | ControlNetImage | None = None
    image: str | ControlNetImage | None = None
    guidance_start: Fraction = 0.0
    guidance_end: Fraction = 1.0
    # The extension's other fields, typed so a malformed one is refused rather than silently dropped.
    mask: str | None = None
    resize_mode: Whole | Name = 1
    control_mode: Whole | Name = 0
    processor_res: Whole = -1
    threshold_a: Real = -1.0
    threshold_b: Real = -1.0
    pixel_perfect: bool = False
    low_vram: bool = False


class ControlNetScript(BaseModel):
    model_config = STRICT
    args: Annotated[list[ControlNetUnitArgs], Field(max_length=MAX_LIST_ITEMS)] = Field(default_factory=list)


ALWAYSON_SCRIPTS = ("controlnet",)


class AlwaysOnScripts(BaseModel):
    """`alwayson_scripts`: the scripts nbkit has, by A1111's case-insensitive names; no others."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    controlnet: ControlNetScript | None = None

    @model_validator(mode="before")
    @classmethod
    def _lower_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        named: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).lower() if str(key).lower() in ALWAYSON_SCRIPTS else key
            if name in named:  # two spellings of one script: which one's units would be a guess
                raise ValueError(f"{name} is given twice, under two spellings; send it once")
            named[name] = value
        return named


# --- request models (A1111's fields and defaults; unknown fields are ignored) ------------------------


class ApiRequest(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = STRICT

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    styles: Names = Field(default_factory=list)
    seed: Seed = -1
    subseed: Seed = -1
    subseed_strength: Fraction = 0.0
    seed_resize_from_h: Whole = -1
    seed_resize_from_w: Whole = -1
    sampler_name: Name | None = None
    scheduler: Name | None = None
    batch_size: Whole = 1
    n_iter: Whole = 1
    steps: Whole = 50
    cfg_scale: Guidance = 7.0
    distilled_cfg_scale: Guidance = DISTILLED_CFG_SCALE  # Forge's field: FLUX.1-dev's distilled guidance
    width: Whole = 512
    height: Whole = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Real | None = None
    s_min_uncond: Real | None = None
    s_churn: Real | None = None
    s_tmax: Real | None = None
    s_tmin: Real | None = None
    s_noise: Real | None = None
    override_settings: Options | None = None  # type: ignore[valid-type]
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Name | None = None
    refiner_switch_at: Fraction | None = None
    disable_extra_networks: bool = False
    comments: FreeDict | None = None
    sampler_index: Name = "Euler"
    script_name: Name | None = None
    script_args: FreeList = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: AlwaysOnScripts = Field(default_factory=AlwaysOnScripts)
    force_task_id: Name | None = None
    infotext: Prompt | None = None


class Txt2ImgRequest(ApiRequest):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    denoising_strength: Fraction | None = None
    firstphase_width: Whole = 0
    firstphase_height: Whole = 0
    hr_scale: Annotated[float, Field(ge=0.0, le=16.0)] = 2.0
    hr_upscaler: Name | None = None
    hr_second_pass_steps: Whole = 0
    hr_resize_x: Whole = 0
    hr_resize_y: Whole = 0
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: Prompt = ""
    hr_negative_prompt: Prompt = ""


class Img2ImgRequest(ApiRequest):
    """POST /sdapi/v1/img2img (with `mask`: inpainting)."""

    init_images: Annotated[list[str], Field(max_length=MAX_LIST_ITEMS)] | None = None
    resize_mode: Whole = 0
    image_cfg_scale: Guidance | None = None
    mask: str | None = None
    mask_blur_x: Whole = 4
    mask_blur_y: Whole = 4
    mask_blur: Whole | None = None
    mask_round: bool = True
    inpainting_fill: Whole = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Whole = 0
    inpainting_mask_invert: Whole = 0
    initial_noise_multiplier: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    latent_mask: str | None = None
    denoising_strength: Fraction = 0.75
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    model_config = STRICT
    image: str


# --- conversions -------------------------------------------------------------------------------------


def decode_image(text: str, limits: Limits, what: str) -> Image.Image:
    """A PIL image from base64 (raw or `data:` URL), refused above the byte and pixel caps."""
    data = decode_base64_image_bytes(text, limits, what)
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
        raise LimitError(
            f"{what} is not a readable image ({type(error).__name__})",
            status=422,
            fix="send a PNG, JPEG or WebP as base64 (raw or a data: URL)",
        ) from None
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


CONTROLNET_ARGS = ("alwayson_scripts", "controlnet", "args")


def _preprocessor(module: str | None, loc: tuple[str | int, ...]) -> str:
    """The nbkit preprocessor for an extension module name (`canny`, `depth_midas`, `none`, ...)."""
    name = (module or "none").strip().lower()
    if name in ("none", ""):
        return "none"
    for preprocessor in ("canny", "depth"):
        if preprocessor in name:
            return preprocessor
    raise field_error(
        (*loc, "module"),
        f"ControlNet preprocessor {module!r} is not available here: use canny, depth or none "
        "(none: send a ready control map as the image)",
    )


def _controlnet(body: ApiRequest, limits: Limits) -> ControlNetUnit | None:
    """The enabled unit of A1111's ControlNet extension arguments (`alwayson_scripts.controlnet`).

    nbkit applies one ControlNet: an enabled unit without a model or an image, a second enabled unit,
    or a preprocessor nbkit does not have is a 422 naming the unit's field, never silently dropped.
    """
    script = body.alwayson_scripts.controlnet
    units = [(index, unit) for index, unit in enumerate(script.args if script else []) if unit.enabled]
    if not units:
        return None
    if len(units) > 1:
        raise field_error(
            (*CONTROLNET_ARGS, units[1][0]),
            f"{len(units)} ControlNet units are enabled; nbkit applies one: disable the others",
        )
    index, unit = units[0]
    loc = (*CONTROLNET_ARGS, index)
    if not unit.model or unit.model == "None":
        raise field_error((*loc, "model"), "an enabled ControlNet unit needs a model")
    image, where = (
        (unit.input_image, "input_image") if unit.input_image is not None else (unit.image, "image")
    )
    if isinstance(image, ControlNetImage):
        image, where = image.image, f"{where}.image"
    if not image:
        raise field_error((*loc, "input_image"), "an enabled ControlNet unit needs an input_image")
    path = ".".join(str(part) for part in (*loc, where))
    return ControlNetUnit(
        model=unit.model,
        image=decode_image(image, limits, path),
        preprocessor=_preprocessor(unit.module, loc),
        weight=unit.weight,
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
    )


def _hires_size(body: Txt2ImgRequest) -> tuple[int, int] | None:
    """The hires fix's final size (None without it, or when the first pass's size is refused anyway)."""
    if not body.enable_hr or body.width < 1 or body.height < 1:
        return None
    if body.hr_resize_x or body.hr_resize_y:
        width = body.hr_resize_x or round(body.width * body.hr_resize_y / body.height)
        height = body.hr_resize_y or round(body.height * body.hr_resize_x / body.width)
        return width, height
    if body.hr_scale < 1:
        raise field_error(("hr_scale",), "with enable_hr, hr_scale must be at least 1 (it upscales)")
    return int(body.width * body.hr_scale), int(body.height * body.hr_scale)


def _check_scripts(body: ApiRequest) -> None:
    """A1111 answers 422 for a selectable script it does not have; nbkit has none."""
    if body.script_name:
        raise field_error(("script_name",), f"script {body.script_name!r} not found: nbkit has no scripts")


def to_generation_request(body: ApiRequest, limits: Limits) -> GenerationRequest:
    """An A1111 request as nbkit's `GenerationRequest`, after the caps are checked.

    Raises:
        ApiError: an unknown sampler or schedule type (400), img2img without `init_images` (422).
        RequestValidationError: a script nbkit does not have, or a malformed ControlNet unit (422).
        LimitError: a request above the caps (400/413), or an unreadable image (422).
    """
    txt2img = isinstance(body, Txt2ImgRequest)
    _check_scripts(body)
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
        styles=list(body.styles),
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
        vae = body.override_settings.sd_vae if body.override_settings is not None else None
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
    # The nested models as sent, not with every field they could have.
    parameters["alwayson_scripts"] = body.alwayson_scripts.model_dump(exclude_unset=True)
    if body.override_settings is not None:
        parameters["override_settings"] = body.override_settings.model_dump(exclude_unset=True)
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None  # as A1111: the images are not echoed unless asked for
        parameters["mask"] = None
    return parameters
