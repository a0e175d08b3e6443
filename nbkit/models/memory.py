"""Will a model fit this GPU? Checked up front, so a run is refused with the options, not an OOM an hour in.

FLUX.1 is the family where this matters: a 12-billion-parameter transformer (23.8 GB in bf16) and a
T5-XXL text encoder (9.5 GB) do not fit a Colab T4 (15 GB, and no bf16, which FLUX.1 needs: its
activations overflow float16). Each way of running a family's models has a rough peak of GPU memory
(`Family.memory_options`); `plan_memory` picks the first way that fits the GPU with the libraries
installed, or raises `NbkitError` listing the ways and what each needs.

Families without memory figures (the SD families fit every GPU Colab offers) are not checked here
(`nbkit.train.oom` advises them after the fact).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.families.facts import MemoryOption, Task
from nbkit.models.quantization import BACKEND_BITS
from nbkit.models.registry import ModelSpec


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the GPU offers (`device_facts()` reads them; tests fake them).

    Args:
        name: the GPU's name (`Tesla T4`).
        total_gib: its memory in GiB.
        bf16: whether it computes in bfloat16 at full speed (compute capability 8.0 or later).
    """

    name: str
    total_gib: float
    bf16: bool


def quantizers_installed(find_spec: Callable[[str], object] = importlib.util.find_spec) -> tuple[str, ...]:
    """The weight-quantization libraries diffusers can use that are installed (`bitsandbytes`, `torchao`)."""
    return tuple(name for name in ("bitsandbytes", "torchao") if find_spec(name) is not None)


def device_facts(index: int = 0) -> DeviceFacts | None:
    """The facts of CUDA GPU `index`, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(index)
    return DeviceFacts(properties.name, properties.total_memory / 2**30, properties.major >= 8)


def plan_memory(
    spec: ModelSpec | str,
    task: Task,
    device: DeviceFacts | None,
    *,
    quantizers: Sequence[str] | None = None,
    headroom_gib: float = 1.0,
) -> MemoryOption | None:
    """Pick how to run `spec` for `task` on `device`, or refuse with the reason and the options.

    Args:
        spec: the model (a registry entry) or its family name.
        task: `generate` or `train`.
        device: the GPU (`device_facts()`), or None on a CPU, where nothing is checked.
        quantizers: the quantization libraries installed (default: looked up); a quantized way is
            picked only when one of them does its bit width (8-bit: bitsandbytes or torchao; 4-bit:
            bitsandbytes).
        headroom_gib: memory kept free for the CUDA context and fragmentation.

    Returns:
        The first option (largest, fastest) that fits, or None when the family is not checked or there
        is no GPU.

    Raises:
        NbkitError: when the GPU lacks bf16 for a family that needs it, or no option fits.
    """
    family = FAMILIES[spec if isinstance(spec, str) else spec.family]
    if task not in ("generate", "train"):
        raise ValueError(f"task must be 'generate' or 'train', got {task!r}")
    options = family.memory_options(task)
    if not options or device is None:
        return None
    listing = "; ".join(
        f"{option.name}: {option.description}, about {option.peak_gib:.0f} GiB" for option in options
    )
    what = "train a LoRA of" if task == "train" else "run"
    if family.needs_bf16 and not device.bf16:
        raise NbkitError(
            f"{device.name} cannot {what} {family.title}: it has no bfloat16, and {family.title} overflows "
            f"in float16 (its ways of running: {listing})",
            fix="switch the runtime to a GPU with bf16 (Colab: L4 or A100; Kaggle: none, its T4 and P100 "
            "lack it), or use an SD family model on this GPU",
        )
    installed = tuple(quantizers_installed() if quantizers is None else quantizers)
    usable = device.total_gib - headroom_gib
    lacking: list[MemoryOption] = []  # ways that would fit, but no installed library does their bits
    for option in options:
        if option.peak_gib > usable:
            continue
        if option.quantization is None or _can_do(option.quantization, installed):
            return option
        lacking.append(option)
    if lacking:
        option = lacking[0]
        able = " or ".join(name for name, bits in BACKEND_BITS.items() if option.quantization in bits)
        raise NbkitError(
            f"{device.name} has {device.total_gib:.0f} GiB: to {what} {family.title} there it needs the "
            f"{option.name} way ({option.description}, about {option.peak_gib:.0f} GiB), and {option.quantization} "
            f"weights need {able} (installed: {', '.join(installed) or 'none'}); ways: {listing}",
            fix="`pip install bitsandbytes` and restart the runtime, or use a GPU with more memory "
            "(Colab: L4 24 GB or A100 40 GB)",
        )
    smallest = options[-1]
    missing = (
        "" if installed else " (8-bit and 4-bit need `pip install bitsandbytes` or torchao, not installed)"
    )
    raise NbkitError(
        f"{device.name} has {device.total_gib:.0f} GiB, too little to {what} {family.title}: the smallest way "
        f"({smallest.name}) needs about {smallest.peak_gib:.0f} GiB{missing}; ways: {listing}",
        fix="use a GPU with more memory (Colab: L4 24 GB or A100 40 GB)"
        + ("" if installed else ", or install bitsandbytes and restart the runtime"),
    )


def _can_do(quantization: str, installed: Sequence[str]) -> bool:
    return any(quantization in BACKEND_BITS.get(name, ()) for name in installed)
