"""Load a base model as a diffusers pipeline, whatever form it came in, and tell its family.

A diffusers folder's family comes from its configs (`nbkit.models.registry.detect_family_from_config`,
re-exported here); a single-file checkpoint is loaded by `nbkit.convert.load_single_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbkit.convert import load_single_file
from nbkit.errors import NbkitError
from nbkit.fsio import read_json
from nbkit.models.registry import DetectedFamily, detect_family_from_config, get_family
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
    family = family or (resolved.spec.family if resolved.spec else None)
    return load_single_file(resolved.path, family=family, torch_dtype=torch_dtype)
