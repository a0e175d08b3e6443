"""UNet2DConditionModel (diffusers) -> the original `model.diffusion_model.*` layout (SD 1.x, 2.x, SDXL).

The original UNet numbers its modules in one running sequence: `input_blocks.0` is conv_in, then for
each level `layers_per_block` blocks of (ResBlock, SpatialTransformer if the level attends) and a
Downsample except at the last level; `middle_block` is ResBlock, SpatialTransformer, ResBlock;
`output_blocks` walk the levels back up with one block more per level, the Upsample sitting in the last
block of each level but the final one. diffusers names the same modules by level instead. The map is
computed from the config (block types, layers per block), so tiny and full-size models, SD and SDXL,
all go through the same code. Attention blocks keep their inner names; ResBlocks rename theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.convert.plan import Shape, TensorRecipe, check_plan_covers, renamed
from nbkit.errors import NbkitError

LDM_UNET_PREFIX = "model.diffusion_model."

# diffusers ResnetBlock2D part -> original ResBlock part
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

TOP_LEVEL_MODULES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop/pooled-text conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value: int | list[int] | tuple[int, ...], count: int, name: str) -> list[int]:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise NbkitError(f"UNet config: {name} has {len(values)} entries for {count} blocks")
    return values


def unet_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Map each diffusers UNet module name to (original module name, kind), kind `resnet` or `plain`.

    Args:
        config: the UNet's config (`unet/config.json`).
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    if len(up_types) != levels:
        raise NbkitError(f"UNet config: {levels} down blocks but {len(up_types)} up blocks")
    layers = _per_block(config.get("layers_per_block", 2), levels, "layers_per_block")
    mapping = {name: (ldm, "plain") for name, ldm in TOP_LEVEL_MODULES.items()}

    block = 1
    for level, block_type in enumerate(down_types):
        attends = "CrossAttn" in block_type
        for index in range(layers[level]):
            mapping[f"down_blocks.{level}.resnets.{index}"] = (f"input_blocks.{block}.0", "resnet")
            if attends:
                mapping[f"down_blocks.{level}.attentions.{index}"] = (f"input_blocks.{block}.1", "plain")
            block += 1
        if level < levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", "plain")
            block += 1

    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise NbkitError(f"UNet config: mid_block_type {mid_type!r} has no original-layout equivalent")
    mid_attends = mid_type == "UNetMidBlock2DCrossAttn"
    mapping["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    if mid_attends:
        mapping["mid_block.attentions.0"] = ("middle_block.1", "plain")
    mapping["mid_block.resnets.1"] = (f"middle_block.{2 if mid_attends else 1}", "resnet")

    block = 0
    for up_level, block_type in enumerate(up_types):
        attends = "CrossAttn" in block_type
        count = layers[levels - 1 - up_level] + 1
        for index in range(count):
            mapping[f"up_blocks.{up_level}.resnets.{index}"] = (f"output_blocks.{block}.0", "resnet")
            if attends:
                mapping[f"up_blocks.{up_level}.attentions.{index}"] = (f"output_blocks.{block}.1", "plain")
            block += 1
        if up_level < levels - 1:
            slot = 2 if attends else 1
            mapping[f"up_blocks.{up_level}.upsamplers.0.conv"] = (
                f"output_blocks.{block - 1}.{slot}.conv",
                "plain",
            )
    return mapping


def split_module(key: str, module_map: Mapping[str, Any]) -> tuple[str, str] | None:
    """Split `key` into (longest module name found in `module_map`, the rest), or None."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:depth])
        if module in module_map:
            return module, ".".join(parts[depth:])
    return None


def resnet_part(rest: str, key: str, parts: Mapping[str, str], model: str) -> str:
    """Rename the part of a ResNet block weight (`conv1.weight` -> `in_layers.2.weight`) by `parts`.

    Args:
        rest: the key after the block's module path.
        key: the whole diffusers key, for the error message.
        parts: diffusers part -> original part.
        model: `UNet` or `VAE`, for the error message.
    """
    head, _, tail = rest.partition(".")
    if head not in parts:
        raise NbkitError(f"{model} weight {key!r} is not part of a standard ResNet block")
    return f"{parts[head]}.{tail}"


def unet_recipes(
    shapes: Mapping[str, Shape],
    config: Mapping[str, Any],
    *,
    component: str = "unet",
    prefix: str = LDM_UNET_PREFIX,
) -> list[TensorRecipe]:
    """Plan the UNet's conversion to the original layout.

    Args:
        shapes: the diffusers UNet's tensor names and shapes.
        config: its config.
        component: the component name recorded in the recipes.
        prefix: the output key prefix.

    Raises:
        NbkitError: when a weight has no place in the original layout.
    """
    module_map = unet_module_map(config)
    recipes = []
    for key, shape in shapes.items():
        found = split_module(key, module_map)
        if found is None:
            continue  # reported by check_plan_covers below, with the others
        module, rest = found
        ldm_module, kind = module_map[module]
        if kind == "resnet":
            rest = resnet_part(rest, key, RESNET_PARTS, "UNet")
        recipes.append(renamed(f"{prefix}{ldm_module}.{rest}", component, key, shape))
    check_plan_covers(recipes, component, shapes)
    return recipes
