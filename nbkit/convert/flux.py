"""FLUX.1 transformer: diffusers <-> the Black Forest Labs (BFL) single file that ComfyUI and Forge read.

The BFL layout (that of `flux1-dev.safetensors`) is FLUX.1's `transformer_layout`
(`nbkit.families._layout_flux1`); the file is written and read by the family-agnostic
`nbkit.convert.transformer_file`. These are its FLUX.1 names, which check that the model is FLUX.1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.transformer_file import (
    diffusers_to_original,
    load_transformer_file,
    merge_metadata,
    save_transformer_file,
    transformer_folder,
    transformer_modelspec,
)
from nbkit.families._layout_flux1 import TRANSFORMER_CLASS, flux_modules
from nbkit.families.facts import FusedModule
from nbkit.families.flux1 import FAMILY as FLUX

FluxModule = FusedModule  # FLUX.1's name for a module of its original layout

__all__ = [
    "TRANSFORMER_CLASS",
    "FluxModule",
    "diffusers_to_bfl",
    "flux_modelspec",
    "flux_modules",
    "is_flux_folder",
    "load_flux_transformer",
    "merge_metadata",
    "save_flux_transformer",
]


def diffusers_to_bfl(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in the BFL layout (exact, same dtypes)."""
    return diffusers_to_original(state_dict, {"_class_name": TRANSFORMER_CLASS, **dict(config)})


def flux_modelspec(
    *, architecture: str, title: str, description: str, resolution: int | None = None
) -> dict[str, str]:
    """The SAI model spec keys of a FLUX.1 file (a transformer or a LoRA)."""
    return transformer_modelspec(
        FLUX, architecture=architecture, title=title, description=description, resolution=resolution
    )


def is_flux_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a FLUX.1 diffusers pipeline folder or a FLUX.1 transformer folder."""
    folder = transformer_folder(path)
    if folder is None:
        return False
    from nbkit.fsio import read_json

    return read_json(folder / "config.json").get("_class_name") == TRANSFORMER_CLASS


def save_flux_transformer(
    source: Any,
    out_file: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a FLUX.1 transformer as one .safetensors file in the BFL layout (ComfyUI, Forge, diffusers).

    Args:
        source: a `FluxTransformer2DModel`, a FLUX.1 diffusers pipeline folder, or its transformer folder.
        out_file: the `.safetensors` file to write.
        dtype: the floating-point weights' dtype; None keeps the source's.
        metadata: extra header metadata; it may not set the architecture.

    Raises:
        NbkitError: for a source that is not a FLUX.1 transformer, a bad name or dtype, or a failed check.
    """
    return save_transformer_file(source, out_file, dtype=dtype, metadata=metadata, family=FLUX)


def load_flux_transformer(
    single_file: str | os.PathLike,
    config_folder: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
):
    """Load a BFL-layout FLUX.1 transformer file with diffusers' own single-file loader, offline.

    Args:
        single_file: the `.safetensors` file (BFL keys, optionally under `model.diffusion_model.`).
        config_folder: the base model's diffusers pipeline folder, or its transformer folder; None uses
            the config nbkit stored in the file.
        torch_dtype: the model's dtype (default: the file's).

    Returns:
        A `FluxTransformer2DModel` on the CPU, in eval mode.
    """
    return load_transformer_file(
        single_file,
        config_folder,
        torch_dtype=torch_dtype,
        family=FLUX,
        loader="nbkit.convert.flux.load_flux_transformer",
    )
