"""8-bit and 4-bit weights for FLUX.1, through bitsandbytes or torchao when installed.

FLUX.1's transformer (12B parameters) and its T5-XXL text encoder are what fills a GPU; quantizing
their linear weights is how FLUX.1 runs on a 16-24 GB card (`nbkit.models.memory` picks when). Both
libraries plug into diffusers' and transformers' `from_pretrained` through a `quantization_config`:

- bitsandbytes (CUDA only; diffusers' quantizer refuses without a GPU): 8-bit (LLM.int8) or 4-bit NF4
  with bf16 compute and double quantization, the QLoRA recipe of diffusers' Flux examples;
- torchao: int8 weight-only (`Int8WeightOnlyConfig`), on CUDA and the CPU. torchao's int4 needs extra
  kernels (`mslk`/fbgemm) that a plain install lacks, so 4-bit is bitsandbytes' alone here.

bitsandbytes is preferred where it runs (its 4-bit is the one diffusers' examples train on).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Literal

from nbkit.errors import NbkitError

Quantization = Literal["8bit", "4bit"]
QUANTIZATIONS: tuple[str, ...] = ("8bit", "4bit")
# The bit widths each backend does here, in order of preference.
BACKEND_BITS: dict[str, tuple[str, ...]] = {"bitsandbytes": ("8bit", "4bit"), "torchao": ("8bit",)}
# FLUX.1's big components: the transformer (diffusers) and the T5 encoder (transformers).
QUANTIZED_COMPONENTS: tuple[str, ...] = ("transformer", "text_encoder_2")
_TRANSFORMERS_COMPONENTS = ("text_encoder", "text_encoder_2")


def backends_for(quantization: str) -> tuple[str, ...]:
    """The backends that can do `quantization` (`8bit`: bitsandbytes, torchao; `4bit`: bitsandbytes)."""
    _check_quantization(quantization)
    return tuple(name for name, bits in BACKEND_BITS.items() if quantization in bits)


def available_backends(
    *, find_spec: Callable[[str], object] = importlib.util.find_spec, cuda: bool | None = None
) -> tuple[str, ...]:
    """The quantization backends usable in this process, preferred first.

    Args:
        find_spec: how a library is looked up (tests fake it).
        cuda: whether a CUDA GPU is there (default: asked of torch); bitsandbytes needs one.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return tuple(
        name for name in BACKEND_BITS if find_spec(name) is not None and (name != "bitsandbytes" or cuda)
    )


def choose_backend(
    quantization: str, *, backends: Sequence[str] | None = None, quantizer: str | None = None
) -> str:
    """The backend that loads `quantization` weights here, or an `NbkitError` saying what to install.

    Args:
        quantization: `8bit` or `4bit`.
        backends: the usable backends (default: `available_backends()`).
        quantizer: insist on one backend (`bitsandbytes` or `torchao`); None: the first that can.
    """
    able = backends_for(quantization)
    if quantizer is not None and quantizer not in BACKEND_BITS:
        raise ValueError(f"quantizer must be one of {', '.join(BACKEND_BITS)}, got {quantizer!r}")
    usable = tuple(available_backends() if backends is None else backends)
    wanted = (quantizer,) if quantizer is not None else able
    for name in wanted:
        if name in able and name in usable:
            return name
    if quantizer is not None and quantizer not in able:
        raise NbkitError(
            f"{quantizer} cannot load {quantization} weights here ({quantization} needs {' or '.join(able)})",
            fix=f"use quantizer {able[0]}, or no quantizer (nbkit picks one)",
        )
    names = " or ".join(wanted)
    have = ", ".join(usable) or "none"
    raise NbkitError(
        f"{quantization} weights need {names} with a CUDA GPU for bitsandbytes (usable here: {have})",
        fix="`pip install bitsandbytes` on a CUDA runtime and restart it"
        + (" (or `pip install torchao` for 8-bit)" if quantization == "8bit" else ""),
    )


def quantization_config(
    quantization: str,
    *,
    backends: Sequence[str] | None = None,
    quantizer: str | None = None,
    components: Sequence[str] = QUANTIZED_COMPONENTS,
) -> Any:
    """diffusers' `PipelineQuantizationConfig` that loads `components` with `quantization` weights.

    Args:
        quantization: `8bit` or `4bit`.
        backends: the usable backends (default: `available_backends()`).
        quantizer: insist on `bitsandbytes` or `torchao` (None: the first usable that can).
        components: the pipeline components to quantize (default: the transformer and T5).

    Raises:
        NbkitError: no usable backend does `quantization` (4-bit without bitsandbytes on CUDA).
    """
    from diffusers import PipelineQuantizationConfig

    backend = choose_backend(quantization, backends=backends, quantizer=quantizer)
    mapping = {name: component_config(name, quantization, backend) for name in components}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def component_config(component: str, quantization: str, backend: str) -> Any:
    """One component's quantization config: transformers' classes for the text encoders, diffusers'
    for the rest (their signatures differ, so `PipelineQuantizationConfig(quant_backend=...)` fails)."""
    _check_quantization(quantization)
    if component in _TRANSFORMERS_COMPONENTS:
        import transformers as library
    else:
        import diffusers as library
    if backend == "bitsandbytes":
        import torch

        if quantization == "8bit":
            return library.BitsAndBytesConfig(load_in_8bit=True)
        return library.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if backend == "torchao" and quantization == "8bit":
        from torchao.quantization import Int8WeightOnlyConfig

        return library.TorchAoConfig(Int8WeightOnlyConfig())
    raise ValueError(f"{backend} does not do {quantization} weights here")


def describe(quantization: str, backend: str) -> str:
    """A short human phrase for messages and notes (`8-bit weights (torchao int8 weight-only)`)."""
    what = {
        ("bitsandbytes", "8bit"): "bitsandbytes LLM.int8",
        ("bitsandbytes", "4bit"): "bitsandbytes NF4",
        ("torchao", "8bit"): "torchao int8 weight-only",
    }[backend, quantization]
    return f"{quantization[0]}-bit weights ({what})"


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


def describe_loaded(pipeline: Any) -> str | None:
    """Which of `pipeline`'s components hold quantized weights, and how (`transformer, text_encoder_2:
    8-bit weights (torchao int8 weight-only)`), or None when none does."""
    found: dict[str, list[str]] = {}
    for name, module in getattr(pipeline, "components", {}).items():
        quantizer = getattr(module, "hf_quantizer", None)
        if quantizer is None:
            continue
        config = quantizer.quantization_config
        method = str(getattr(config.quant_method, "value", config.quant_method))
        if method == "bitsandbytes":
            what = describe("4bit" if getattr(config, "load_in_4bit", False) else "8bit", "bitsandbytes")
        elif method == "torchao":
            kind = type(config.quant_type).__name__
            what = (
                describe("8bit", "torchao") if kind == "Int8WeightOnlyConfig" else f"torchao {kind} weights"
            )
        else:
            what = f"{method} weights"
        found.setdefault(what, []).append(name)
    return "; ".join(f"{', '.join(names)}: {what}" for what, names in found.items()) or None
