"""AUTOMATIC1111's API requests and responses: the request models, and their translation to and from
nbkit's `GenerationRequest` and `GenerationOutput` (A1111 keeps its models in `modules/api/models.py`).

Field names and defaults follow A1111; unknown request fields are ignored. As in A1111 (whose models
are its processing classes' signatures with every field `Optional`), a field sent as `null` takes its
default: `"seed": null` is a random seed, `"steps": null` the default steps, and a field left to the
loaded model's settings when left out is left to them when `null` too. Every value is checked
where it is parsed, so a bad one is a 422 naming its field path before anything queues: numbers are
finite (JSON's `NaN` and `Infinity` are refused) and within ranges that make sense where A1111 sets
none (a seed fits `torch.Generator`, a fraction is in [0, 1], a prompt is at most `MAX_PROMPT_CHARS`).
The server's own caps (size, steps, images) stay in `nbkit.webui.security` and answer 400 with the cap.

`alwayson_scripts` takes the scripts nbkit has (ControlNet); another name is a 422, as A1111 answers
for an always-on script it does not have. `POST /options` takes A1111's option names of `OPTION_TYPES`
with typed values; an unknown name is a 422 listing close names. `override_settings` takes the same
names and types for one request (`effective_options`); a name nbkit does not know is ignored and named
in the response's `info` (`warnings`), since clients send their own extensions' options there.

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
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from nbkit.errors import NbkitError
from nbkit.generation.generate import MAX_SEED
from nbkit.generation.hires import PIXEL_UPSCALERS, SIZE_MULTIPLE, HiresFix, upscale
from nbkit.generation.infotext import parse_infotext
from nbkit.generation.samplers import resolve
from nbkit.webui import controlnet as cn
from nbkit.webui.outputs import SAMPLES_FORMATS, ImageFormat, encode_image
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


# --- A1111's options (GET/POST /options, override_settings): one table of names and value types -------

Flag = bool
Text = Name
Texts = Names


def _samples_format(value: str) -> str:
    kind = value.strip().lower()
    if kind not in SAMPLES_FORMATS:
        raise ValueError(f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, got {value!r}")
    return kind


SamplesFormat = Annotated[str, Field(max_length=16), AfterValidator(_samples_format)]
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
    "samples_save": Flag, "samples_format": SamplesFormat, "samples_filename_pattern": Text,
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

# The options nbkit acts on, with A1111's defaults (GET /options lists them before any is set): the
# checkpoint and VAE, and the format of the images sent and saved.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_vae": "Automatic",
    "samples_save": True,
    "samples_format": "png",
    "jpeg_quality": 80,
    "webp_lossless": False,
    "enable_pnginfo": True,
    "CLIP_stop_at_last_layers": 1,
}

# POST /options: known names, typed values, nothing else; so the store never holds more than these names
# with values of bounded size.
_OPTION_FIELDS: dict[str, Any] = {name: (kind | None, None) for name, kind in OPTION_TYPES.items()}
Options = create_model(
    "Options", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **_OPTION_FIELDS
)
# override_settings: the same names and types; other names are kept aside (`model_extra`), never used or
# echoed, and named in the response's notes.
OverrideSettings = create_model(
    "OverrideSettings", __config__=ConfigDict(extra="allow", allow_inf_nan=False), **_OPTION_FIELDS
)
MAX_NOTED_NAMES = 8  # unknown override names listed in a note (each cut to MAX_NAME_CHARS)


def known_overrides(body: ApiRequest) -> dict[str, Any]:
    """The request's `override_settings` of options nbkit has, as sent (None values dropped)."""
    if body.override_settings is None:
        return {}
    given = body.override_settings.model_dump(exclude_unset=True)
    return {name: value for name, value in given.items() if name in OPTION_TYPES and value is not None}


