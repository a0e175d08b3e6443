"""A transformer LoRA in the original layout ComfyUI and Forge patch, made exactly from the diffusers one,
and merged back exactly.

diffusers (and peft) put a LoRA on each of q, k and v; the original layout (a family's
`transformer_layout`) has one fused `qkv` (FLUX's single blocks one `linear1` for q, k, v and the MLP
input). A LoRA on separate modules is exactly a LoRA on the fused one: the downs stacked (rank n*r) and
the ups block-diagonal, so that `up @ down` is the stacked per-module products. kohya scales by
`alpha / rank`, so the fused module's alpha grows with its rank to keep the scale. A fused module the
LoRA covers only in part gets zero blocks for the rest: still exact.

Keys: `lora_unet_<original module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
as kohya's sd-scripts write them. ComfyUI maps `lora_unet_` plus every weight of the loaded model's own
(original) state dict, dots as underscores, for every model it loads (comfy/lora.py,
`model_lora_keys_unet`), so the file needs no model-specific support there.

Reading one back (`original_lora_deltas`) needs no guess at the model's sizes: each fused module's
`up @ down` is cut into its diffusers parts by the parts' own output sizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.hashes import with_modelspec_hash
from nbkit.convert.metadata import LORA_ARCHITECTURE_SUFFIX
from nbkit.convert.safetensors_stream import read_header
from nbkit.convert.transformer_file import merge_metadata, transformer_modelspec
from nbkit.errors import NbkitError
from nbkit.families import Family
from nbkit.families.facts import FusedModule
from nbkit.fsio import atomic_write_bytes

LORA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def lora_module_name(module: FusedModule) -> str:
    """The kohya name of an original module: `lora_unet_double_blocks_0_img_attn_qkv`."""
    return LORA_PREFIX + module.original.replace(".", "_")


def split_diffusers_lora(
    diffusers_lora: Mapping[str, torch.Tensor], title: str
) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": down, "B": up}, from `transformer.<module>.lora_A.weight` (prefix optional).

    Args:
        diffusers_lora: the diffusers-format LoRA tensors.
        title: the family's title, for messages.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in diffusers_lora.items():
        match = _LORA_KEY.match(key.removeprefix(DIFFUSERS_PREFIX))
        if match is None or key.startswith(("text_encoder", "unet.")):
            raise NbkitError(
                f"{key!r} is not a LoRA weight of the {title} transformer (lora_A/lora_B of a transformer module)",
                fix="convert a transformer-only diffusers LoRA (no text-encoder LoRA, DoRA or LoRA biases)",
            )
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise NbkitError(f"the LoRA of {module!r} has no lora_{'B' if 'A' in pair else 'A'} weight")
    return modules


def diffusers_weight_rows(config: Mapping[str, Any]) -> dict[str, int]:
    """Each diffusers module's output size (weight rows), from the transformer built on the meta device."""
    import diffusers

    model_class = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = model_class.from_config(dict(config))
    return {
        name.removesuffix(".weight"): tensor.shape[0]
        for name, tensor in model.state_dict().items()
        if name.endswith(".weight") and tensor.ndim >= 1
    }


