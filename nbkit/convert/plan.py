"""Conversion plans: how each output tensor is made from the source's tensors.

The key maps (`keymaps_*`) look only at names, shapes and the model's config and return a list of
`TensorRecipe`s. The same plan then drives both the streaming writer (which never holds the model) and
`apply_recipes`, the plain `state_dict -> state_dict` form that tests and in-memory callers use.

Every recipe is one of: a rename, a rename with a new shape holding the same bytes (a linear weight
that the original layout stores as a 1x1 convolution), a concatenation along the first dimension (q, k
and v fused into one `in_proj`; the bytes of contiguous tensors simply follow each other), or a
transpose (OpenCLIP's `text_projection`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from nbkit.errors import NbkitError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRecipe:
    """How one output tensor is made.

    Args:
        key: its name in the output (original LDM/SGM layout).
        component: the source component it comes from (`unet`, `vae`, `text_encoder`, ...).
        sources: its source tensors' names in that component; several are concatenated along dim 0.
        shape: its shape in the output.
        transpose: whether the (2-D) source is transposed.
    """

    key: str
    component: str
    sources: tuple[str, ...]
    shape: Shape
    transpose: bool = False


def renamed(key: str, component: str, source: str, shape: Shape) -> TensorRecipe:
    return TensorRecipe(key, component, (source,), tuple(shape))


def build_tensor(recipe: TensorRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Make the output tensor of `recipe` from its source tensors (in the order of `recipe.sources`)."""
    tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    if recipe.transpose:
        tensor = tensor.T
    return tensor.contiguous().reshape(recipe.shape)


def apply_recipes(
    recipes: Iterable[TensorRecipe], state_dicts: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Run a plan on in-memory state dicts.

    Args:
        recipes: the plan.
        state_dicts: component name -> that component's state dict.

    Returns:
        The converted state dict, keyed by output names.
    """
    return {
        recipe.key: build_tensor(recipe, [state_dicts[recipe.component][name] for name in recipe.sources])
        for recipe in recipes
    }


def check_plan_covers(
    recipes: list[TensorRecipe], component: str, keys: Iterable[str], *, ignored: Iterable[str] = ()
) -> None:
    """Raise `NbkitError` when a source tensor would be left out or an output name repeats.

    A key the plan does not know means a model nbkit does not understand; converting it anyway would
    silently drop weights.
    """
    used = {name for recipe in recipes for name in recipe.sources}
    skipped = set(ignored)
    unused = sorted(key for key in keys if key not in used and key not in skipped)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise NbkitError(
            f"the {component} has weights nbkit does not know how to place in a single file: {shown}",
            fix="this is not a standard SD 1.x / 2.x / SDXL model; keep it as a diffusers folder",
        )
    outputs = [recipe.key for recipe in recipes]
    if len(set(outputs)) != len(outputs):
        duplicated = sorted({key for key in outputs if outputs.count(key) > 1})
        raise NbkitError(
            f"the {component} maps several weights onto {duplicated[0]!r}; its config is inconsistent"
        )
