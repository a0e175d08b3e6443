"""Where models run: the default device, freeing its memory, and the attention kernel.

Training, generation, the web UI and the vision models all ask here, so "CUDA when there is one" and
"let go of the GPU's cached blocks" are written once. torch is imported when a function is called.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Any, Literal

Attention = Literal["sdpa", "xformers"]


def default_device(device: Any = None) -> Any:
    """`device` as a torch device, or the GPU when there is one and the CPU otherwise.

    Args:
        device: a torch device, its name (`cuda`, `cpu`, `cuda:1`), or None for the default.
    """
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    """Let go of unreferenced tensors and, on a GPU, of the allocator's cached blocks.

    Call it after dropping the last reference to a model: CUDA keeps freed blocks for reuse, so another
    process (or `nvidia-smi`) sees them as taken until they are released here.
    """
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def use_attention(model: Any, device: Any, wanted: Attention = "sdpa") -> tuple[Attention, str | None]:
    """Set the attention kernel of a diffusers model or pipeline running on `device`.

    PyTorch's scaled dot-product attention (SDPA) is diffusers' default and is kept unless xformers is
    asked for, the device is a GPU and xformers is installed and works there.

    Args:
        model: a diffusers model or pipeline (anything with `enable_xformers_memory_efficient_attention`).
        device: where it runs.
        wanted: `sdpa` or `xformers`.

    Returns:
        The kernel in use, and why the wanted one is not used (None when it is).
    """
    if wanted != "xformers":
        return "sdpa", None
    if default_device(device).type != "cuda":
        return "sdpa", "xformers runs on CUDA GPUs only; using PyTorch SDPA attention"
    if importlib.util.find_spec("xformers") is None:
        return "sdpa", "xformers is not installed; using PyTorch SDPA attention"
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as error:  # a wheel built for another torch or GPU fails only when called
        disable = getattr(model, "disable_xformers_memory_efficient_attention", None)
        if disable is not None:
            disable()
        return "sdpa", f"xformers is not usable here ({error}); using PyTorch SDPA attention"
    return "xformers", None
