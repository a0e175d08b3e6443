"""ControlNet for the web UI: which ControlNet fits which model, preprocessors, and loading.

A ControlNet is trained against one architecture group of model families (`Family.controlnet_group`):
SD 1.5's ControlNets (768-wide text context) do not fit SD 2.x (1024) or SDXL (2048, with its text_time
embedding). `CONTROLNETS` lists the hub models the families name (`Family.controlnets`); a local
diffusers folder's group is read from its `config.json` by the families (`Family.fits_controlnet_config`).
`check_compatible` refuses a pair that does not fit, before any weights load, with a reason and the ones
that would.

Preprocessors turn a picture into the control map a ControlNet expects: `canny` (OpenCV's edge
detector), `depth` (a transformers depth-estimation model, Depth Anything V2 Small by default) and
`none` (the picture already is the map). The map is made at the generation size, or (`resolution`, the
extension's `processor_res`) at that size on its short side and then fitted to the generation size.

The sd-webui-controlnet extension's names map onto these: `MODULES` are its preprocessors ("modules")
that nbkit runs, with their sliders (`threshold_a/b` are Canny's thresholds), `MODULE_ALIASES` its
other depth estimators (they run as Depth Anything V2); its model names ("control_v11p_sd15_canny
[d14c016b]", or just "canny") are resolved by `find_controlnet` as the extension resolves them: the
name without its hash, case-insensitively, else the shortest name that contains it. Local diffusers
ControlNet folders are offered from `<storage root>/controlnet/` (`local_controlnets`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
# The extension's names of resize modes 0..2 (its units' `resize_mode`), and the older ones it still reads.
RESIZE_MODE_NAMES = ("Just Resize", "Crop and Resize", "Resize and Fill")
RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": 1,
    "Scale to Fit (Inner Fit)": 1,
    "Outer Fit (Shrink to Fit)": 2,
    "Envelope (Outer Fit)": 2,
}
# The extension's control modes 0..2: 1 scales the ControlNet's outputs down towards the shallow blocks
# (diffusers' `guess_mode` scales), 2 also applies them to the conditional half of CFG only.
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
LOCAL_FOLDER = "controlnet"  # <storage root>/controlnet/: local diffusers ControlNet folders
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")  # " [d14c016b]" after an extension model name


@dataclasses.dataclass(frozen=True)
class Slider:
    """One of a preprocessor's parameters, as the extension's `/controlnet/module_list` describes it.

    Args:
        name: its label.
        value: the default, used for a value out of range (as the extension does).
        minimum: the smallest value.
        maximum: the largest value.
        step: the slider's step.
    """

    name: str
    value: float
    minimum: float
    maximum: float
    step: float

    def pick(self, value: float | None) -> float:
        """`value` when in range, else the default (the extension's -1 means "the default")."""
        return value if value is not None and self.minimum <= value <= self.maximum else self.value

    def to_api(self) -> dict[str, float | str]:
        return {
            "name": self.name,
            "value": self.value,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
        }


@dataclasses.dataclass(frozen=True)
class Module:
    """A preprocessor under the extension's name, and the nbkit preprocessor that runs it.

    Args:
        name: the extension's name ("canny", "depth_anything_v2").
        preprocessor: what nbkit runs: `none`, `canny` or `depth`.
        control_type: the extension's control type ("Canny", "Depth"; None: every type offers it).
        resolution: the `processor_res` slider (None: the preprocessor sees the picture as it is).
        threshold_a: the `threshold_a` slider (None: not used).
        threshold_b: the `threshold_b` slider (None: not used).
    """

    name: str
    preprocessor: str
    control_type: str | None = None
    resolution: Slider | None = None
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None

    @property
    def sliders(self) -> list[Slider]:
        return [slider for slider in (self.resolution, self.threshold_a, self.threshold_b) if slider]


_RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
MODULES: dict[str, Module] = {
    module.name: module
    for module in (
        Module("none", "none"),
        Module(
            "canny",
            "canny",
            "Canny",
            _RESOLUTION,
            Slider("Low Threshold", 100, 1, 255, 1),
            Slider("High Threshold", 200, 1, 255, 1),
        ),
        Module("depth_anything_v2", "depth", "Depth"),
    )
}
# The extension's other monocular depth estimators, and nbkit's own name: they run as nbkit's depth.
MODULE_ALIASES = {
    name: "depth_anything_v2"
    for name in ("depth", "depth_midas", "depth_zoe", "depth_leres", "depth_leres++", "depth_anything")
}


def find_module(name: str | None) -> Module:
    """The preprocessor an extension module name (or nbkit's `none`/`canny`/`depth`) names.

    Raises:
        NbkitError: a module nbkit does not run, naming the ones it does.
    """
    key = (name or "none").strip()
    key = key if key in MODULES else key.lower()
    key = MODULE_ALIASES.get(key, key)
    if key not in MODULES:
        raise NbkitError(
            f"ControlNet module {name!r} is not available here; nbkit has: {', '.join(MODULES)}",
            fix="use one of those (the extension's other depth modules run as depth_anything_v2; with none, "
            "send a ready control map as the image)",
        )
    return MODULES[key]


def resize_mode_index(value: int | str) -> int:
    """A unit's resize mode (0 just resize, 1 crop and resize, 2 resize and fill) from the extension's int
    or name; 3 (A1111's latent upscale) and larger ints resize as 0, as the extension does.

    Raises:
        ValueError: a negative int or an unknown name.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"resize_mode must be 0, 1 or 2, got {value}")
        return value if value < len(RESIZE_MODE_NAMES) else 0
    text = str(value).strip()
    names = {name.lower(): index for index, name in enumerate(RESIZE_MODE_NAMES)}
    names.update({name.lower(): index for name, index in RESIZE_MODE_ALIASES.items()})
    if text.lower() not in names:
        raise ValueError(f"resize_mode {value!r} is not one of {', '.join(RESIZE_MODE_NAMES)} (or 0, 1, 2)")
    return names[text.lower()]


def control_mode_index(value: int | str) -> int:
    """A unit's control mode (0, 1, 2) from the extension's int or name.

    Raises:
        ValueError: another int or name.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in range(len(CONTROL_MODES)):
            raise ValueError(f"control_mode must be 0, 1 or 2, got {value}")
        return value
    names = [name.lower() for name in CONTROL_MODES]
    if str(value).strip().lower() not in names:
        raise ValueError(f"control_mode {value!r} is not one of {', '.join(CONTROL_MODES)} (or 0, 1, 2)")
    return names.index(str(value).strip().lower())


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


def local_controlnets(storage_root: str | os.PathLike | None) -> dict[str, Path]:
    """The diffusers ControlNet folders (a `config.json` inside) in `<storage_root>/controlnet/`, by name."""
    folder = Path(storage_root) / LOCAL_FOLDER if storage_root is not None else None
    if folder is None or not folder.is_dir():
        return {}
    return {child.name: child for child in sorted(folder.iterdir()) if (child / "config.json").is_file()}


def controlnet_names(storage_root: str | os.PathLike | None = None) -> list[str]:
    """The ControlNets on offer (the extension's `/controlnet/model_list`): the registry's, then the local
    folders'."""
    return [*CONTROLNETS, *(name for name in local_controlnets(storage_root) if name not in CONTROLNETS)]


def _folder_source(folder: Path) -> ControlNetSource:
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


def _group_of(name: str, local: dict[str, Path]) -> str | None:
    if name in CONTROLNETS:
        return CONTROLNETS[name].family
    try:
        return _folder_source(local[name]).family
    except (NbkitError, OSError, ValueError):
        return None


def is_registry_name(key: str) -> bool:
    """Whether `key` is a `CONTROLNETS` key or its hub repo id."""
    return any(key.strip() in (spec.key, spec.repo_id) for spec in CONTROLNETS.values())


def find_controlnet(
    key: str, *, storage_root: str | os.PathLike | None = None, group: str | None = None
) -> ControlNetSource:
    """The ControlNet a name, hub repo id or local diffusers folder names.

    Args:
        key: a `CONTROLNETS` key or its repo id, a folder name in `<storage_root>/controlnet/`, a folder
            holding a ControlNet's config.json, or an extension model name ("control_v11p_sd15_canny
            [d14c016b]": without its hash, case-insensitively, else the shortest name containing it).
        storage_root: where the local ControlNet folders are (None: none).
        group: the loaded model's ControlNet group: a partial name prefers the ControlNets that fit it.
    """
    key = key.strip()
    for spec in CONTROLNETS.values():
        if key in (spec.key, spec.repo_id):
            return ControlNetSource(spec.key, spec.repo_id, spec.family)
    local = local_controlnets(storage_root)
    if key in local:
        return _folder_source(local[key])
    folder = Path(key).expanduser()
    if key and folder.is_dir():
        return _folder_source(folder)
    if folder.suffix.lower() in (".safetensors", ".ckpt", ".pth"):
        raise NbkitError(
            "single-file ControlNets are not supported",
            path=folder,
            fix="use the diffusers version of this ControlNet (a folder or a hub repo id)",
        )
    wanted = _HASH_SUFFIX.sub("", key).lower()
    names = {name.lower(): name for name in controlnet_names(storage_root)}
    if wanted in names:
        return find_controlnet(names[wanted], storage_root=storage_root)
    matches = sorted((name for name in names if wanted and wanted in name), key=len)
    fitting = [name for name in matches if group is not None and _group_of(names[name], local) == group]
    if fitting or matches:
        return find_controlnet(names[(fitting or matches)[0]], storage_root=storage_root)
    known = ", ".join(controlnet_names(storage_root))
    raise NbkitError(
        f"no ControlNet is called {key!r}",
        fix=f"pick one of: {known}; or put a diffusers ControlNet folder into <storage root>/{LOCAL_FOLDER}/",
    )


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


def scale_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """`image` scaled so that its short side is `resolution` (the extension's `processor_res`).

    A very elongated picture would get huge at a large resolution: its area is kept within four times
    `resolution` squared, so what a request makes the server allocate stays bounded.
    """
    width, height = image.size
    scale = min(resolution / min(width, height), math.sqrt(4 * resolution**2 / (width * height)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def _check_preprocessor(preprocessor: str) -> str:
    name = preprocessor.strip().lower()
    if name not in PREPROCESSORS:
        raise NbkitError(
            f"no preprocessor is called {preprocessor!r}", fix=f"use one of: {', '.join(PREPROCESSORS)}"
        )
    return name


def detect(
    image: Image.Image,
    preprocessor: str,
    *,
    resolution: int | None = None,
    depth: DepthEstimator | None = None,
    low_threshold: int = 100,
    high_threshold: int = 200,
) -> Image.Image:
    """The control map of `image` as the preprocessor makes it (the extension's `/controlnet/detect`).

    Args:
        image: the picture.
        preprocessor: `none`, `canny` or `depth`.
        resolution: the short side Canny sees the picture at (None: as it is); depth and none see it as
            it is, as the extension's do.
        depth: the depth estimator (required for `depth`).
        low_threshold: Canny's low threshold.
        high_threshold: Canny's high threshold.
    """
    name = _check_preprocessor(preprocessor)
    image = image.convert("RGB")
    if name == "canny":
        return canny(
            image if resolution is None else scale_short_side(image, resolution),
            low_threshold,
            high_threshold,
        )
    if name == "depth":
        if depth is None:
            raise ValueError("the depth preprocessor needs a DepthEstimator")
        return depth(image)
    return image


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
    resolution: int | None = None,
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
        resolution: Canny's `processor_res`: its map is made at this short side, then fitted to the size
            (and made black and white again). None: the picture is fitted first and the map made at the
            generation size (the extension's "pixel perfect").
    """
    name = _check_preprocessor(preprocessor)
    options = {"depth": depth, "low_threshold": low_threshold, "high_threshold": high_threshold}
    if resolution is None or name != "canny":
        return detect(resize_for_generation(image, width, height, resize_mode), name, **options)
    edges = resize_for_generation(
        detect(image, name, resolution=resolution, **options), width, height, resize_mode
    )
    return edges.point(lambda value: 255 if value >= 128 else 0)


def unit_picture(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The picture a unit's preprocessor sees, from its image and mask, as the extension decides: a mask
    that is all (nearly) black or all white leaves the image; any other mask is a scribble drawn on the
    canvas, and the mask itself is the picture.

    Raises:
        ValueError: a mask of another size than the image.
    """
    if mask is None:
        return image
    if mask.size != image.size:
        raise ValueError(
            f"the ControlNet mask is {mask.size[0]}x{mask.size[1]}, its image {image.size[0]}x{image.size[1]}"
        )
    low, high = mask.convert("L").getextrema()
    if high <= 5 or low >= 250:
        return image
    return mask.convert("L").convert("RGB")


def unit_infotext(unit: Any, model: str) -> str:
    """A unit's infotext value (`ControlNet 0: "Module: canny, Model: ..., Control Mode: Balanced"`), with
    the fields and names the extension writes, so PNG Info and the extension read it back.

    Args:
        unit: a `nbkit.webui.requests.ControlNetUnit`.
        model: the name of the ControlNet that ran.
    """
    fields = {
        "Module": unit.module or unit.preprocessor,
        "Model": model,
        "Weight": float(unit.weight),
        "Resize Mode": RESIZE_MODE_NAMES[unit.resize_mode],
        "Processor Res": unit.processor_res,
        "Threshold A": float(unit.low_threshold),
        "Threshold B": float(unit.high_threshold),
        "Guidance Start": float(unit.guidance_start),
        "Guidance End": float(unit.guidance_end),
        "Pixel Perfect": bool(unit.pixel_perfect),
        "Control Mode": CONTROL_MODES[unit.control_mode],
    }
    # The extension splits the value on "," and ": ": names holding them would not read back.
    return ", ".join(
        f"{key}: {str(value).replace(',', ' ').replace(': ', ' ')}" for key, value in fields.items()
    )
