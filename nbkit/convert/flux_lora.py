"""A FLUX.1 LoRA in the kohya format ComfyUI and Forge load, made exactly from the diffusers-format one.

diffusers (and peft) put a LoRA on each of q, k and v; the BFL layout ComfyUI and Forge patch has one
fused `qkv` (and, in single blocks, one `linear1` for q, k, v and the MLP input). A LoRA on separate
modules is exactly a LoRA on the fused one: the downs stacked (rank n*r) and the ups block-diagonal,
so that `up @ down` is the stacked per-module products. kohya scales by `alpha / rank`, so the fused
module's alpha grows with its rank to keep the scale. A fused module the LoRA covers only in part
gets zero blocks for the rest: still exact. The modules come from `nbkit.convert.flux.flux_modules`,
the same table the transformer file is written from.

Keys: `lora_unet_<BFL module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
as kohya's sd-scripts write them and diffusers' `load_lora_weights` also reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.flux import FluxModule, flux_modelspec, flux_modules, merge_metadata
from nbkit.convert.hashes import with_modelspec_hash
from nbkit.convert.metadata import LORA_ARCHITECTURE_SUFFIX
from nbkit.convert.safetensors_stream import read_header
from nbkit.errors import NbkitError
from nbkit.families.flux1 import FAMILY as FLUX
from nbkit.families.flux1 import SCHNELL_ARCHITECTURE as FLUX_SCHNELL_ARCHITECTURE
from nbkit.fsio import atomic_write_bytes

LORA_PREFIX = "lora_unet_"
ARCHITECTURE = FLUX.modelspec_architecture + LORA_ARCHITECTURE_SUFFIX
DIFFUSERS_PREFIX = "transformer."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")


def _split_keys(diffusers_lora: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": down, "B": up}, from `transformer.<module>.lora_A.weight` (prefix optional)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in diffusers_lora.items():
        match = _LORA_KEY.match(key.removeprefix(DIFFUSERS_PREFIX))
        if match is None or key.startswith(("text_encoder", "unet.")):
            raise NbkitError(
                f"{key!r} is not a LoRA weight of the FLUX.1 transformer (lora_A/lora_B of a transformer module)",
                fix="convert a transformer-only diffusers LoRA (no text-encoder LoRA, DoRA or LoRA biases)",
            )
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise NbkitError(f"the LoRA of {module!r} has no lora_{'B' if 'A' in pair else 'A'} weight")
    return modules


def _block_counts(modules: Mapping[str, Any]) -> tuple[int, int]:
    counts = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for module in modules:
        match = _BLOCK.match(module)
        if match:
            counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)) + 1)
    return counts["transformer_blocks"], counts["single_transformer_blocks"]


def _fused(
    module: FluxModule, pairs: list[dict[str, torch.Tensor] | None], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the fused module: downs stacked, ups block-diagonal, zero blocks for missing parts."""
    present = [pair for pair in pairs if pair is not None]
    width = present[0]["A"].shape[1]  # every fused part reads the same input
    like = present[0]["A"]
    # A missing part's output size: q, k, v are as wide as the input; FLUX.1's MLP is 4x (fixed in diffusers).
    sizes = [
        pair["B"].shape[0] if pair is not None else (4 * width if name.endswith("proj_mlp") else width)
        for name, pair in zip(module.parts, pairs, strict=True)
    ]
    downs, up = [], like.new_zeros(sum(sizes), rank * len(pairs))
    row = 0
    for index, (pair, size) in enumerate(zip(pairs, sizes, strict=True)):
        downs.append(pair["A"] if pair is not None else like.new_zeros(rank, width))
        if pair is not None:
            up[row : row + size, index * rank : (index + 1) * rank] = pair["B"]
        row += size
    return torch.cat(downs, dim=0), up


