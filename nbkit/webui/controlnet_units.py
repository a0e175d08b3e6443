"""The sd-webui-controlnet extension's units in `alwayson_scripts.controlnet.args`, read as it reads them.

`ControlNetUnitArgs` takes every field the extension's API and webuiapi's `ControlNetUnit.to_dict()`
send (old names too: `input_image`, `guidance`, `lowvram`, `mask_image`), `AlwaysOnScripts` the scripts
nbkit has (matched case-insensitively, as A1111 matches script names). `controlnet_units` turns a
request's enabled units into `nbkit.webui.requests.ControlNetUnit`s: images decoded within the caps, the
extension's module and mode names mapped to what nbkit runs, a bad value a 422 at its field's path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nbkit.errors import NbkitError
from nbkit.webui import controlnet as cn
from nbkit.webui.api_types import (
    MAX_LIST_ITEMS,
    STRICT,
    Fraction,
    Name,
    Real,
    Whole,
    decode_image,
    field_error,
)
from nbkit.webui.requests import ControlNetUnit
from nbkit.webui.security import LimitError, Limits

if TYPE_CHECKING:
    from nbkit.webui.api_models import ApiRequest


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


def controlnet_units(body: ApiRequest, limits: Limits, *, txt2img: bool) -> list[ControlNetUnit]:
    """The enabled units of the ControlNet extension's arguments (`alwayson_scripts.controlnet.args`).

    An enabled unit without a model (or, in txt2img, an image), with a module nbkit does not run or a
    guidance range that runs no step is a 422 naming its field; more enabled units than
    `Limits.max_controlnet_units` is a 400. In img2img a unit without an image uses the init image.

    Args:
        body: the txt2img or img2img request.
        limits: the server's caps.
        txt2img: whether it is a txt2img request (where every enabled unit needs an image).
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
        if image is None and txt2img:
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
