"""AutoencoderKL (diffusers) -> the original `first_stage_model.*` layout.

The encoder's levels keep their order (`down_blocks.i` -> `down.i`); the decoder's are numbered the
other way round in the original (`up_blocks.i` -> `up.{levels-1-i}`). The mid-block attention uses
1x1 convolutions in the original where diffusers uses linear layers: same bytes, two more dimensions.
Folders saved by old diffusers versions name those layers query/key/value/proj_attn; both are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.convert.keymaps_unet import resnet_part, split_module
from nbkit.convert.plan import Shape, TensorRecipe, check_plan_covers, renamed
from nbkit.errors import NbkitError

LDM_VAE_PREFIX = "first_stage_model."

TOP_LEVEL_MODULES = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}

# diffusers attention part -> (original part, stored as a 1x1 convolution in the original)
ATTENTION_PARTS = {
    "group_norm": ("norm", False),
    "to_q": ("q", True),
    "to_k": ("k", True),
    "to_v": ("v", True),
    "to_out.0": ("proj_out", True),
    "query": ("q", True),
    "key": ("k", True),
    "value": ("v", True),
    "proj_attn": ("proj_out", True),
}


def vae_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Map each diffusers VAE module name to (original module name, kind: resnet, attention or plain).

    Args:
        config: the VAE's config (`vae/config.json`).
    """
    levels = len(config["down_block_types"])
    if len(config["up_block_types"]) != levels:
        raise NbkitError("VAE config: the encoder and decoder have different numbers of levels")
    layers = int(config.get("layers_per_block", 2))
    mapping = {name: (ldm, "plain") for name, ldm in TOP_LEVEL_MODULES.items()}
    for level in range(levels):
        for index in range(layers):
            mapping[f"encoder.down_blocks.{level}.resnets.{index}"] = (
                f"encoder.down.{level}.block.{index}",
                "resnet",
            )
        if level < levels - 1:
            mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
                f"encoder.down.{level}.downsample.conv",
                "plain",
            )
        original = levels - 1 - level
        for index in range(layers + 1):
            mapping[f"decoder.up_blocks.{level}.resnets.{index}"] = (
                f"decoder.up.{original}.block.{index}",
                "resnet",
            )
        if level < levels - 1:
            mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (
                f"decoder.up.{original}.upsample.conv",
                "plain",
            )
    for side in ("encoder", "decoder"):
        mapping[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", "resnet")
        mapping[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", "resnet")
        mapping[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", "attention")
    return mapping


def _attention_part(rest: str, shape: Shape, key: str) -> tuple[str, Shape]:
    for part, (original, is_conv) in ATTENTION_PARTS.items():
        if rest.startswith(part + "."):
            tail = rest[len(part) + 1 :]
            if is_conv and tail == "weight" and len(shape) == 2:
                shape = (*shape, 1, 1)
            return f"{original}.{tail}", shape
    raise NbkitError(f"VAE weight {key!r} is not part of a standard attention block")


def vae_recipes(
    shapes: Mapping[str, Shape],
    config: Mapping[str, Any],
    *,
    component: str = "vae",
    prefix: str = LDM_VAE_PREFIX,
) -> list[TensorRecipe]:
    """Plan the VAE's conversion to the original layout.

    Args:
        shapes: the diffusers VAE's tensor names and shapes.
        config: its config.
        component: the component name recorded in the recipes.
        prefix: the output key prefix.
    """
    module_map = vae_module_map(config)
    recipes = []
    for key, shape in shapes.items():
        found = split_module(key, module_map)
        if found is None:
            continue
        module, rest = found
        ldm_module, kind = module_map[module]
        out_shape = tuple(shape)
        if kind == "resnet":
            rest = resnet_part(rest, key, RESNET_PARTS, "VAE")
        elif kind == "attention":
            rest, out_shape = _attention_part(rest, out_shape, key)
        recipes.append(renamed(f"{prefix}{ldm_module}.{rest}", component, key, out_shape))
    check_plan_covers(recipes, component, shapes)
    return recipes
