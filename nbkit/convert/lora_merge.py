"""A LoRA merged into a model's weights, for every LoRA file nbkit writes, in every family.

Two readers: diffusers' `load_lora_weights` + `fuse_lora` (its own format, and the kohya files of the
UNet families), and nbkit's own inverse of the original-layout file a transformer family's ComfyUI LoRA
is (`nbkit.convert.lora_layout`), which diffusers reads for some families at their real widths only.
Either way the merged model computes what the base model with the LoRA applied at `weight` computes,
without peft.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbkit.convert.lora_layout import is_original_lora, merge_original_lora
from nbkit.convert.safetensors_stream import read_header
from nbkit.errors import NbkitError
from nbkit.families import detect_family_from_config, get_family
from nbkit.fsio import read_json

# The down (A) matrix of each LoRA module, in the formats diffusers reads.
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", "_lora.down.weight")
ADAPTER = "nbkit-merged"


def _adapted_modules(pipeline: Any) -> int:
    """How many modules of the pipeline's components carry the LoRA adapter being merged."""
    import torch

    count = 0
    for value in vars(pipeline).values():
        if isinstance(value, torch.nn.Module):
            count += sum(
                1 for module in value.modules() if ADAPTER in (getattr(module, "lora_A", None) or {})
            )
    return count


def _load_pipeline(folder: Path, family: Any, denoiser_only: bool) -> Any:
    import diffusers

    index = read_json(folder / "model_index.json")
    pipeline_class = getattr(diffusers, index.get("_class_name", family.pipeline_class))
    skipped = {}
    if denoiser_only:  # a transformer file holds the denoiser alone: its text encoders and VAE stay on disk
        skipped = {
            name: None
            for name, value in index.items()
            if not name.startswith("_")
            and name not in (family.denoiser, "scheduler")
            and isinstance(value, list)
        }
    return pipeline_class.from_pretrained(folder, local_files_only=True, **skipped)


def merged_pipeline(
    base_folder: str | os.PathLike,
    lora_file: str | os.PathLike,
    *,
    weight: float = 1.0,
    denoiser_only: bool = False,
) -> Any:
    """The pipeline of `base_folder` with the LoRA in `lora_file` merged into its weights.

    Args:
        base_folder: the diffusers pipeline folder the LoRA was trained on.
        lora_file: the LoRA `.safetensors`: diffusers' format, the kohya file of a UNet family, or the
            original-layout (ComfyUI) file of a transformer family.
        weight: the LoRA's strength, as `<lora:name:weight>`.
        denoiser_only: load only the denoiser (and scheduler); the other components are None.

    Returns:
        The pipeline on the CPU, in the dtype the base folder stores, its LoRA fused and unloaded.

    Raises:
        NbkitError: for a missing file, or a LoRA neither reader can apply to this model.
    """
    from safetensors.torch import load_file

    folder, lora_path = Path(base_folder), Path(lora_file)
    if not lora_path.is_file():
        raise NbkitError("no such LoRA file", path=lora_path, fix="give the LoRA's .safetensors file")
    if not (folder / "model_index.json").is_file():
        raise NbkitError(
            "merging a LoRA needs the whole diffusers pipeline folder",
            path=folder,
            fix="give the pipeline folder (with model_index.json)",
        )
    family = get_family(detect_family_from_config(folder).family)
    read_header(lora_path)  # validates the file before safetensors maps it
    tensors = load_file(lora_path)
    pipeline = _load_pipeline(folder, family, denoiser_only)
    denoiser = getattr(pipeline, family.denoiser)
    config = {**dict(denoiser.config), "_class_name": type(denoiser).__name__}
    modules = family.transformer_layout(config)
    if modules is not None and is_original_lora(tensors, modules):
        # nbkit's own reader: diffusers' readers of these files assume the family's real widths.
        merge_original_lora(denoiser, tensors, modules, weight=weight, path=lora_path)
        return pipeline
    expected = sum(1 for key in tensors if key.endswith(_DOWN_SUFFIXES))
    del tensors
    try:
        pipeline.load_lora_weights(str(lora_path), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, AssertionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NbkitError(
            f"diffusers could not apply this LoRA to the model: {reason}",
            path=lora_path,
            fix=f"give a {family.title} LoRA trained on this base model (nbkit's diffusers-format file, "
            "pytorch_lora_weights.safetensors, or the A1111/ComfyUI file beside it)",
        ) from error
    applied = _adapted_modules(pipeline)
    if applied < expected:
        pipeline.unload_lora_weights()
        raise NbkitError(
            f"diffusers applied {applied} of the LoRA's {expected} modules to this {family.title} model",
            path=lora_path,
            fix=f"give a {family.title} LoRA trained on this base model",
        )
    components = [
        name
        for name in getattr(pipeline, "_lora_loadable_modules", [family.denoiser])
        if getattr(pipeline, name, None) is not None
    ]
    pipeline.fuse_lora(lora_scale=weight, components=components)
    pipeline.unload_lora_weights()
    return pipeline
