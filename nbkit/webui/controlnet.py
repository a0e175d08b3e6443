"""ControlNet for the web UI: which ControlNet fits which model, preprocessors, and loading.

A ControlNet is trained against one architecture group of model families (`Family.controlnet_group`):
SD 1.5's ControlNets (768-wide text context) do not fit SD 2.x (1024) or SDXL (2048, with its text_time
embedding). `CONTROLNETS` lists the hub models the families name (`Family.controlnets`); a local
diffusers folder's group is read from its `config.json` by the families (`Family.fits_controlnet_config`).
`check_compatible` refuses a pair that does not fit, before any weights load, with a reason and the ones
that would.

Preprocessors turn a picture into the control map a ControlNet expects: `canny` (OpenCV's edge
detector), `depth` (a transformers depth-estimation model, Depth Anything V2 Small by default) and
`none` (the picture already is the map). The map is made at the generation size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, Family, get_family, most_specific_first
from nbkit.fsio import read_json

PREPROCESSORS = ("none", "canny", "depth")
# A1111's resize_mode -> diffusers' `VaeImageProcessor.resize` mode (3, latent upscale, resizes as 0).
RESIZE_MODES = {0: "default", 1: "crop", 2: "fill", 3: "default"}
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def _controlnet_families() -> list[Family]:
    """The families that take ControlNets, most specific first (the order their configs are asked)."""
    return [family for family in most_specific_first() if family.controlnet_group is not None]


# A ControlNet group -> its name in messages.
GROUP_TITLES = {family.controlnet_group: family.controlnet_title for family in _controlnet_families()}


@dataclasses.dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet on the Hugging Face hub.

    Args:
        key: the name the UI and API show (the repo's name).
        repo_id: the hub repo (diffusers layout).
        family: the ControlNet group (`Family.controlnet_group`).
        preprocessor: the preprocessor that makes its control maps.
    """

    key: str
    repo_id: str
    family: str
    preprocessor: str


# The families' hub ControlNets, in registry order (families of one group list the same ones).
CONTROLNETS: dict[str, ControlNetSpec] = {
    hub.key: ControlNetSpec(hub.key, hub.repo_id, family.controlnet_group, hub.preprocessor)
    for family in FAMILIES.values()
    if family.controlnet_group is not None
    for hub in family.controlnets
}


@dataclasses.dataclass(frozen=True)
class ControlNetSource:
    """Where a ControlNet comes from and what it fits.

    Args:
        name: what the infotext calls it.
        source: a local folder or a hub repo id.
        family: its ControlNet group (`Family.controlnet_group`).
        cross_attention_dim: its text context width, when known before loading.
    """

    name: str
    source: str
    family: str
    cross_attention_dim: int | None = None


def family_of_config(config: Any) -> str:
    """The ControlNet group of a UNet or ControlNet config: the first family (most specific first) whose
    `fits_controlnet_config` claims it."""
    if not isinstance(config, dict):
        config = {key: getattr(config, key, None) for key in ("addition_embed_type", "use_linear_projection")}
    for family in _controlnet_families():
        if family.fits_controlnet_config(config):
            return family.controlnet_group
    raise NbkitError("no model family takes this ControlNet", fix="pick a ControlNet of an SD family")


def find_controlnet(key: str) -> ControlNetSource:
    """The ControlNet a registry key, hub repo id or local diffusers folder names.

    Args:
        key: a `CONTROLNETS` key, its repo id, or a folder holding a ControlNet's config.json.
    """
    key = key.strip()
    for spec in CONTROLNETS.values():
        if key in (spec.key, spec.repo_id):
            return ControlNetSource(spec.key, spec.repo_id, spec.family)
    folder = Path(key).expanduser()
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise NbkitError(
                "this folder holds no config.json, so it is not a diffusers ControlNet",
                path=folder,
                fix="give the folder ControlNetModel.save_pretrained wrote, or a hub repo id",
            )
        config = read_json(config_path)
        if config.get("_class_name") not in ("ControlNetModel", None):
            raise NbkitError(
                f"this folder holds a {config.get('_class_name')}, not a ControlNetModel",
                path=folder,
                fix="pick a ControlNet folder",
            )
        return ControlNetSource(
            folder.name, str(folder), family_of_config(config), config.get("cross_attention_dim")
        )
    if Path(key).suffix.lower() in (".safetensors", ".ckpt", ".pth"):
        raise NbkitError(
            "single-file ControlNets are not supported",
            path=folder,
            fix="use the diffusers version of this ControlNet (a folder or a hub repo id)",
        )
    known = ", ".join(CONTROLNETS)
    raise NbkitError(f"no ControlNet is called {key!r}", fix=f"pick one of: {known}; or a diffusers folder")


