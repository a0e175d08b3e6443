"""The sd-webui-controlnet extension's routes (`/controlnet/*`), and A1111's script lists that name it.

The extension mounts its routes at the app's root; nbkit answers them in the extension's shapes, so its
clients find what they look for:

- `GET /controlnet/version`: the extension's API version (3: units with `image`, `{image, mask}`, ...).
- `GET /controlnet/model_list` (`?update=`: the list is read afresh every time): the ControlNets on
  offer, the registry's and the folders in `<storage root>/controlnet/`.
- `GET /controlnet/module_list` (`?alias_names=`: nbkit's names are the labels): the preprocessors nbkit
  runs, with their sliders.
- `GET /controlnet/control_types`: the modules and models of each control type.
- `GET /controlnet/settings`: the unit count (`Limits.max_controlnet_units`).
- `POST /controlnet/detect`: the control maps a module makes of the images (`images`, base64 PNG).
- `GET /sdapi/v1/scripts` and `/sdapi/v1/script-info`: ControlNet, the always-on script nbkit has.

`controlnet_router` returns them as one `APIRouter` (its paths are absolute).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from nbkit.errors import NbkitError
from nbkit.webui import controlnet as cn
from nbkit.webui.api import ApiState, run_queued
from nbkit.webui.api_types import (
    MAX_LIST_ITEMS,
    STRICT,
    Name,
    Real,
    Whole,
    decode_image,
    encode_png,
    field_error,
)
from nbkit.webui.controlnet_units import ALWAYSON_SCRIPTS, ControlNetUnitArgs
from nbkit.webui.security import LimitError

EXTENSION_API_VERSION = 3  # the extension's `get_api_version()` whose unit fields nbkit reads


class DetectRequest(BaseModel):
    """POST /controlnet/detect: the extension's fields (`controlnet_images` is webuiapi's name of the
    images; null is a field's default). The masks are read and unused: nbkit's modules take none."""

    model_config = STRICT
    controlnet_module: Name = "none"
    controlnet_input_images: Annotated[list[str], Field(max_length=MAX_LIST_ITEMS)] = Field(
        default_factory=list
    )
    controlnet_processor_res: Whole = -1
    controlnet_threshold_a: Real = -1.0
    controlnet_threshold_b: Real = -1.0
    controlnet_masks: Annotated[list[str], Field(max_length=MAX_LIST_ITEMS)] = Field(default_factory=list)
    low_vram: bool = False

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        if "controlnet_images" in data:
            if "controlnet_input_images" in data:
                raise ValueError("controlnet_images is another name of controlnet_input_images: give one")
            data["controlnet_input_images"] = data.pop("controlnet_images")
        return data


def controlnet_router(state: ApiState) -> APIRouter:
    """The extension's `/controlnet/*` routes and A1111's `/sdapi/v1/scripts` and `script-info`."""
    router = APIRouter()
    _extension_routes(router, state)
    _script_routes(router, state)
    return router


def _control_types(storage_root: Any) -> dict[str, dict[str, Any]]:
    """The extension's control types: "All", then one per type of nbkit's modules."""
    models = cn.controlnet_names(storage_root)
    types: dict[str, dict[str, Any]] = {
        "All": {
            "module_list": list(cn.MODULES),
            "model_list": ["None", *models],
            "default_option": "none",
            "default_model": "None",
        }
    }
    for name in sorted({module.control_type for module in cn.MODULES.values() if module.control_type}):
        modules = [module for module in cn.MODULES.values() if module.control_type == name]
        preprocessors = {module.preprocessor for module in modules}
        fitting = [
            model
            for model in models
            if name.lower() in model.lower()
            or (model in cn.CONTROLNETS and cn.CONTROLNETS[model].preprocessor in preprocessors)
        ]
        types[name] = {
            "module_list": ["none", *(module.name for module in modules)],
            "model_list": ["None", *fitting],
            "default_option": modules[0].name,
            "default_model": fitting[0] if fitting else "None",
        }
    return types


def _extension_routes(router: APIRouter, state: ApiState) -> None:
    service = state.service

    @router.get("/controlnet/version")
    def version() -> dict[str, int]:
        return {"version": EXTENSION_API_VERSION}

    @router.get("/controlnet/model_list")
    def model_list(update: bool = True) -> dict[str, list[str]]:
        # The folders are read on every call, so the list is always as fresh as `update=true` asks.
        return {"model_list": cn.controlnet_names(service.catalog.storage_root)}

    @router.get("/controlnet/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        # nbkit's module names are their labels too, so `alias_names` lists the same.
        return {
            "module_list": list(cn.MODULES),
            "module_detail": {
                name: {"model_free": False, "sliders": [slider.to_api() for slider in module.sliders]}
                for name, module in cn.MODULES.items()
            },
        }

    @router.get("/controlnet/control_types")
    def control_types() -> dict[str, Any]:
        return {"control_types": _control_types(service.catalog.storage_root)}

    @router.get("/controlnet/settings")
    def settings() -> dict[str, int]:
        return {"control_net_unit_count": state.limits.max_controlnet_units}

    @router.post("/controlnet/detect")
    async def detect(body: DetectRequest, http: Request) -> dict[str, Any]:
        try:
            module = cn.find_module(body.controlnet_module)
        except NbkitError as error:
            raise field_error(("controlnet_module",), f"{error.message}; {error.fix}") from None
        images = body.controlnet_input_images
        if not images:
            raise field_error(("controlnet_input_images",), "no image: send at least one base64 image")
        if len(images) > state.limits.max_images:
            raise LimitError(
                f"{len(images)} images, above this server's limit of {state.limits.max_images}",
                fix="send fewer images",
            )

        def make_maps() -> list[str]:
            maps = []
            for index, text in enumerate(images):
                picture = decode_image(text, state.limits, f"controlnet_input_images.{index}")
                made = service.detect_map(
                    picture,
                    module,
                    resolution=body.controlnet_processor_res,
                    threshold_a=body.controlnet_threshold_a,
                    threshold_b=body.controlnet_threshold_b,
                )
                maps.append(encode_png(made, None))
            return maps

        # The depth estimator runs on the generation device, so it waits its turn; Canny is plain CPU work.
        if module.preprocessor == "depth":
            maps = await run_queued(state, make_maps, http)
        else:
            maps = await run_in_threadpool(make_maps)
        return {"images": maps, "info": "Success"}


def _script_routes(router: APIRouter, state: ApiState) -> None:
    @router.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list[str]]:
        # A1111 lists every script by its lower-case title; nbkit's one is the always-on ControlNet.
        return {"txt2img": list(ALWAYSON_SCRIPTS), "img2img": list(ALWAYSON_SCRIPTS)}

    @router.get("/sdapi/v1/script-info")
    def script_info() -> list[dict[str, Any]]:
        # One argument per unit slot, as the extension's UI has one per unit; its value is a unit's defaults.
        unit = ControlNetUnitArgs(enabled=False).model_dump()
        args = [
            {
                "label": f"ControlNet Unit {index}",
                "value": unit,
                "minimum": None,
                "maximum": None,
                "step": None,
                "choices": None,
            }
            for index in range(state.limits.max_controlnet_units)
        ]
        return [
            {"name": name, "is_alwayson": True, "is_img2img": img2img, "args": args}
            for img2img in (False, True)
            for name in ALWAYSON_SCRIPTS
        ]