def _fused(
    module: FusedModule, pairs: list[dict[str, torch.Tensor] | None], rank: int, rows: Callable[[str], int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the fused module: downs stacked, ups block-diagonal, zero blocks for missing parts."""
    present = [pair for pair in pairs if pair is not None]
    width = present[0]["A"].shape[1]  # every fused part reads the same input
    like = present[0]["A"]
    sizes = [
        pair["B"].shape[0] if pair is not None else rows(name)
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


def original_lora_state_dict(
    diffusers_lora: Mapping[str, torch.Tensor],
    modules: list[FusedModule],
    *,
    rank: int,
    alpha: float,
    rows: Callable[[str], int],
    title: str = "the",
) -> dict[str, torch.Tensor]:
    """A diffusers-format transformer LoRA as the original-layout kohya state dict ComfyUI loads (exact).

    Args:
        diffusers_lora: `transformer.<module>.lora_A.weight` / `.lora_B.weight` tensors (the prefix may
            be left out).
        modules: the family's `transformer_layout`.
        rank: the LoRA's rank r (every module's `lora_A` has r rows).
        alpha: its `lora_alpha`; the LoRA's scale is `alpha / rank`.
        rows: a diffusers module's output size, for the zero blocks of parts the LoRA does not cover.
        title: the family's title, for messages.

    Returns:
        `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` for every original module
        the LoRA touches; modules it did not target get no entry.

    Raises:
        NbkitError: for keys that are not a transformer LoRA, or modules of another rank.
        ValueError: for a rank or alpha that is not positive.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    pairs_by_module = split_diffusers_lora(diffusers_lora, title)
    other = sorted(name for name, pair in pairs_by_module.items() if pair["A"].shape[0] != rank)
    if other:
        raise NbkitError(
            f"the LoRA of {other[0]!r} has rank {pairs_by_module[other[0]]['A'].shape[0]}, not {rank}",
            fix="give the rank the LoRA was trained with (one rank for every module)",
        )
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        if not module.is_linear:
            continue
        pairs = [pairs_by_module.get(part) for part in module.parts]
        if all(pair is None for pair in pairs):
            continue
        used.update(part for part in module.parts if part in pairs_by_module)
        down, up = _fused(module, pairs, rank, rows)
        if module.swap_halves:  # the original's (shift, scale) against diffusers' (scale, shift)
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        name = lora_module_name(module)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        # kohya scales by alpha / (rows of lora_down): keep alpha / rank for the fused rank.
        out[f"{name}.alpha"] = torch.tensor(alpha * len(module.parts), dtype=torch.float32)
    unused = sorted(set(pairs_by_module) - used)
    if unused:
        raise NbkitError(
            f"the LoRA targets {unused[0]!r}, which the {title} original layout has no module for",
            fix="convert a LoRA of the family's standard transformer",
        )
    return out


def rank_and_alpha(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path
) -> tuple[int, float]:
    """The LoRA's rank (from its tensors) and alpha (from diffusers' adapter metadata, else = rank)."""
    ranks = {tensor.shape[0] for key, tensor in tensors.items() if key.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise NbkitError(
            f"the LoRA has {'no lora_A weights' if not ranks else f'several ranks {sorted(ranks)}'}",
            path=path,
            fix="give a diffusers-format transformer LoRA of one rank (<Pipeline>.save_lora_weights)",
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


def save_original_lora(
    diffusers_lora_file: str | Path,
    out_file: str | Path,
    *,
    family: Family,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    rows: Callable[[str], int] | None = None,
) -> Path:
    """Write the ComfyUI/Forge (original-layout kohya) file of a diffusers-format transformer LoRA file.

    Args:
        diffusers_lora_file: the `.safetensors` `<Pipeline>.save_lora_weights` wrote (its
            `lora_adapter_metadata`, when present, gives lora_alpha; without it alpha = rank, as
            diffusers assumes).
        out_file: the `.safetensors` file to write (atomically).
        family: the transformer's family (its `transformer_layout`).
        config: the transformer's config (`_class_name` and sizes).
        metadata: extra header metadata (title, resolution `"512x512"`, training settings...); the
            architecture is derived, not taken from it.
        rows: a diffusers module's output size (default: from the transformer `config` describes).

    Returns:
        The path written.

    Raises:
        NbkitError: for a file that is not a LoRA of the family's transformer, or per-module alphas or ranks.
    """
    from safetensors.torch import load_file, save

    source, out = Path(diffusers_lora_file), Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise NbkitError("a LoRA is written as .safetensors", path=out, fix="name the output .safetensors")
    if not source.is_file():
        raise NbkitError("no such LoRA file", path=source, fix="check the path")
    modules = family.transformer_layout(config)
    if modules is None:
        raise NbkitError(f"{family.title} has no original transformer layout for {config.get('_class_name')}")
    header_metadata = read_header(source).metadata  # validates the file before safetensors maps it
    tensors = load_file(source)
    rank, alpha = rank_and_alpha(tensors, header_metadata, source)
    if rows is None:
        sizes = diffusers_weight_rows(config)
        rows = sizes.__getitem__
    try:
        state = original_lora_state_dict(
            tensors, modules, rank=rank, alpha=alpha, rows=rows, title=family.title
        )
    except NbkitError as error:
        raise NbkitError(error.message, path=source, fix=error.fix) from error
    header = {
        "format": "pt",
        **transformer_modelspec(
            family,
            architecture=family.transformer_architecture(config) + LORA_ARCHITECTURE_SUFFIX,
            title=out.stem,
            description=f"{family.title} LoRA (rank {rank}, alpha {alpha:g}) for ComfyUI and Forge, converted "
            "by nbkit",
        ),
        "ss_network_module": family.lora_network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
    }
    header = merge_metadata(header, metadata)
    # In memory: LoRA files are small, and the modelspec hash goes into the header before the data.
    atomic_write_bytes(out, with_modelspec_hash(save(state, metadata=header)))
    return out


def is_original_lora(tensors: Mapping[str, Any], modules: list[FusedModule]) -> bool:
    """Whether a LoRA's keys are kohya names of modules of this original layout (and only those)."""
    names = {lora_module_name(module) for module in modules}
    found = [_KOHYA_KEY.match(key) for key in tensors]
    return bool(found) and all(match is not None and match.group(1) in names for match in found)


def original_lora_deltas(
    tensors: Mapping[str, torch.Tensor], modules: list[FusedModule], rows: Callable[[str], int], path: Path
) -> dict[str, torch.Tensor]:
    """The weight change an original-layout kohya LoRA makes to each diffusers module, at strength 1 (fp32).

    Args:
        tensors: the LoRA file's tensors.
        modules: the family's `transformer_layout`.
        rows: a diffusers module's output size.
        path: the file, for messages.

    Returns:
        diffusers module -> `alpha / rank * up @ down` cut to that module's rows.
    """
    by_name = {lora_module_name(module): module for module in modules}
    deltas: dict[str, torch.Tensor] = {}
    names = {_KOHYA_KEY.match(key).group(1) for key in tensors if _KOHYA_KEY.match(key)}
    for name in sorted(names):
        module = by_name.get(name)
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        if module is None or down is None or up is None:
            raise NbkitError(
                f"the LoRA's {name!r} is not a complete LoRA of a module of this model",
                path=path,
                fix="give a LoRA of this model (nbkit writes lora_down, lora_up and alpha for each module)",
            )
        alpha = tensors.get(f"{name}.alpha")
        scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
        delta = scale * (up.float() @ down.float())
        if module.swap_halves:
            first, second = delta.chunk(2, dim=0)
            delta = torch.cat([second, first], dim=0)
        sizes = [rows(part) for part in module.parts]
        if sum(sizes) != delta.shape[0]:
            raise NbkitError(
                f"the LoRA's {name!r} changes {delta.shape[0]} outputs; the model's module has {sum(sizes)}",
                path=path,
                fix="give a LoRA trained on this model (same family and size)",
            )
        for part, piece in zip(module.parts, delta.split(sizes, dim=0), strict=True):
            deltas[part] = piece
    return deltas


def merge_original_lora(
    model: Any, tensors: Mapping[str, torch.Tensor], modules: list[FusedModule], *, weight: float, path: Path
) -> None:
    """Add an original-layout kohya LoRA, at strength `weight`, into a diffusers transformer's weights.

    Args:
        model: the diffusers transformer (changed in place).
        tensors: the LoRA file's tensors.
        modules: the family's `transformer_layout` for the model's config.
        weight: the LoRA's strength, as `<lora:name:weight>`.
        path: the file, for messages.
    """
    parameters = dict(model.named_parameters())
    deltas = original_lora_deltas(tensors, modules, lambda part: parameters[f"{part}.weight"].shape[0], path)
    with torch.no_grad():
        for part, delta in deltas.items():
            target = parameters[f"{part}.weight"]
            if target.shape != delta.shape:
                raise NbkitError(
                    f"the LoRA's change to {part!r} is {tuple(delta.shape)}, its weight {tuple(target.shape)}",
                    path=path,
                    fix="give a LoRA trained on this model (same family and size)",
                )
            target.copy_((target.float() + weight * delta).to(target.dtype))