def effective_options(stored: dict[str, Any], body: ApiRequest) -> dict[str, Any]:
    """The options one request runs with: A1111's defaults, then those set with POST /options, then the
    request's `override_settings` (for this request only, as A1111's `override_settings_restore_afterwards`).
    """
    return {**OPTION_DEFAULTS, **stored, **known_overrides(body)}


def image_format(options: dict[str, Any]) -> ImageFormat:
    """The format images are sent and saved in under `options` (`samples_format` and its options)."""
    return ImageFormat(
        kind=options["samples_format"],
        quality=options["jpeg_quality"],
        lossless=bool(options["webp_lossless"]),
        infotext=bool(options["enable_pnginfo"]),
    )


def request_notes(body: ApiRequest) -> list[str]:
    """What of the request nbkit did not do as asked, for the response's `info.warnings`."""
    notes = []
    extra = body.override_settings.model_extra if body.override_settings is not None else None
    if extra:
        names = [str(name)[:MAX_NAME_CHARS] for name in list(extra)[:MAX_NOTED_NAMES]]
        more = f" and {len(extra) - len(names)} more" if len(extra) > len(names) else ""
        notes.append(f"override_settings: ignored {', '.join(names)}{more}: not options nbkit has")
    if body.firstpass_image:
        if isinstance(body, Txt2ImgRequest) and body.enable_hr:
            notes.append(
                "firstpass_image: the hires fix's second pass ran on it as img2img, after upscaling it "
                f"with {_firstpass_upscaler(body)}"
            )
        else:
            notes.append("firstpass_image: ignored; A1111 uses it only in txt2img with enable_hr")
    return notes


# --- always-on scripts: ControlNet (the sd-webui-controlnet extension's unit fields) ---------------------


class ControlNetImage(BaseModel):
    """The extension's `{"image": base64, "mask": base64}` form of a unit's image."""

    model_config = STRICT
    image: str
    mask: str | None = None


# A unit's image: base64, `{"image", "mask"}`, `[image, mask]` or `[{"image", "mask"}]` (the extension's forms).
UnitImage = str | ControlNetImage | Annotated[list[str | ControlNetImage], Field(min_length=1, max_length=2)]
# The extension's older field names, and Forge's `mask_image`: each is read as the field it names.
_UNIT_ALIASES = {
    "input_image": "image",
    "guidance": "guidance_end",
    "lowvram": "low_vram",
    "mask_image": "mask",
}


class ControlNetUnitArgs(BaseModel):
    """One unit of `alwayson_scripts.controlnet.args`, with the fields of the sd-webui-controlnet extension's
    unit and webuiapi's `ControlNetUnit.to_dict()`.

    `null` is the field's default; the older names (`input_image`, `guidance`, `lowvram`, `mask_image`)
    are read as the fields they name (both given: a 422). `resize_mode` and `control_mode` take the
    extension's ints or names; `threshold_a/b` are Canny's low/high thresholds and `processor_res` the
    short side Canny sees the picture at (out of range, -1 included: the module's default). `low_vram`,
    `hr_option` and `save_detected_map` are read and have no effect (nbkit places models by its own plan;
    the hires pass runs without ControlNet). Other fields are ignored.
    """

    model_config = STRICT
    enabled: bool = True
    module: Name = "none"
    model: Name = "None"
    weight: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    image: UnitImage | None = None
    mask: str | None = None
    resize_mode: Whole | Name = "Crop and Resize"
    low_vram: bool = False
    processor_res: Whole = -1
    threshold_a: Real = -1.0
    threshold_b: Real = -1.0
    guidance_start: Fraction = 0.0
    guidance_end: Fraction = 1.0
    control_mode: Whole | Name = "Balanced"
    pixel_perfect: bool = False
    hr_option: Name = "Both"
    save_detected_map: bool = True

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # null (and webuiapi's "" for no image) is the default
        data = {key: value for key, value in data.items() if value is not None and value != ""}
        for alias, name in _UNIT_ALIASES.items():
            if alias in data:
                if name in data:
                    raise ValueError(f"{alias!r} is the older name of {name!r}: give one of them")
                data[name] = data.pop(alias)
        return data

    @model_validator(mode="after")
    def _known_modes(self) -> ControlNetUnitArgs:
        cn.resize_mode_index(self.resize_mode)
        cn.control_mode_index(self.control_mode)
        return self


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


