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
which checks the caps. The value types, the error and the image codecs these models are built from are in
`nbkit.webui.api_types`; the ControlNet units in `nbkit.webui.controlnet_units`.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from nbkit.generation.hires import PIXEL_UPSCALERS, SIZE_MULTIPLE, HiresFix, upscale
from nbkit.generation.infotext import parse_infotext
from nbkit.generation.samplers import resolve
from nbkit.webui.api_types import (
    INT32,
    MAX_LIST_ITEMS,
    MAX_NAME_CHARS,
    STRICT,
    ApiError,
    Fraction,
    FreeDict,
    FreeList,
    Guidance,
    Name,
    Names,
    Prompt,
    Real,
    Seed,
    Whole,
    decode_image,
    field_error,
)
from nbkit.webui.controlnet_units import AlwaysOnScripts, controlnet_units
from nbkit.webui.outputs import SAMPLES_FORMATS, ImageFormat
from nbkit.webui.requests import (
    DISTILLED_CFG_SCALE,
    GenerationOutput,
    GenerationRequest,
    make_request,
)
from nbkit.webui.security import Limits

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


# A1111 fields nbkit accepts and does not act on: a value other than the default is named in the warnings.
UNAPPLIED_FIELDS = (
    "restore_faces", "tiling", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w",
    "refiner_checkpoint", "refiner_switch_at", "eta", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
)  # fmt: skip
# Values that ask for A1111's usual behaviour (its sampler defaults, as webuiapi sends them).
USUAL_VALUES = {"eta": 1.0, "s_noise": 1.0}
# What A1111's own UI sends for "none" in its checkpoint and sampler menus.
UNSET_NAMES = ("", "none", "use same checkpoint", "use same sampler", "use same scheduler")
# The options nbkit acts on; the others of `OPTION_TYPES` are kept (GET /options lists them) and do nothing.
ACTED_OPTIONS = (*OPTION_DEFAULTS, "sd_model_checkpoint")


def _unapplied(body: ApiRequest) -> list[str]:
    names = []
    for name in UNAPPLIED_FIELDS:
        field = type(body).model_fields.get(name)
        value = getattr(body, name, None)
        if (
            field is None or not value or value in (field.default, USUAL_VALUES.get(name))
        ):  # false, 0, "", null
            continue
        if isinstance(value, str) and value.strip().casefold() in UNSET_NAMES:
            continue
        names.append(name)
    given = (
        body.override_settings.model_dump(exclude_unset=True) if body.override_settings is not None else {}
    )
    names += [f"override_settings.{name}" for name in given if name not in ACTED_OPTIONS]
    return names


def request_notes(body: ApiRequest) -> list[str]:
    """What of the request nbkit did not do as asked, for the response's `info.warnings`."""
    notes = []
    unapplied = _unapplied(body)
    if unapplied:
        notes.append(f"not applied (nbkit does not have these): {', '.join(unapplied)}")
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


def _sampler(body: ApiRequest) -> tuple[str, str]:
    """The sampler and schedule names as A1111's API reads them (`sampler_name`, else `sampler_index`).
    Unknown names are not refused: generation falls back as A1111 does and says so in `info["warnings"]`."""
    return body.sampler_name or body.sampler_index or "Euler", body.scheduler or "Automatic"


def _sampler_that_ran(output: GenerationOutput) -> str:
    """The sampler the infotext names (after a fallback, or a flow model's Euler), else the one asked."""
    named = parse_infotext(output.infotexts[0]).sampler if output.infotexts else None
    return named or output.request.sampler_name


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
        clip_skip=options["CLIP_stop_at_last_layers"],
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
            controlnet=controlnet_units(body, limits, txt2img=isinstance(body, Txt2ImgRequest)),
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
        "clip_skip": request.clip_skip,
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
