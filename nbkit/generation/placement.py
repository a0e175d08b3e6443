"""Where and how a model runs for generation: its family, dtype, memory plan and placement.

`nbkit.generation.generate` and the web UI's service ask this module which family a name or a loaded
pipeline is (`as_family`, `pipeline_family`), which dtype the weights load in (the family's
`generation_dtype`: bfloat16 on a GPU for a family whose activations overflow float16), and how the
model fits the GPU (`nbkit.models.memory.plan_memory`: bf16 on the GPU, or model CPU offload, with 8-
or 4-bit weights where the GPU is small, for the families it plans).
"""

from __future__ import annotations

from typing import Any

from nbkit.families import DEFAULT_FAMILY, Family, family_of_pipeline, get_family
from nbkit.families._generation import accepts

__all__ = [
    "accepts",
    "apply_memory_option",
    "as_family",
    "generation_dtype",
    "pipeline_family",
    "plan_generation_memory",
]


def as_family(family: Family | str | None) -> Family:
    """The family object for a family or its registry name; None is the default family (SD 1.x).

    Args:
        family: a `Family`, a key of `nbkit.families.FAMILIES`, or None.
    """
    if isinstance(family, Family):
        return family
    return get_family(family or DEFAULT_FAMILY)


def pipeline_family(pipeline: Any) -> str | None:
    """The registry name of a loaded pipeline's family (`nbkit.families.family_of_pipeline`), or None."""
    family = family_of_pipeline(pipeline)
    return family.name if family is not None else None


def generation_dtype(family: Family | str | None, device: Any) -> Any:
    """The weights' dtype for generating with `family` on `device` (`Family.generation_dtype`).

    Args:
        family: the model's family (None: the default one).
        device: a torch device or its name.
    """
    return as_family(family).generation_dtype(device)


def plan_generation_memory(family: Family | str | None, device: Any) -> Any:
    """Check up front that a model fits the GPU `device` (`nbkit.models.memory.plan_memory`).

    Args:
        family: the model's family.
        device: where it will run.

    Returns:
        The `MemoryOption` to run it with, or None (a family that is not planned, or the CPU).

    Raises:
        NbkitError: a GPU without bf16 (a T4) or with too little memory, with the reason and the ways.
    """
    import torch

    if torch.device(device).type != "cuda":
        return None
    from nbkit.models import memory

    return memory.plan_memory(as_family(family).name, "generate", memory.device_facts())


def apply_memory_option(pipeline: Any, option: Any, device: Any, *, offload: bool = False) -> Any:
    """Place `pipeline` on `device` as `option` (from `plan_generation_memory`) says.

    Offload: diffusers' model CPU offload, each component moved to the GPU while it runs. It is used
    when the option offloads (every quantized option does) or when the caller asks for it (the web
    UI's low-VRAM mode), so the pipeline is never moved whole to the GPU while its owner treats it as
    offloaded. A quantized option's pipeline must have been loaded with its weights quantized
    (`load_pipeline(..., quantization=option.quantization)`).

    Args:
        pipeline: a diffusers pipeline, still on the CPU.
        option: a `MemoryOption`, or None (no plan: the whole pipeline on `device`, unless `offload`).
        device: where it runs.
        offload: model CPU offload even when the option does not ask for it.
    """
    planned = option is not None and (option.offload or option.quantization is not None)
    if offload or planned:
        pipeline.enable_model_cpu_offload(device=device)
        return pipeline
    return pipeline.to(device)