def _nullable_properties(schema: dict[str, Any]) -> None:
    """Mark every property of a request model's JSON schema nullable (`null` = its default), as A1111's
    schema does with its `Optional` fields."""
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        if any(option.get("type") == "null" for option in options):
            continue
        outer = {key: prop.pop(key) for key in ("title", "default", "description") if key in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **outer}


class ApiRequest(BaseModel):
    """The fields txt2img and img2img share (any field may be `null`: its default)."""

    model_config = ConfigDict(**STRICT, json_schema_extra=_nullable_properties)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # Dropped rather than set, so a null field also counts as left out (then the model's own
        # settings apply to it, as to a field not sent).
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}

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
    override_settings: OverrideSettings | None = None  # type: ignore[valid-type]
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Name | None = None
    refiner_switch_at: Fraction | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None  # txt2img with enable_hr: the first pass, given (base64)
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
    denoising_strength: Fraction = 0.75
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


def _sampler(body: ApiRequest) -> tuple[str, str]:
    """The sampler and schedule names as A1111's API reads them (`sampler_name`, else `sampler_index`).
    Unknown names are not refused: generation falls back as A1111 does and says so in `info["warnings"]`."""
    return body.sampler_name or body.sampler_index or "Euler", body.scheduler or "Automatic"


def _sampler_that_ran(output: GenerationOutput) -> str:
    """The sampler the infotext names (after a fallback, or a flow model's Euler), else the one asked."""
    named = parse_infotext(output.infotexts[0]).sampler if output.infotexts else None
    return named or output.request.sampler_name


CONTROLNET_ARGS = ("alwayson_scripts", "controlnet", "args")


def _preprocessor(module: str | None, loc: tuple[str | int, ...]) -> cn.Module:
    """The preprocessor an extension module name names (`canny`, `depth_midas`, `none`, ...); a 422 naming
    the ones nbkit has for another."""
    try:
        return cn.find_module(module)
    except NbkitError as error:
        raise field_error((*loc, "module"), f"{error.message}; {error.fix}") from None


def _unit_image(
    unit: ControlNetUnitArgs, limits: Limits, loc: tuple[str | int, ...]
) -> tuple[Image.Image | None, Image.Image | None]:
    """A unit's picture and mask from the extension's forms of `image` (and `mask`), decoded."""
    image, mask = unit.image, unit.mask
    where, mask_where = ("image",), ("mask",)
    if isinstance(image, list):
        if len(image) == 2 and all(isinstance(item, str) for item in image):
            image, mask = image
            where, mask_where = ("image", 0), ("image", 1)
        elif len(image) == 1 and isinstance(image[0], ControlNetImage):
            image, where = image[0], ("image", 0)
        else:
            raise field_error(
                (*loc, "image"),
                "give one picture per unit: base64, {image, mask}, [image, mask] or [{image, mask}]",
            )
    if isinstance(image, ControlNetImage):
        image, mask = image.image, image.mask
        where, mask_where = (*where, "image"), (*where, "mask")
    if not image:
        return None, None

    def path(parts: tuple[str | int, ...]) -> str:
        return ".".join(str(part) for part in (*loc, *parts))

    picture = decode_image(image, limits, path(where))
    return picture, decode_image(mask, limits, path(mask_where)) if mask else None


