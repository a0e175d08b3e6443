"""FLUX.2's original transformer layout (Black Forest Labs' `flux2` code, that of
`flux-2-klein-4b.safetensors`, which ComfyUI loads).

Each double block's image and text q, k, v are one `qkv` each; the single blocks' fused `linear1`
(q, k, v and MLP input) and `linear2` are single modules in diffusers too (`attn.to_qkv_mlp_proj`,
`attn.to_out`). The modulations are shared by all blocks of a kind. The final adaLN stores
(shift, scale) where diffusers' `norm_out` has (scale, shift). The correspondence is that of diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families.facts import FusedModule

TRANSFORMER_CLASS = "Flux2Transformer2DModel"
NORM_PARAMS = (("scale", "weight"),)


def flux2_modules(config: Mapping[str, Any]) -> list[FusedModule] | None:
    """The original modules of a `Flux2Transformer2DModel`, in BFL's order, with their diffusers parts;
    None for another transformer's config.

    Args:
        config: the transformer config (`num_layers`, `num_single_layers`, `guidance_embeds`).
    """
    if config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS:
        return None
    if "num_layers" not in config or "num_single_layers" not in config:
        return None
    embed = "time_guidance_embed."
    modules = [
        FusedModule("img_in", ("x_embedder",)),
        FusedModule("txt_in", ("context_embedder",)),
        FusedModule("time_in.in_layer", (embed + "timestep_embedder.linear_1",)),
        FusedModule("time_in.out_layer", (embed + "timestep_embedder.linear_2",)),
    ]
    if config.get("guidance_embeds", False):
        modules.append(FusedModule("guidance_in.in_layer", (embed + "guidance_embedder.linear_1",)))
        modules.append(FusedModule("guidance_in.out_layer", (embed + "guidance_embedder.linear_2",)))
    modules += [
        FusedModule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
        FusedModule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
        FusedModule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    ]
    for i in range(int(config["num_layers"])):
        bfl, ours = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        streams = (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"), "ff"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", ("norm_added_q", "norm_added_k"), "ff_context"),
        )  # fmt: skip
        for stream, qkv, proj, (norm_q, norm_k), mlp in streams:
            modules += [
                FusedModule(f"{bfl}{stream}_attn.qkv", tuple(f"{ours}attn.{name}" for name in qkv)),
                FusedModule(f"{bfl}{stream}_attn.norm.query_norm", (f"{ours}attn.{norm_q}",), NORM_PARAMS),
                FusedModule(f"{bfl}{stream}_attn.norm.key_norm", (f"{ours}attn.{norm_k}",), NORM_PARAMS),
                FusedModule(f"{bfl}{stream}_attn.proj", (f"{ours}attn.{proj}",)),
                FusedModule(f"{bfl}{stream}_mlp.0", (f"{ours}{mlp}.linear_in",)),
                FusedModule(f"{bfl}{stream}_mlp.2", (f"{ours}{mlp}.linear_out",)),
            ]
    for i in range(int(config["num_single_layers"])):
        bfl, ours = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        modules += [
            FusedModule(bfl + "linear1", (ours + "to_qkv_mlp_proj",)),
            FusedModule(bfl + "linear2", (ours + "to_out",)),
            FusedModule(bfl + "norm.query_norm", (ours + "norm_q",), NORM_PARAMS),
            FusedModule(bfl + "norm.key_norm", (ours + "norm_k",), NORM_PARAMS),
        ]
    modules += [
        FusedModule("final_layer.linear", ("proj_out",)),
        FusedModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    return modules
