"""Load a base model as a diffusers pipeline, whatever form it came in, and tell its family.

The family comes from the configs a diffusers folder carries (model_index.json, the UNet's, the
scheduler's, the text encoder's), never from file sizes: SDXL has a second text encoder and `text_time`
conditioning, SD 2.x has OpenCLIP (1024-wide cross attention, linear projections, gelu), and the
scheduler says whether the UNet predicts noise or v.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, NamedTuple

from nbkit.errors import NbkitError
from nbkit.fsio import read_json
from nbkit.models.registry import get_family
from nbkit.models.sources import OPTIONAL_COMPONENTS, ResolvedSource, resolve_source


class DetectedFamily(NamedTuple):
    """What a model folder's configs say it is.

    Args:
        family: `sd1`, `sd2`, `sd2-v` or `sdxl`.
        prediction_type: `epsilon` or `v_prediction` (from the scheduler).
        native_resolution: the UNet's default image size in pixels.
    """

    family: str
    prediction_type: str
    native_resolution: int


def _config(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError as error:
        raise NbkitError(
            f"not valid JSON ({error})", path=path, fix="download or save the model again"
        ) from error


def detect_family_from_config(folder: str | os.PathLike) -> DetectedFamily:
    """Tell the family, prediction type and native resolution of a diffusers folder from its configs.

    Args:
        folder: a diffusers pipeline folder (with model_index.json and unet/config.json).
    """
    folder = Path(folder)
    index = _config(folder, "model_index.json")
    unet = _config(folder, "unet/config.json")
    if not index or not unet:
        raise NbkitError(
            "cannot tell the model family: model_index.json or unet/config.json is missing",
            path=folder,
            fix="give a diffusers pipeline folder",
        )
    text_encoder = _config(folder, "text_encoder/config.json")
    scheduler = _config(folder, "scheduler/scheduler_config.json")
    vae = _config(folder, "vae/config.json")

    second_encoder = index.get("text_encoder_2")
    has_second_encoder = isinstance(second_encoder, list) and None not in second_encoder
    if has_second_encoder or unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
    else:
        cross_attention = unet.get("cross_attention_dim")
        cross_attention = cross_attention[0] if isinstance(cross_attention, list | tuple) else cross_attention
        # OpenCLIP ViT-H: 1024 wide, plain gelu (CLIP ViT-L of SD 1.x uses quick_gelu).
        open_clip = text_encoder.get("hidden_act") == "gelu" or text_encoder.get("hidden_size") == 1024
        family = "sd2" if cross_attention == 1024 or unet.get("use_linear_projection") or open_clip else "sd1"
    prediction_type = scheduler.get("prediction_type") or "epsilon"
    if family == "sd2" and prediction_type == "v_prediction":
        family = "sd2-v"
    sample_size = unet.get("sample_size") or get_family(family).native_resolution // 8
    sample_size = max(sample_size) if isinstance(sample_size, list | tuple) else sample_size
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return DetectedFamily(family, prediction_type, int(sample_size) * vae_scale)


def load_pipeline(
    source: str | os.PathLike,
    *,
    family: str | None = None,
    torch_dtype: Any = None,
    device: Any = None,
    revision: str | None = None,
    fp16: bool | None = None,
    cache_root: str | os.PathLike | None = None,
):
    """Load `source` as a diffusers pipeline.

    Args:
        source: anything `resolve_source` takes: a registry key, hub repo id, folder, file or URL.
        family: the family the caller expects; a diffusers folder of another family is an error, and a
            single-file checkpoint is converted as this family.
        torch_dtype: the weights' dtype (default: as saved, usually float32).
        device: where to move the pipeline (default: stay on the CPU).
        revision: a hub revision.
        fp16: download the hub's fp16 weights (None: the registry's choice).
        cache_root: the model cache (default `<storage_root>/models-cache`).

    Returns:
        A `DiffusionPipeline` (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`).
    """
    if family is not None:
        get_family(family)
    resolved = resolve_source(source, revision=revision, fp16=fp16, cache_root=cache_root)
    if resolved.kind == "single_file":
        pipeline = _load_single_file(resolved, family=family, torch_dtype=torch_dtype)
    else:
        pipeline = _load_folder(resolved, family=family, torch_dtype=torch_dtype)
    return pipeline.to(device) if device is not None else pipeline


def _load_folder(resolved: ResolvedSource, *, family: str | None, torch_dtype: Any):
    from diffusers import DiffusionPipeline

    folder = resolved.path
    detected = detect_family_from_config(folder)
    if family is not None and detected.family != family:
        raise NbkitError(
            f"this model is {detected.family} ({get_family(detected.family).title}), not the expected {family}",
            path=folder,
            fix=f"pick a {family} model, or choose family {detected.family}",
        )
    kwargs: dict[str, Any] = {"variant": resolved.variant}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    index = read_json(folder / "model_index.json")
    for name in OPTIONAL_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and None not in entry and not _has_weights_or_config(folder / name):
            kwargs[name] = None  # nbkit's hub downloads leave these out; people's own models run without
            if name == "safety_checker":
                kwargs["requires_safety_checker"] = False
    try:
        return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)
    except OSError as error:
        raise NbkitError(
            f"diffusers could not load this folder: {str(error).splitlines()[0]}",
            path=folder,
            fix="download or save the model again; a file in it is missing or damaged",
        ) from error


def _has_weights_or_config(component: Path) -> bool:
    if not component.is_dir():
        return False
    names = {path.name for path in component.iterdir()}
    if "config.json" in names:  # a model: only its weights make it loadable
        return any(name.endswith((".safetensors", ".bin")) for name in names)
    return any(name.endswith(".json") for name in names)


def _load_single_file(resolved: ResolvedSource, *, family: str | None, torch_dtype: Any):
    try:
        convert = importlib.import_module("nbkit.convert")
    except ModuleNotFoundError as error:
        if error.name != "nbkit.convert":
            raise
        convert = None
    load_single_file = getattr(convert, "load_single_file", None)
    if load_single_file is None:
        raise NbkitError(
            "loading a single-file checkpoint needs nbkit.convert.load_single_file, which this "
            "installation lacks",
            path=resolved.path,
            fix="convert the file to a diffusers folder first, or install the full nbkit",
        )
    kwargs: dict[str, Any] = {"family": family or (resolved.spec.family if resolved.spec else None)}
    if torch_dtype is not None and "torch_dtype" in inspect.signature(load_single_file).parameters:
        kwargs["torch_dtype"] = torch_dtype
        torch_dtype = None
    pipeline = load_single_file(resolved.path, **kwargs)
    return pipeline.to(dtype=torch_dtype) if torch_dtype is not None else pipeline