def _controlnet(body: ApiRequest, limits: Limits) -> list[ControlNetUnit]:
    """The enabled units of the ControlNet extension's arguments (`alwayson_scripts.controlnet.args`).

    An enabled unit without a model (or, in txt2img, an image), with a module nbkit does not run or a
    guidance range that runs no step is a 422 naming its field; more enabled units than
    `Limits.max_controlnet_units` is a 400. In img2img a unit without an image uses the init image.
    """
    script = body.alwayson_scripts.controlnet
    units = [(index, unit) for index, unit in enumerate(script.args if script else []) if unit.enabled]
    if len(units) > limits.max_controlnet_units:
        raise LimitError(
            f"{len(units)} ControlNet units are enabled, above this server's limit of "
            f"{limits.max_controlnet_units}",
            fix="disable some units",
        )
    made = []
    for index, unit in units:
        loc = (*CONTROLNET_ARGS, index)
        if unit.model.strip().lower() in ("", "none"):
            raise field_error((*loc, "model"), "an enabled ControlNet unit needs a model")
        module = _preprocessor(unit.module, loc)
        if unit.guidance_start >= unit.guidance_end:
            raise field_error(
                (*loc, "guidance_start"),
                f"guidance_start {unit.guidance_start} must be below guidance_end {unit.guidance_end}",
            )
        image, mask = _unit_image(unit, limits, loc)
        if image is None and isinstance(body, Txt2ImgRequest):
            raise field_error((*loc, "image"), "an enabled ControlNet unit needs an image in txt2img")
        low, high = sorted(
            int(slider.pick(value)) if slider else default
            for slider, value, default in (
                (module.threshold_a, unit.threshold_a, 100),
                (module.threshold_b, unit.threshold_b, 200),
            )
        )
        made.append(
            ControlNetUnit(
                model=unit.model,
                image=image,
                preprocessor=module.preprocessor,
                weight=unit.weight,
                guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end,
                low_threshold=low,
                high_threshold=high,
                mask=mask,
                resize_mode=cn.resize_mode_index(unit.resize_mode),
                processor_res=int(module.resolution.pick(unit.processor_res)) if module.resolution else 512,
                pixel_perfect=unit.pixel_perfect,
                control_mode=cn.control_mode_index(unit.control_mode),
                module=module.name if unit.module.strip().lower() in ("", "none") else unit.module.strip(),
            )
        )
    return made


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


def _firstpass_upscaler(body: Txt2ImgRequest) -> str:
    """The pixel upscaler the given first pass is enlarged with: the one asked for when it works on pixels;
    for a latent one (A1111 would upscale the image's latents), Lanczos."""
    used = HiresFix(upscaler=body.hr_upscaler or "Lanczos").used_upscaler
    return used if used in PIXEL_UPSCALERS else "Lanczos"


def _firstpass_request(
    body: Txt2ImgRequest, fields: dict[str, Any], limits: Limits, read_inputs: Any
) -> GenerationRequest:
    """txt2img with `enable_hr` and a `firstpass_image`: the hires fix's second pass alone, as A1111 runs it
    on a given first pass (its "upscale" button): the image is enlarged to the hires size, then redrawn
    by an img2img pass with the hires steps and denoising strength."""
    width, height = _hires_size(body) or (body.width, body.height)
    width, height = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
    fields = {
        **{
            key: value for key, value in fields.items() if key not in ("enable_hr", "hr_scale", "hr_upscaler")
        },
        "width": width,
        "height": height,
        "steps": body.hr_second_pass_steps or body.steps,
        "hr_second_pass_steps": 0,
        "resize_mode": 0,
    }
    hires = HiresFix(upscaler=_firstpass_upscaler(body))

    def with_image() -> dict[str, Any]:
        first = decode_image(body.firstpass_image, limits, "firstpass_image").convert("RGB")
        return {**read_inputs(), "init_image": upscale([first], hires, width, height)[0]}

    return make_request("img2img", fields, limits, read_inputs=with_image)


