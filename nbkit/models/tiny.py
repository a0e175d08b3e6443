"""Tiny random-weight models, built offline: each family's pipeline (by its family object), a ControlNet
for it, and a depth-estimation model.

Each family's tiny model has the block layout, attention flavour, text encoder shape, scheduler and VAE
scaling of the real checkpoint it stands for, only with tiny widths (`Family.make_tiny_pipeline`), so
that every loader, converter and training path nbkit runs on them is the real one, on CPU, in seconds.
Its default image size is the family's `tiny_native_resolution`, standing for the real
`native_resolution`.

diffusers and transformers are imported inside the functions so that importing this module (for
`TINY_FAMILIES` in a CLI parser) stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, Family
from nbkit.families._tiny import check_replaceable
from nbkit.fsio import atomic_directory

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

TINY_FAMILIES = tuple(FAMILIES)

__all__ = [
    "TINY_FAMILIES",
    "build_tiny_controlnet",
    "build_tiny_pipeline",
    "check_family",
    "check_replaceable",
    "save_tiny_controlnet",
    "save_tiny_depth_model",
    "save_tiny_pipeline",
]


def check_family(family: str) -> Family:
    """Return the family object of `family`, or raise `NbkitError` unless it is one of `TINY_FAMILIES`.

    Args:
        family: the tiny family name to check.
    """
    if family not in FAMILIES:
        raise NbkitError(
            f"Unknown tiny model family {family!r}.",
            fix=f"Use one of: {', '.join(FAMILIES)}.",
        )
    return FAMILIES[family]


def build_tiny_pipeline(family: str, *, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of `family` in memory (`Family.build_tiny_pipeline`).

    The same `family` and `seed` give bit-identical weights; the global torch RNG is left as it was.

    Args:
        family: one of `TINY_FAMILIES`.
        seed: seed for the weight initialisation.

    Returns:
        The family's pipeline (its `pipeline_class`) in fp32 on CPU.
    """
    return check_family(family).build_tiny_pipeline(seed=seed)


def save_tiny_pipeline(
    family: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Build a tiny pipeline of `family` and save it as an ordinary diffusers folder (`Family.build_tiny`).

    Args:
        family: one of `TINY_FAMILIES`.
        out_dir: folder to save into, replaced atomically: new, empty or an earlier saved pipeline. It
            gets the usual model_index.json and a folder per component.
        seed: seed for the weight initialisation.
        safe_serialization: save weights as .safetensors (True) or pickled .bin (False, the legacy
            format some old repositories still ship), for every component.

    Returns:
        `out_dir` as a Path.
    """
    return check_family(family).build_tiny(out_dir, seed=seed, safe_serialization=safe_serialization)


def build_tiny_controlnet(family: str, *, seed: int = 0):
    """A tiny ControlNet for the tiny `family` model (`Family.build_tiny_controlnet`).

    Args:
        family: one of `TINY_FAMILIES` that has ControlNets.
        seed: seed for the tiny model it copies (its own weights use `seed + 1`).
    """
    return check_family(family).build_tiny_controlnet(seed=seed)


def save_tiny_controlnet(family: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny ControlNet (`build_tiny_controlnet`) and save it as a diffusers folder.

    Args:
        family: one of `TINY_FAMILIES` that has ControlNets.
        out_dir: the folder, replaced atomically (new, empty, or a model saved earlier).
        seed: as for `build_tiny_controlnet`.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    controlnet = build_tiny_controlnet(family, seed=seed)
    with atomic_directory(out_dir) as temporary:
        controlnet.save_pretrained(temporary)
    return out_dir


def save_tiny_depth_model(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny random DPT depth-estimation model with its image processor, loadable with
    `AutoModelForDepthEstimation` / `AutoImageProcessor` (stands in for a real depth model offline).

    Args:
        out_dir: the folder, replaced atomically (new, empty, or a model saved earlier).
        seed: seed for the weights.
    """
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(16, 16, 16, 16),
        fusion_hidden_size=16,
        use_auxiliary_head=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
    return out_dir