def comfy_lora_state_dict(
    diffusers_lora: dict[str, torch.Tensor], *, rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """A diffusers-format FLUX.1 LoRA as the kohya-format state dict ComfyUI and Forge load (exact).

    Args:
        diffusers_lora: `transformer.<module>.lora_A.weight` / `.lora_B.weight` tensors, as
            `FluxPipeline.save_lora_weights` writes them (the `transformer.` prefix may be left out).
        rank: the LoRA's rank r (every module's `lora_A` has r rows).
        alpha: its `lora_alpha`; the LoRA's scale is `alpha / rank`.

    Returns:
        `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` for every BFL module the
        LoRA touches; modules it did not target get no entry.

    Raises:
        NbkitError: for keys that are not a transformer LoRA, or modules of another rank.
        ValueError: for a rank or alpha that is not positive.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    modules = _split_keys(diffusers_lora)
    other = sorted(name for name, pair in modules.items() if pair["A"].shape[0] != rank)
    if other:
        raise NbkitError(
            f"the LoRA of {other[0]!r} has rank {modules[other[0]]['A'].shape[0]}, not {rank}",
            fix="give the rank the LoRA was trained with (one rank for every module)",
        )
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for module in flux_modules(*_block_counts(modules), guidance=True):
        if not module.is_linear:
            continue
        pairs = [modules.get(part) for part in module.parts]
        if all(pair is None for pair in pairs):
            continue
        used.update(part for part in module.parts if part in modules)
        down, up = _fused(module, pairs, rank)
        if module.swap_halves:  # BFL's (shift, scale) against diffusers' (scale, shift)
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        name = LORA_PREFIX + module.bfl.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        # kohya scales by alpha / (rows of lora_down): keep alpha / rank for the fused rank.
        out[f"{name}.alpha"] = torch.tensor(alpha * len(module.parts), dtype=torch.float32)
    unused = sorted(set(modules) - used)
    if unused:
        raise NbkitError(
            f"the LoRA targets {unused[0]!r}, which the FLUX.1 BFL layout has no module for",
            fix="convert a LoRA of a standard FluxTransformer2DModel",
        )
    return out


def _rank_and_alpha(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path
) -> tuple[int, float]:
    """The LoRA's rank (from its tensors) and alpha (from diffusers' adapter metadata, else = rank)."""
    ranks = {tensor.shape[0] for key, tensor in tensors.items() if key.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise NbkitError(
            f"the LoRA has {'no lora_A weights' if not ranks else f'several ranks {sorted(ranks)}'}",
            path=path,
            fix="give a diffusers-format FLUX.1 LoRA of one rank (FluxPipeline.save_lora_weights)",
        )
    rank = ranks.pop()
    text = metadata.get(ADAPTER_METADATA_KEY)
    if not text:
        return rank, float(rank)  # what diffusers' load_lora_weights assumes without metadata
    try:
        adapter = json.loads(text)
    except json.JSONDecodeError as error:
        raise NbkitError(f"its {ADAPTER_METADATA_KEY} metadata is not JSON", path=path) from error
    config = {
        key.removeprefix(DIFFUSERS_PREFIX): value
        for key, value in adapter.items()
        if key.startswith(DIFFUSERS_PREFIX)
    }
    if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora"):
        raise NbkitError(
            "the LoRA's modules have their own alphas or ranks (alpha_pattern, rank_pattern or rsLoRA)",
            path=path,
            fix="train with one rank and lora_alpha for every module",
        )
    return rank, float(config.get("lora_alpha", rank))


def save_comfy_lora(
    diffusers_lora_file: Path,
    out_file: Path,
    *,
    metadata: dict[str, str] | None = None,
    schnell: bool = False,
) -> Path:
    """Write the ComfyUI/Forge (kohya-format) file of a diffusers-format FLUX.1 LoRA file.

    Args:
        diffusers_lora_file: the `.safetensors` `FluxPipeline.save_lora_weights` wrote (its
            `lora_adapter_metadata`, when present, gives lora_alpha; without it alpha = rank, as
            diffusers assumes).
        out_file: the `.safetensors` file to write (atomically).
        metadata: extra header metadata (title, resolution `"512x512"`, training settings...); the
            architecture is derived, not taken from it.
        schnell: the LoRA was trained on FLUX.1-schnell (`flux-1-schnell/lora`; else `flux-1-dev/lora`).

    Returns:
        The path written.

    Raises:
        NbkitError: for a file that is not a transformer LoRA, or per-module alphas or ranks.
    """
    from safetensors.torch import load_file, save

    source, out = Path(diffusers_lora_file), Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise NbkitError("a LoRA is written as .safetensors", path=out, fix="name the output .safetensors")
    if not source.is_file():
        raise NbkitError("no such LoRA file", path=source, fix="check the path")
    header_metadata = read_header(source).metadata  # validates the file before safetensors maps it
    tensors = load_file(source)
    rank, alpha = _rank_and_alpha(tensors, header_metadata, source)
    try:
        state = comfy_lora_state_dict(tensors, rank=rank, alpha=alpha)
    except NbkitError as error:
        raise NbkitError(error.message, path=source, fix=error.fix) from error
    header = {
        "format": "pt",
        **flux_modelspec(
            architecture=(FLUX_SCHNELL_ARCHITECTURE + LORA_ARCHITECTURE_SUFFIX) if schnell else ARCHITECTURE,
            title=out.stem,
            description=f"FLUX.1 LoRA (rank {rank}, alpha {alpha:g}) for ComfyUI and Forge, converted by nbkit",
        ),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
    }
    header = merge_metadata(header, metadata)
    # In memory: LoRA files are small, and the modelspec hash goes into the header before the data.
    atomic_write_bytes(out, with_modelspec_hash(save(state, metadata=header)))
    return out


def merge_flux_lora(base_folder: str | os.PathLike, lora_file: str | os.PathLike, *, weight: float = 1.0):
    """The FLUX.1 transformer of `base_folder` with the LoRA in `lora_file` merged into its weights.

    diffusers reads the LoRA (its own format or the kohya/ComfyUI one) and fuses it, so the merged
    transformer computes what the base model with the LoRA applied at `weight` computes, without peft.

    Args:
        base_folder: the FLUX.1 diffusers pipeline folder the LoRA was trained on.
        lora_file: the LoRA `.safetensors`.
        weight: the LoRA's strength, as `<lora:name:weight>`.

    Returns:
        A `FluxTransformer2DModel` on the CPU, in the dtype the base folder stores.
    """
    from diffusers import FluxPipeline

    lora_file = Path(lora_file)
    if not lora_file.is_file():
        raise NbkitError("no such LoRA file", path=lora_file, fix="give the LoRA's .safetensors file")
    # Only the transformer is needed: the text encoders and the VAE are not loaded.
    pipeline = FluxPipeline.from_pretrained(
        base_folder,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        vae=None,
        local_files_only=True,
    )
    try:
        pipeline.load_lora_weights(str(lora_file), adapter_name="merged")
    except (ValueError, KeyError, RuntimeError, AssertionError) as error:
        # diffusers' kohya/ComfyUI reader assumes FLUX.1's real widths (it asserts on others).
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NbkitError(
            f"diffusers could not apply this LoRA to the model: {reason}",
            path=lora_file,
            fix="give a FLUX.1 LoRA trained on this base model; for nbkit's own LoRAs use the diffusers-format "
            "file beside it (pytorch_lora_weights.safetensors)",
        ) from error
    pipeline.fuse_lora(lora_scale=weight, components=["transformer"])
    pipeline.unload_lora_weights()
    return pipeline.transformer