def to_generation_request(
    body: ApiRequest, limits: Limits, options: dict[str, Any] | None = None
) -> GenerationRequest:
    """An A1111 request as nbkit's `GenerationRequest`, after the caps are checked.

    Args:
        body: the request.
        limits: the request caps.
        options: the options it runs with (`effective_options`; None: A1111's defaults and its own
            `override_settings`).

    Raises:
        ApiError: img2img without `init_images` (404, as A1111).
        RequestValidationError: a script nbkit does not have, a malformed ControlNet unit or an unreadable
            image (422).
        LimitError: a request above the caps (400/413).
    """
    txt2img = isinstance(body, Txt2ImgRequest)
    options = effective_options({}, body) if options is None else options
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
        # As A1111: the API saves when asked (`save_images`) and the `samples_save` option allows it.
        save_images=body.save_images and bool(options["samples_save"]),
        save_format=image_format(options),
    )
    if txt2img:
        fields.update(
            enable_hr=body.enable_hr,
            hr_scale=body.hr_scale,
            hr_upscaler=body.hr_upscaler or "Latent",
            hr_second_pass_steps=body.hr_second_pass_steps,
            denoising_strength=body.denoising_strength,
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
        vae = options.get("sd_vae")
        inputs: dict[str, Any] = dict(
            sampler_name=sampler,
            scheduler=scheduler,
            vae=None if vae in (None, "", "Automatic", "None") else vae,
            controlnet=_controlnet(body, limits),
        )
        if not txt2img:
            if not body.init_images:
                raise ApiError(
                    404,
                    "Init image not found: img2img needs init_images, a list of at least one base64 image",
                    "InitImageNotFound",
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
    if txt2img and body.enable_hr and body.firstpass_image:
        return _firstpass_request(body, fields, limits, read_inputs)
    mode = "txt2img" if txt2img else "inpaint" if body.mask else "img2img"
    final = _hires_size(body) if txt2img else None
    return make_request(mode, fields, limits, final_size=final, read_inputs=read_inputs)


def build_info(body: ApiRequest, request: GenerationRequest, output: GenerationOutput) -> dict[str, Any]:
    """The `info` dict of A1111's txt2img/img2img response (sent as a JSON string); `warnings` (nbkit's) lists
    what of the request was not done as asked (`request_notes`)."""
    seeds = output.seeds
    model = output.model
    count = len(output.images)
    sampler, _schedule = resolve(_sampler_that_ran(output), request.scheduler)
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
        # What was not done as asked: sampler/schedule fallbacks and substitutions, ignored options (A1111's
        # info has no such key; clients that do not know it skip it).
        "warnings": [*output.warnings, *request_notes(body)],
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
        # the options nbkit has, as sent; other names are only named in the notes, never echoed
        parameters["override_settings"] = known_overrides(body)
    if body.firstpass_image is not None:
        parameters["firstpass_image"] = None  # an image, not echoed (as init_images)
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None  # as A1111: the images are not echoed unless asked for
        parameters["mask"] = None
    return parameters


# --- response models (the schema at /openapi.json; A1111's names) ----------------------------------------


class ImageResponse(BaseModel):
    """txt2img and img2img: A1111's `TextToImageResponse` / `ImageToImageResponse`."""

    images: list[str] = Field(description="the images, raw base64 in the samples_format (PNG by default)")
    parameters: dict[str, Any] = Field(description="the request as received, with defaults filled in")
    info: str = Field(description="a JSON string: seeds, infotexts, model, notes")


class PngInfoResponse(BaseModel):
    info: str = Field(description="the image's infotext ('' when it has none)")
    items: dict[str, Any] = Field(description="the image's other text items")
    parameters: dict[str, Any] = Field(description="the infotext parsed as A1111's parameters")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ErrorResponse(BaseModel):
    """A1111's error body (its `api_middleware`): every error but a 422's."""

    error: str = Field(description="the error's kind")
    detail: Any = Field(description="what went wrong")
    body: Any = ""
    errors: Any = None