def check_compatible(controlnet: ControlNetSource, unet_config: Any, model_family: str | None = None) -> None:
    """Refuse a ControlNet that does not fit the loaded model, with the reason and what would fit.

    Args:
        controlnet: the ControlNet.
        unet_config: the loaded UNet's config.
        model_family: the model's family name, or None to read its group from the UNet.
    """
    group = get_family(model_family).controlnet_group if model_family else None
    family = group or family_of_config(unet_config)
    get = getattr(unet_config, "get", None) or (lambda key, default=None: getattr(unet_config, key, default))
    if controlnet.family != family:
        fitting = ", ".join(spec.key for spec in CONTROLNETS.values() if spec.family == family)
        raise NbkitError(
            f"ControlNet {controlnet.name!r} is for {GROUP_TITLES[controlnet.family]} models, but the loaded "
            f"model is {GROUP_TITLES[family]}",
            fix=f"pick a {GROUP_TITLES[family]} ControlNet ({fitting}) or load a "
            f"{GROUP_TITLES[controlnet.family]} model",
        )
    width = get("cross_attention_dim")
    if controlnet.cross_attention_dim is not None and controlnet.cross_attention_dim != width:
        raise NbkitError(
            f"ControlNet {controlnet.name!r} reads a {controlnet.cross_attention_dim}-wide text context, "
            f"the loaded model gives {width}",
            fix="pick a ControlNet trained for this model",
        )


def load_controlnet(
    controlnet: ControlNetSource, *, torch_dtype: Any = None, cache_root: str | os.PathLike | None = None
):
    """Load a ControlNet (a local folder, or a hub repo into nbkit's model cache).

    Args:
        controlnet: what `find_controlnet` returned.
        torch_dtype: the weights' dtype.
        cache_root: the model cache (default `<storage_root>/models-cache`).
    """
    from diffusers import ControlNetModel

    from nbkit.models.sources import hub_token, models_cache

    local = Path(controlnet.source).is_dir()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if not local:
        kwargs.update(cache_dir=str(models_cache(cache_root) / "hub"), token=hub_token())
    try:
        return ControlNetModel.from_pretrained(controlnet.source, **kwargs)
    except OSError as error:
        raise NbkitError(
            f"could not load ControlNet {controlnet.name!r}: {error}",
            path=controlnet.source if local else None,
            fix="check the folder" if local else "check the network connection (the hub download failed)",
        ) from error


def resize_for_generation(image: Image.Image, width: int, height: int, resize_mode: int = 0) -> Image.Image:
    """`image` at width x height with A1111's resize modes (diffusers' `VaeImageProcessor.resize`, Lanczos).

    Args:
        image: the picture.
        width: the target width.
        height: the target height.
        resize_mode: 0 just resize (stretch), 1 crop and resize (fill, centre crop), 2 resize and fill
            (fit, the gaps filled by stretching the picture's edges), 3 (latent upscale) as 0.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be 0, 1, 2 or 3, got {resize_mode!r}")
    from diffusers.image_processor import VaeImageProcessor

    image = image.convert("RGB")
    mode = RESIZE_MODES[resize_mode] if image.size != (width, height) else "default"
    return VaeImageProcessor(resample="lanczos").resize(image, height, width, resize_mode=mode)


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """OpenCV's Canny edges of `image`, white on black, as an RGB control map of the same size."""
    import cv2
    import numpy as np

    if not 0 <= low_threshold <= high_threshold <= 255:
        raise ValueError(
            f"canny thresholds must satisfy 0 <= low <= high <= 255, got {low_threshold}, {high_threshold}"
        )
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(edges).convert("RGB")


class DepthEstimator:
    """A transformers depth-estimation model that makes depth control maps (near is white).

    Args:
        model: a hub repo id or a local folder with the model and its image processor.
        device: where to run it.
        cache_root: the model cache for hub downloads.
    """

    def __init__(self, model: str = DEFAULT_DEPTH_MODEL, *, device: Any = "cpu", cache_root=None):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from nbkit.models.sources import models_cache

        kwargs: dict[str, Any] = {}
        if not Path(model).is_dir():
            kwargs["cache_dir"] = str(models_cache(cache_root) / "hub")
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, **kwargs)
            self.model = AutoModelForDepthEstimation.from_pretrained(model, **kwargs).to(device).eval()
        except OSError as error:
            raise NbkitError(
                f"could not load the depth model {model!r}: {error}",
                fix="check the network connection, or give a local depth-estimation model folder",
            ) from error
        self.name = model
        self.device = device

    def __call__(self, image: Image.Image) -> Image.Image:
        """The depth map of `image`, as an RGB picture of the same size."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            depth = self.model(**inputs).predicted_depth
        depth = torch.nn.functional.interpolate(
            depth[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]
        low, high = depth.min(), depth.max()
        depth = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        pixels = (depth * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(pixels).convert("RGB")


def preprocess(
    image: Image.Image,
    preprocessor: str,
    width: int,
    height: int,
    *,
    resize_mode: int = 0,
    depth: DepthEstimator | None = None,
    low_threshold: int = 100,
    high_threshold: int = 200,
) -> Image.Image:
    """The control map for `image` at the generation size.

    Args:
        image: the user's picture.
        preprocessor: `none`, `canny` or `depth`.
        width: the generation width.
        height: the generation height.
        resize_mode: A1111's resize mode for fitting the picture to the size.
        depth: the depth estimator (required for `depth`).
        low_threshold: Canny's low threshold.
        high_threshold: Canny's high threshold.
    """
    name = preprocessor.strip().lower()
    if name not in PREPROCESSORS:
        raise NbkitError(
            f"no preprocessor is called {preprocessor!r}", fix=f"use one of: {', '.join(PREPROCESSORS)}"
        )
    fitted = resize_for_generation(image, width, height, resize_mode)
    if name == "canny":
        return canny(fitted, low_threshold, high_threshold)
    if name == "depth":
        if depth is None:
            raise ValueError("the depth preprocessor needs a DepthEstimator")
        return depth(fitted)
    return fitted
