"""Load a base model as a diffusers pipeline, whatever form it came in, and tell its family.

A diffusers folder's family comes from its configs (`nbkit.families.detect_family_from_config`,
re-exported here); a single-file checkpoint is loaded by `nbkit.convert.load_single_file`. FLUX.1's
transformer and T5 may load with 8-bit or 4-bit weights (`nbkit.models.quantization`) from a diffusers
folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from nbkit.convert import load_single_file
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, DetectedFamily, detect_family_from_config, get_family
from nbkit.fsio import read_json
from nbkit.models.sources import OPTIONAL_COMPONENTS, ResolvedSource, resolve_source

__all__ = ["DetectedFamily", "detect_family_from_config", "load_pipeline"]


def load_pipeline(
    source: str | os.PathLike,
    *,
    family: str | None = None,
    torch_dtype: Any = None,
    device: Any = None,
    revision: str | None = None,
    fp16: bool | None = None,
    cache_root: str | os.PathLike | None = None,
    quantization: Literal["8bit", "4bit"] | None = None,
    quantizer: str | None = None,
    quantized_components: Sequence[str] | None = None,
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
        quantization: `8bit` or `4bit`: load FLUX.1's big components with quantized weights
            (bitsandbytes on CUDA, else torchao int8 for 8-bit); None: as saved.
        quantizer: insist on `bitsandbytes` or `torchao` (None: the first usable).
        quantized_components: what to quantize (default: the transformer and the T5 encoder).

    Returns:
        A `DiffusionPipeline` (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `FluxPipeline`).

    Raises:
        NbkitError: the source is not the expected family, is damaged, or cannot load quantized
            (a single file, an SD family, no backend for the bit width).
    """
    if family is not None:
        get_family(family)
    resolved = resolve_source(source, revision=revision, fp16=fp16, cache_root=cache_root)
    if resolved.kind == "single_file":
        if quantization is not None:
            raise NbkitError(
                f"{quantization} weights load from a diffusers folder, not a single-file checkpoint",
                path=resolved.path,
                fix="convert it to a diffusers folder (`nbkit convert FILE FOLDER --dtype bf16`) and load that "
                "folder, or use a GPU with room for the unquantized model",
            )
        pipeline = _load_single_file(resolved, family=family, torch_dtype=torch_dtype)
    else:
        quantization_config = None
        if quantization is not None:
            from nbkit.models import quantization as quant

            quantization_config = quant.quantization_config(
                quantization,
                quantizer=quantizer,
                components=quant.QUANTIZED_COMPONENTS
                if quantized_components is None
                else quantized_components,
            )
        pipeline = _load_folder(
            resolved, family=family, torch_dtype=torch_dtype, quantization_config=quantization_config
        )
    return pipeline.to(device) if device is not None else pipeline


def folder_family(folder: Path, family: str | None = None) -> DetectedFamily:
    """The family a diffusers folder's configs say it is.

    Args:
        folder: the pipeline folder.
        family: the family it must be (None: any).

    Raises:
        NbkitError: the folder is another family than `family`.
    """
    detected = detect_family_from_config(folder)
    if family is not None and detected.family != family:
        raise NbkitError(
            f"this model is {detected.family} ({get_family(detected.family).title}), not the expected {family}",
            path=folder,
            fix=f"pick a {family} model, or choose family {detected.family}",
        )
    return detected


def _load_folder(resolved: ResolvedSource, *, family: str | None, torch_dtype: Any, quantization_config: Any):
    from diffusers import DiffusionPipeline

    folder = resolved.path
    detected = folder_family(folder, family)
    kwargs: dict[str, Any] = {"variant": resolved.variant}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if quantization_config is not None:
        if not get_family(detected.family).quantizable:
            titles = [family.title for family in FAMILIES.values() if family.quantizable]
            quantizable = " and ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)
            raise NbkitError(
                f"8-bit and 4-bit weights are for {quantizable}; this model is {get_family(detected.family).title}",
                path=folder,
                fix="load it without quantization: every GPU nbkit supports has room for it",
            )
        kwargs["quantization_config"] = quantization_config
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
    family = family or (resolved.spec.family if resolved.spec else None)
    return load_single_file(resolved.path, family=family, torch_dtype=torch_dtype)
