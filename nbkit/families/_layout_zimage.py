"""Z-Image's original transformer layout (Tongyi-MAI's code, that of `z_image_turbo_bf16.safetensors`,
which ComfyUI loads as its Lumina 2 `NextDiT`).

Each block's q, k, v are one `attention.qkv`; the attention output is `attention.out` and the query and
key norms `q_norm`/`k_norm`; diffusers' `all_x_embedder.2-1` and `all_final_layer.2-1` (its per patch
size dictionaries) are plain `x_embedder` and `final_layer`. Everything else keeps its name. The
correspondence is that of diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` and ComfyUI's
`comfy.utils.z_image_to_diffusers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families.facts import FusedModule

TRANSFORMER_CLASS = "ZImageTransformer2DModel"
WEIGHT_ONLY = (("weight", "weight"),)  # RMSNorms: a weight, no bias
BARE = (("", ""),)  # a parameter of the model itself (the pad tokens)
# The only patch sizes the original layout (one x_embedder, one final_layer) has, as diffusers keys them.
PATCH_KEY = "2-1"


def _block(original: str, ours: str, *, modulated: bool) -> list[FusedModule]:
    attention = f"{ours}.attention."
    modules = [
        FusedModule(
            f"{original}.attention.qkv", tuple(attention + name for name in ("to_q", "to_k", "to_v"))
        ),
        FusedModule(f"{original}.attention.out", (attention + "to_out.0",)),
        FusedModule(f"{original}.attention.q_norm", (attention + "norm_q",), WEIGHT_ONLY),
        FusedModule(f"{original}.attention.k_norm", (attention + "norm_k",), WEIGHT_ONLY),
        *(
            FusedModule(f"{original}.feed_forward.{w}", (f"{ours}.feed_forward.{w}",))
            for w in ("w1", "w2", "w3")
        ),
        *(
            FusedModule(f"{original}.{norm}", (f"{ours}.{norm}",), WEIGHT_ONLY)
            for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")
        ),
    ]
    if modulated:
        modules.append(FusedModule(f"{original}.adaLN_modulation.0", (f"{ours}.adaLN_modulation.0",)))
    return modules


def zimage_modules(config: Mapping[str, Any]) -> list[FusedModule] | None:
    """The original modules of a `ZImageTransformer2DModel`, with their diffusers parts; None for another
    transformer's config, or a Z-Image variant the original layout does not describe (other patch
    sizes, the Omni model's SigLIP branch).

    Args:
        config: the transformer config (`n_layers`, `n_refiner_layers`, `all_patch_size`, ...).
    """
    if config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS or "n_layers" not in config:
        return None
    sizes = zip(config.get("all_patch_size", (2,)), config.get("all_f_patch_size", (1,)), strict=False)
    patches = [f"{p}-{f}" for p, f in sizes]
    if patches != [PATCH_KEY] or config.get("siglip_feat_dim"):
        return None
    refiners = int(config.get("n_refiner_layers", 2))
    modules = [
        FusedModule("x_pad_token", ("x_pad_token",), BARE),
        FusedModule("cap_pad_token", ("cap_pad_token",), BARE),
        FusedModule("x_embedder", (f"all_x_embedder.{PATCH_KEY}",)),
        FusedModule("t_embedder.mlp.0", ("t_embedder.mlp.0",)),
        FusedModule("t_embedder.mlp.2", ("t_embedder.mlp.2",)),
        FusedModule("cap_embedder.0", ("cap_embedder.0",), WEIGHT_ONLY),
        FusedModule("cap_embedder.1", ("cap_embedder.1",)),
    ]
    for i in range(refiners):
        modules += _block(f"noise_refiner.{i}", f"noise_refiner.{i}", modulated=True)
    for i in range(refiners):
        modules += _block(f"context_refiner.{i}", f"context_refiner.{i}", modulated=False)
    for i in range(int(config["n_layers"])):
        modules += _block(f"layers.{i}", f"layers.{i}", modulated=True)
    modules += [
        FusedModule("final_layer.linear", (f"all_final_layer.{PATCH_KEY}.linear",)),
        FusedModule("final_layer.adaLN_modulation.1", (f"all_final_layer.{PATCH_KEY}.adaLN_modulation.1",)),
    ]
    return modules
