"""The text-encoder tensors an original single file carries and a diffusers model has no place for.

Stability's SD 2.x checkpoints hold OpenCLIP ViT-H's whole text tower: 24 residual blocks,
`text_projection` and `logit_scale`. SD 2.x conditions on the penultimate block's output (its configs
say `layer: "penultimate"`), so diffusers' SD 2.x text encoder keeps 23 layers and no projection, and a
conversion from diffusers has nothing to write for the rest. ComfyUI then warns on every load that
`cond_stage_model.model.transformer.resblocks.23.*` is missing (it does not miss the projection or
`logit_scale`); A1111 loads with `strict=False` and says nothing. SDXL's OpenCLIP bigG keeps all its
blocks in diffusers; only `logit_scale` is left behind.

- With the base model's own single file (`base_checkpoint`), the missing tensors are copied from it.
  SD 2.x never runs them, so training the text encoder cannot have changed them: the copies are the
  model's own weights.
- Without one, SD 2.x's last block is written as an identity block: every weight and bias zero. In a
  pre-LayerNorm residual block that adds exactly nothing (its LayerNorms output 0, so attention and MLP
  output their zero biases), so a tool that does run the last block (ComfyUI's CLIPSetLastLayer at -1)
  gets the penultimate block's output, the one SD 2.x was trained on, instead of an invented layer.
  Nothing else is made up: `text_projection` and `logit_scale`, which no loader misses, are left out.

Either way the file's metadata (`nbkit.text_encoder_extras`) names every such tensor and where it came
from, and loaders that build diffusers' 23-layer encoder (nbkit's own reader, diffusers'
`from_single_file`) skip them, so the weights they load are bit-for-bit the converted model's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.layout import ComponentLayout
from nbkit.convert.metadata import METADATA_TEXT_EXTRAS
from nbkit.convert.plan import TensorRecipe
from nbkit.convert.tensor_sources import TensorInfo, TensorSource, ZerosSource, open_tensor_file
from nbkit.errors import NbkitError

BASE_SOURCE = "base_checkpoint"
IDENTITY_SOURCE = "identity_block"
IDENTITY_ORIGIN = "identity block (zeros): SD 2.x takes the penultimate block's output and never runs it"


def _block_prefix(layout: ComponentLayout, layer: int) -> str:
    return f"{layout.prefix}transformer.resblocks.{layer}."


def _check_base(base: TensorSource, layout: ComponentLayout, planned: Mapping[str, tuple[int, ...]]) -> None:
    """The base must hold this encoder's planned tensors with the same shapes: the same architecture."""
    for key, shape in planned.items():
        info = base.infos.get(key)
        if info is None or tuple(info.shape) != tuple(shape):
            found = "lacks it" if info is None else f"has it as {tuple(info.shape)}"
            raise NbkitError(
                f"the base checkpoint does not fit this model's {layout.name}: it needs {key} "
                f"{tuple(shape)}, and the base {found}",
                path=base.path,
                fix="pass the single file this model was trained from as base_checkpoint, or leave it out",
            )


def text_encoder_extras(
    layout: ComponentLayout,
    recipes: list[TensorRecipe],
    config: Mapping[str, Any],
    dtype: torch.dtype,
    base: TensorSource | None,
    identity: ZerosSource,
) -> tuple[list[TensorRecipe], dict[str, list[str]]]:
    """Plan the tensors of `layout`'s original text tower that `recipes` (from diffusers) lack.

    Args:
        layout: an OpenCLIP text encoder's layout (SD 2.x's, SDXL's second).
        recipes: the planned recipes of that encoder.
        config: its diffusers config (`num_hidden_layers`).
        dtype: the dtype of its weights, for the identity block.
        base: the base model's single file, or None.
        identity: the source the identity block's zeros come from; its tensors are added to it.

    Returns:
        (the extra recipes, {origin: [keys]} for the metadata).
    """
    planned = {recipe.key: recipe.shape for recipe in recipes}
    extras: list[TensorRecipe] = []
    origins: dict[str, list[str]] = {}
    if base is not None:
        _check_base(base, layout, planned)
        inherited = _recorded_origins(base)  # a base nbkit wrote says where its own extras came from
        for key, info in base.infos.items():
            if key.startswith(layout.prefix) and key not in planned:
                extras.append(TensorRecipe(key, BASE_SOURCE, (key,), tuple(info.shape)))
                origins.setdefault(inherited.get(key, base.path.name), []).append(key)
    written = set(planned) | {recipe.key for recipe in extras}
    layers = int(config["num_hidden_layers"])
    for layer in range(layers, layers + layout.trailing_blocks):
        model_block, block = _block_prefix(layout, layers - 1), _block_prefix(layout, layer)
        for key, shape in planned.items():
            name = block + key[len(model_block) :]
            if key.startswith(model_block) and name not in written:
                identity.add(name, TensorInfo(dtype, tuple(shape), _nbytes(shape, dtype)))
                extras.append(TensorRecipe(name, IDENTITY_SOURCE, (name,), tuple(shape)))
                origins.setdefault(IDENTITY_ORIGIN, []).append(name)
    return extras, {origin: sorted(keys) for origin, keys in origins.items()}


def _recorded_origins(base: TensorSource) -> dict[str, str]:
    try:
        recorded = json.loads(base.metadata.get(METADATA_TEXT_EXTRAS, "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {key: str(origin) for origin, keys in recorded.items() if isinstance(keys, list) for key in keys}


def open_base(
    path: str | os.PathLike | None, layouts: tuple[ComponentLayout, ...], stack: contextlib.ExitStack
) -> TensorSource | None:
    """Open the base model's single file when a layout can take tensors from it; None otherwise."""
    if path is None or not any(layout.open_clip for layout in layouts):
        return None
    path = Path(path)
    if path.is_dir():
        raise NbkitError(
            "base_checkpoint is a folder; it must be the base model's single file (.safetensors/.ckpt)",
            path=path,
            fix="pass the .safetensors or .ckpt file the model was trained from, or leave it out",
        )
    return stack.enter_context(open_tensor_file(path))


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize
