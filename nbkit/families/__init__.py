"""The model families nbkit knows, one module each, and the questions asked of all of them.

`FAMILIES` maps a family's name to its `Family` object (`nbkit.families.base`): SD 1.x, SD 2.x (512 and
768-v), SDXL, FLUX.1, Z-Image and FLUX.2 [klein], plus any family another package registers under the `nbkit.families` entry-point
group (a `Family` object, or a module with a `FAMILY`). `get_family` looks one up by name and
`detect_family_from_config` asks each family, most specific first, whether a diffusers folder is one of
its models.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.families import flux1, flux2, sd1, sd2, sdxl, zimage
from nbkit.families.base import Family
from nbkit.families.facts import DetectedFamily, FolderConfigs
from nbkit.fsio import read_json

ENTRY_POINT_GROUP = "nbkit.families"

FAMILIES: dict[str, Family] = {}
# The family of a session or file that names none (sessions made before families were recorded), and
# of the demo: SD 1.x, what the fast-DreamBooth notebooks trained.
DEFAULT_FAMILY = sd1.FAMILY.name


def register_family(family: Family) -> Family:
    """Add `family` to `FAMILIES` (a name already taken is refused).

    Args:
        family: the family object.

    Raises:
        ValueError: when its name is taken by another family.
    """
    if not isinstance(family, Family):
        raise ValueError(f"{family!r} is not a nbkit.families.base.Family")
    taken = FAMILIES.get(family.name)
    if taken is not None and taken is not family:
        raise ValueError(f"model family name {family.name!r} is taken by {taken!r}")
    FAMILIES[family.name] = family
    return family


for _family in (sd1.FAMILY, sd2.FAMILY, sd2.FAMILY_V, sdxl.FAMILY, flux1.FAMILY, zimage.FAMILY, flux2.FAMILY):
    register_family(_family)


def _load_plugins() -> None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            register_family(getattr(loaded, "FAMILY", loaded))
        except Exception as error:  # a broken plugin must not take nbkit down with it
            warnings.warn(f"model family plugin {entry.value!r} was not loaded: {error}", stacklevel=2)


_load_plugins()


def most_specific_first() -> list[Family]:
    """The families in the order they are asked to claim a folder, a file or a pipeline: by descending
    `detection_priority`, so the most general family (SD 1.x, any UNet) answers last."""
    return sorted(FAMILIES.values(), key=lambda family: -family.detection_priority)


def get_family(name: str) -> Family:
    """Return family `name`, or raise `NbkitError` listing the families."""
    if name not in FAMILIES:
        raise NbkitError(f"unknown model family {name!r}", fix=f"use one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


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


def read_folder_configs(folder: str | os.PathLike) -> FolderConfigs:
    """Read the configs of a diffusers folder that tell its family.

    Raises:
        NbkitError: when the folder lacks model_index.json or its denoiser's config, or a config is not JSON.
    """
    folder = Path(folder)
    index = _config(folder, "model_index.json")
    denoiser_name = "transformer" if "transformer" in index else "unet"
    denoiser = _config(folder, f"{denoiser_name}/config.json")
    if not index or not denoiser:
        raise NbkitError(
            f"cannot tell the model family: model_index.json or {denoiser_name}/config.json is missing",
            path=folder,
            fix="give a complete diffusers pipeline folder",
        )
    return FolderConfigs(
        folder=folder,
        index=index,
        denoiser=denoiser,
        text_encoder=_config(folder, "text_encoder/config.json"),
        scheduler=_config(folder, "scheduler/scheduler_config.json"),
        vae=_config(folder, "vae/config.json"),
    )


def detect_family_from_config(folder: str | os.PathLike) -> DetectedFamily:
    """Tell the family, prediction type and native resolution of a diffusers folder from its configs.

    Never from file sizes: each family reads the configs (FLUX.1 has a `transformer`, SDXL a second
    text encoder and `text_time` conditioning, SD 2.x OpenCLIP, and the scheduler says whether the UNet
    predicts noise or v), the most specific family first.

    Args:
        folder: a diffusers pipeline folder (with model_index.json and unet/ or transformer/config.json).

    Raises:
        NbkitError: when the folder lacks a config, a config is not JSON, or no family claims it.
    """
    configs = read_folder_configs(folder)
    for family in most_specific_first():
        detected = family.detect(configs)
        if detected is not None:
            return detected
    raise NbkitError(
        f"{configs.index.get('_class_name', 'this pipeline')} is not a model family nbkit knows",
        path=configs.folder,
        fix=f"use a model of one of: {', '.join(family.title for family in FAMILIES.values())}",
    )


def family_of_pipeline(pipeline: object) -> Family | None:
    """The family of a loaded diffusers pipeline (each family asked, most specific first), or None.

    Args:
        pipeline: a diffusers pipeline (text-to-image, or one made from it with `from_pipe`).
    """
    for family in most_specific_first():
        if family.owns_pipeline(pipeline):
            return family
    return None


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "DetectedFamily",
    "Family",
    "FolderConfigs",
    "detect_family_from_config",
    "family_of_pipeline",
    "get_family",
    "most_specific_first",
    "read_folder_configs",
    "register_family",
]
