"""FLUX.1's original transformer layout (Black Forest Labs' code, that of `flux1-dev.safetensors`).

Each double block's image and text q, k, v are one `qkv` each, and each single block's q, k, v and MLP
input are one `linear1`. The final adaLN stores (shift, scale) where diffusers' `norm_out` has
(scale, shift). Everything else is a rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families.facts import FusedModule

TRANSFORMER_CLASS = "FluxTransformer2DModel"
NORM_PARAMS = (("scale", "weight"),)
# diffusers' single-file converter cuts `single_blocks.N.linear1` at FLUX.1's sizes (3072 wide, MLP
# 4x), whatever the config says; see `diffusers_checkpoint`.
DIFFUSERS_SPLIT_WIDTH = 3072
DIFFUSERS_SPLIT_MLP = 4 * DIFFUSERS_SPLIT_WIDTH


def _norm(original: str, part: str) -> FusedModule:
    return FusedModule(original, (part,), NORM_PARAMS)


def flux_modules(num_layers: int, num_single_layers: int, guidance: bool) -> list[FusedModule]:
    """The original modules of a FLUX.1 transformer, in BFL's order, with their diffusers parts.

    Args:
        num_layers: double-stream blocks (19 in FLUX.1).
        num_single_layers: single-stream blocks (38 in FLUX.1).
        guidance: the model embeds the guidance scale (dev; schnell does not).
    """
    embedder = "time_text_embed."
    modules = [
        FusedModule("img_in", ("x_embedder",)),
        FusedModule("time_in.in_layer", (embedder + "timestep_embedder.linear_1",)),
        FusedModule("time_in.out_layer", (embedder + "timestep_embedder.linear_2",)),
        FusedModule("vector_in.in_layer", (embedder + "text_embedder.linear_1",)),
        FusedModule("vector_in.out_layer", (embedder + "text_embedder.linear_2",)),
    ]
    if guidance:
        modules.append(FusedModule("guidance_in.in_layer", (embedder + "guidance_embedder.linear_1",)))
        modules.append(FusedModule("guidance_in.out_layer", (embedder + "guidance_embedder.linear_2",)))
    modules.append(FusedModule("txt_in", ("context_embedder",)))
    for i in range(num_layers):
        bfl, ours = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        streams = (
            ("img", "norm1.linear", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"), "ff"),
            (
                "txt",
                "norm1_context.linear",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                "to_add_out",
                ("norm_added_q", "norm_added_k"),
                "ff_context",
            ),
        )
        for stream, modulation, qkv, proj, (norm_q, norm_k), mlp in streams:
            modules += [
                FusedModule(f"{bfl}{stream}_mod.lin", (ours + modulation,)),
                FusedModule(f"{bfl}{stream}_attn.qkv", tuple(f"{ours}attn.{name}" for name in qkv)),
                _norm(f"{bfl}{stream}_attn.norm.query_norm", f"{ours}attn.{norm_q}"),
                _norm(f"{bfl}{stream}_attn.norm.key_norm", f"{ours}attn.{norm_k}"),
                FusedModule(f"{bfl}{stream}_attn.proj", (f"{ours}attn.{proj}",)),
                FusedModule(f"{bfl}{stream}_mlp.0", (f"{ours}{mlp}.net.0.proj",)),
                FusedModule(f"{bfl}{stream}_mlp.2", (f"{ours}{mlp}.net.2",)),
            ]
    for i in range(num_single_layers):
        bfl, ours = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        modules += [
            FusedModule(
                bfl + "linear1",
                tuple(ours + name for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
            ),
            FusedModule(bfl + "linear2", (ours + "proj_out",)),
            _norm(bfl + "norm.query_norm", ours + "attn.norm_q"),
            _norm(bfl + "norm.key_norm", ours + "attn.norm_k"),
            FusedModule(bfl + "modulation.lin", (ours + "norm.linear",)),
        ]
    modules += [
        FusedModule("final_layer.linear", ("proj_out",)),
        FusedModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    return modules


def flux1_modules(config: Mapping[str, Any]) -> list[FusedModule] | None:
    """`flux_modules` for a `FluxTransformer2DModel` config; None for another transformer's."""
    if config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS:
        return None
    if "num_layers" not in config or "num_single_layers" not in config:
        return None
    return flux_modules(
        int(config["num_layers"]),
        int(config["num_single_layers"]),
        bool(config.get("guidance_embeds", False)),
    )


def diffusers_checkpoint(state_dict: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint to give diffusers' `FluxTransformer2DModel.from_single_file` for `state_dict`.

    At FLUX.1's own sizes, the original state dict itself. At another width (a tiny test model),
    diffusers' converter, which cuts each `linear1` at FLUX.1's sizes whatever the config says, is run
    on zero stand-ins of those sizes (expanded views: no memory), and the real q, k, v, MLP split of each
    `linear1` then replaces what it made of them; every other tensor is converted by diffusers.

    Args:
        state_dict: the original-layout tensors (no `model.diffusion_model.` prefix); consumed.
        config: the transformer config.
    """
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    linear1 = state_dict.get("single_blocks.0.linear1.weight")
    if width == DIFFUSERS_SPLIT_WIDTH and (
        linear1 is None or linear1.shape[0] == 3 * DIFFUSERS_SPLIT_WIDTH + DIFFUSERS_SPLIT_MLP
    ):
        return state_dict
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    real = {key: state_dict.pop(key) for key in list(state_dict) if ".linear1." in key}
    stand_in_rows = 3 * DIFFUSERS_SPLIT_WIDTH + DIFFUSERS_SPLIT_MLP
    for key, tensor in real.items():
        state_dict[key] = tensor.new_zeros(()).expand(stand_in_rows, *tensor.shape[1:])
    converted = convert_flux_transformer_checkpoint_to_diffusers(state_dict)
    for key, tensor in real.items():
        block, param = key.split(".")[1], key.rsplit(".", 1)[1]
        ours = f"single_transformer_blocks.{block}."
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        pieces = tensor.split((width, width, width, tensor.shape[0] - 3 * width), dim=0)
        for name, piece in zip(names, pieces, strict=True):
            converted[f"{ours}{name}.{param}"] = piece.contiguous()
    return converted
