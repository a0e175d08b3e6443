"""A FLUX.1 LoRA in the kohya format ComfyUI and Forge load, made exactly from the diffusers-format one.

FLUX.1's names for the family-agnostic `nbkit.convert.lora_layout`: keys
`lora_unet_<BFL module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, as kohya's
sd-scripts write them and diffusers' `load_lora_weights` also reads (at FLUX.1's real widths).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.lora_layout import original_lora_state_dict, save_original_lora, split_diffusers_lora
from nbkit.convert.metadata import LORA_ARCHITECTURE_SUFFIX
from nbkit.errors import NbkitError
from nbkit.families._layout_flux1 import TRANSFORMER_CLASS, flux_modules
from nbkit.families.flux1 import FAMILY as FLUX

LORA_PREFIX = "lora_unet_"
ARCHITECTURE = FLUX.modelspec_architecture + LORA_ARCHITECTURE_SUFFIX
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _block_counts(modules: Mapping[str, Any]) -> tuple[int, int]:
    counts = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for module in modules:
        match = _BLOCK.match(module)
        if match:
            counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)) + 1)
    return counts["transformer_blocks"], counts["single_transformer_blocks"]


def _config(diffusers_lora: Mapping[str, torch.Tensor], schnell: bool) -> dict[str, Any]:
    """A FLUX.1 transformer config with as many blocks as the LoRA reaches (its sizes are not known)."""
    layers, single = _block_counts(split_diffusers_lora(diffusers_lora, FLUX.title))
    return {
        "_class_name": TRANSFORMER_CLASS,
        "num_layers": layers,
        "num_single_layers": single,
        "guidance_embeds": not schnell,
    }


def _rows_of(diffusers_lora: Mapping[str, torch.Tensor]):
    """A missing part's output size, for a LoRA without its model: q, k, v are as wide as the input and
    FLUX.1's MLP is 4x (fixed in diffusers)."""
    width = next(tensor.shape[1] for key, tensor in diffusers_lora.items() if key.endswith("lora_A.weight"))
    return lambda part: 4 * width if part.endswith("proj_mlp") else width


def comfy_lora_state_dict(
    diffusers_lora: dict[str, torch.Tensor], *, rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """A diffusers-format FLUX.1 LoRA as the kohya-format state dict ComfyUI and Forge load (exact).

    Args:
        diffusers_lora: `transformer.<module>.lora_A.weight` / `.lora_B.weight` tensors, as
            `FluxPipeline.save_lora_weights` writes them (the `transformer.` prefix may be left out).
        rank: the LoRA's rank r (every module's `lora_A` has r rows).
        alpha: its `lora_alpha`; the LoRA's scale is `alpha / rank`.

    Raises:
        NbkitError: for keys that are not a transformer LoRA, or modules of another rank.
        ValueError: for a rank or alpha that is not positive.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    modules = flux_modules(*_block_counts(split_diffusers_lora(diffusers_lora, FLUX.title)), guidance=True)
    return original_lora_state_dict(
        diffusers_lora, modules, rank=rank, alpha=alpha, rows=_rows_of(diffusers_lora), title=FLUX.title
    )


def save_comfy_lora(
    diffusers_lora_file: Path,
    out_file: Path,
    *,
    metadata: dict[str, str] | None = None,
    schnell: bool = False,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the ComfyUI/Forge (kohya-format) file of a diffusers-format FLUX.1 LoRA file.

    Args:
        diffusers_lora_file: the `.safetensors` `FluxPipeline.save_lora_weights` wrote.
        out_file: the `.safetensors` file to write (atomically).
        metadata: extra header metadata; the architecture is derived, not taken from it.
        schnell: the LoRA was trained on FLUX.1-schnell (`flux-1-schnell/lora`; else `flux-1-dev/lora`);
            ignored when `config` is given.
        config: the transformer's config, when known (its sizes; else FLUX.1's proportions are assumed).
    """
    from safetensors.torch import load_file

    from nbkit.convert.safetensors_stream import read_header

    rows = None
    source = Path(diffusers_lora_file)
    if config is None and source.is_file():
        read_header(source)  # validates the file before safetensors maps it
        tensors = load_file(source)
        try:
            config, rows = _config(tensors, schnell), _rows_of(tensors)
        except NbkitError as error:
            raise NbkitError(error.message, path=source, fix=error.fix) from error
    return save_original_lora(
        diffusers_lora_file, out_file, family=FLUX, config=config, metadata=metadata, rows=rows
    )
