"""Text encoders (transformers CLIP) -> the original layouts.

- OpenAI CLIP ViT-L (SD 1.x; SDXL's first encoder) keeps transformers' own names under a prefix:
  `cond_stage_model.transformer.text_model.*` / `conditioner.embedders.0.transformer.text_model.*`.
- OpenCLIP (SD 2.x's ViT-H; SDXL's second encoder, bigG) uses open_clip's names under
  `cond_stage_model.model.*` / `conditioner.embedders.1.model.*`: q, k and v fused into one
  `attn.in_proj_weight`/`in_proj_bias`, `text_projection` stored transposed (in x out), and the
  position embedding as a bare `positional_embedding` parameter.

transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` prefix (`CLIPTextModelWithProjection`
keeps it); both spellings are accepted. The `position_ids` buffer, which older versions saved, is not
a weight and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nbkit.convert.plan import Shape, TensorRecipe, apply_recipes, check_plan_covers, renamed
from nbkit.errors import NbkitError

TEXT_MODEL_PREFIX = "text_model."
POSITION_IDS = "embeddings.position_ids"

OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

# transformers CLIPEncoderLayer part -> open_clip ResidualAttentionBlock part
OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def strip_text_model(key: str) -> str:
    """The transformers key without the `text_model.` prefix older versions write."""
    return key[len(TEXT_MODEL_PREFIX) :] if key.startswith(TEXT_MODEL_PREFIX) else key


def clip_recipes(
    shapes: Mapping[str, Shape], config: Mapping[str, Any], *, component: str, prefix: str
) -> list[TensorRecipe]:
    """Plan an OpenAI-CLIP text encoder's conversion: transformers names under `prefix + "text_model."`.

    Args:
        shapes: the text encoder's tensor names and shapes.
        config: its config (unused: the layout does not depend on it; kept for a uniform signature).
        component: the component name recorded in the recipes.
        prefix: e.g. `cond_stage_model.transformer.`.
    """
    recipes = []
    ignored = []
    for key, shape in shapes.items():
        core = strip_text_model(key)
        if core == POSITION_IDS:
            ignored.append(key)
        elif core == "text_projection.weight":
            raise NbkitError(
                f"the {component} has a text projection, which the original CLIP ViT-L layout has no place for"
            )
        else:
            recipes.append(renamed(f"{prefix}{TEXT_MODEL_PREFIX}{core}", component, key, shape))
    check_plan_covers(recipes, component, shapes, ignored=ignored)
    return recipes


def _layer_recipe(core: str, key: str, shape: Shape, component: str, prefix: str) -> TensorRecipe | None:
    """The recipe of a non-q/k/v encoder-layer weight, or None for q/k/v (fused separately)."""
    # core looks like "encoder.layers.{n}.{part}.{weight|bias}"
    parts = core.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    for part, original in OPEN_CLIP_LAYER_PARTS.items():
        if rest.startswith(part + "."):
            name = f"{prefix}transformer.resblocks.{layer}.{original}{rest[len(part) :]}"
            return renamed(name, component, key, shape)
    if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
        return None
    raise NbkitError(f"{component} weight {key!r} is not part of a standard CLIP encoder layer")


def open_clip_recipes(
    shapes: Mapping[str, Shape], config: Mapping[str, Any], *, component: str, prefix: str
) -> list[TensorRecipe]:
    """Plan a text encoder's conversion to the OpenCLIP layout (SD 2.x, SDXL's second encoder).

    Args:
        shapes: the text encoder's tensor names and shapes.
        config: its config (`num_hidden_layers` says which layers must be there).
        component: the component name recorded in the recipes.
        prefix: e.g. `cond_stage_model.model.`.
    """
    by_core = {strip_text_model(key): key for key in shapes}
    recipes = []
    ignored = [key for core, key in by_core.items() if core == POSITION_IDS]
    for core, key in by_core.items():
        shape = tuple(shapes[key])
        if core in OPEN_CLIP_TOP_LEVEL:
            recipes.append(renamed(prefix + OPEN_CLIP_TOP_LEVEL[core], component, key, shape))
        elif core == "text_projection.weight":
            recipes.append(
                TensorRecipe(f"{prefix}text_projection", component, (key,), shape[::-1], transpose=True)
            )
        elif core.startswith("encoder.layers."):
            recipe = _layer_recipe(core, key, shape, component, prefix)
            if recipe is not None:
                recipes.append(recipe)
    for layer in range(int(config["num_hidden_layers"])):
        for kind in ("weight", "bias"):
            names = [f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            missing = [name for name in names if name not in by_core]
            if missing:
                raise NbkitError(f"the {component} lacks {missing[0]!r}; the folder is incomplete")
            sources = tuple(by_core[name] for name in names)
            first = tuple(shapes[sources[0]])
            fused = (sum(shapes[source][0] for source in sources), *first[1:])
            name = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
            recipes.append(TensorRecipe(name, component, sources, fused))
    check_plan_covers(recipes, component, shapes, ignored=ignored)
    return recipes


def text_encoder_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, open_clip: bool, prefix: str
) -> dict[str, torch.Tensor]:
    """Convert a transformers CLIP text encoder state dict to an original layout.

    Args:
        state_dict: the text encoder's state dict (with or without `text_model.`).
        config: its config.
        open_clip: the OpenCLIP layout (SD 2.x, SDXL's second encoder) rather than OpenAI CLIP's.
        prefix: the output key prefix, e.g. `cond_stage_model.transformer.`.
    """
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    plan = open_clip_recipes if open_clip else clip_recipes
    return apply_recipes(plan(shapes, config, component="text", prefix=prefix), {"text": state_dict})
