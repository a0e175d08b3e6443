"""What generation does differently for FLUX.1: telling the family, sizes, dtype, call arguments, memory.

`nbkit.generation.generate` runs SD and FLUX.1 pipelines through one loop; the web UI's service loads and places
them. Both ask this module the FLUX.1 questions: is this family (or pipeline) a flow-matching one, what
must image sides be multiples of, which dtype the weights load in (FLUX.1's activations overflow
float16, so bfloat16 on a GPU), which guidance and T5 arguments a FluxPipeline call takes, and how the
model fits the GPU (`nbkit.models.memory.plan_memory`: bf16 on the GPU, or model CPU offload, with
8- or 4-bit weights where the GPU is small).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from nbkit.generation.samplers import FLOW_FAMILIES

if TYPE_CHECKING:
    from nbkit.generation.generate import GenerationSettings

SIZE_MULTIPLE = 8  # the VAE's downsampling factor
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance default (diffusers' and Forge's)
# How many T5 tokens FLUX.1 reads: what BFL's reference code uses for each model.
FLUX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}


def is_flow_family(family: str | None) -> bool:
    """True for the flow-matching transformer families (FLUX.1)."""
    return family in FLOW_FAMILIES


def pipeline_family(pipeline: Any) -> str | None:
    """`flux` for a FLUX.1 pipeline (it has a `transformer`, not a `unet`), else None (an SD family)."""
    if getattr(pipeline, "transformer", None) is not None and type(pipeline).__name__.startswith("Flux"):
        return "flux"
    return None


def size_multiple(family: str | None) -> int:
    """What image sides must be multiples of: the registry's step for FLUX.1 (16), else 8 (A1111's)."""
    if is_flow_family(family):
        from nbkit.families import FAMILIES

        return FAMILIES[family].resolution_step
    return SIZE_MULTIPLE


def generation_dtype(family: str | None, device: Any) -> Any:
    """The weights' dtype for generating on `device`: bfloat16 for FLUX.1 on a GPU (its activations
    overflow float16), float16 for the SD families on a GPU, float32 on the CPU.

    Args:
        family: the model's family (None: an SD one).
        device: a torch device or its name.
    """
    import torch

    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if is_flow_family(family) else torch.float16


def accepts(pipeline: Any, name: str) -> bool:
    """Whether `pipeline(...)` takes the keyword `name`."""
    parameters = inspect.signature(pipeline.__call__).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def flux_sequence_length(pipeline: Any) -> int:
    """How many T5 tokens a FLUX.1 pipeline reads: 512 for dev, 256 for schnell (no guidance embedding),
    never more than its T5 tokenizer holds."""
    from nbkit.families.flux1 import is_flux_schnell

    schnell = is_flux_schnell(dict(pipeline.transformer.config))
    length = FLUX_SEQUENCE_LENGTH["schnell" if schnell else "dev"]
    tokenizer = getattr(pipeline, "tokenizer_2", None)
    limit = getattr(tokenizer, "model_max_length", None)
    return min(length, limit) if isinstance(limit, int) and limit > 0 else length


def flux_call_arguments(pipeline: Any, settings: GenerationSettings) -> tuple[dict[str, Any], float | None]:
    """A FLUX.1 call's guidance and T5 arguments, and the distilled guidance the infotext names.

    True CFG (`true_cfg_scale`) is in the arguments only when it runs: a CFG scale above 1 and a
    negative prompt (it runs the transformer twice per step; diffusers does it only with a negative).

    Args:
        pipeline: a FluxPipeline (or one made from it with `from_pipe`).
        settings: the request.

    Returns:
        The keyword arguments, and the distilled guidance (None for schnell, which has no guidance
        embedding and ignores it).
    """
    from nbkit.families.flux1 import is_flux_schnell

    kwargs: dict[str, Any] = {"max_sequence_length": flux_sequence_length(pipeline)}
    distilled = None
    if not is_flux_schnell(dict(pipeline.transformer.config)):
        distilled = FLUX_GUIDANCE if settings.distilled_guidance is None else settings.distilled_guidance
        kwargs["guidance_scale"] = distilled
    cfg = settings.guidance_scale
    if (
        cfg is not None
        and cfg > 1
        and any(settings.negative_prompts())
        and accepts(pipeline, "true_cfg_scale")
    ):
        kwargs["true_cfg_scale"] = cfg
    return kwargs, distilled


def plan_generation_memory(family: str | None, device: Any) -> Any:
    """Check up front that a FLUX.1 model fits the GPU `device` (`nbkit.models.memory.plan_memory`).

    Args:
        family: the model's family.
        device: where it will run.

    Returns:
        The `MemoryOption` to run it with, or None (an SD family, or the CPU).

    Raises:
        NbkitError: a GPU without bf16 (a T4) or with too little memory, with the reason and the ways.
    """
    import torch

    if not is_flow_family(family) or torch.device(device).type != "cuda":
        return None
    from nbkit.models import memory

    return memory.plan_memory(family, "generate", memory.device_facts())


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
