"""Which diffusers component goes where in a family's single file (`Family.single_file`), and how it is mapped."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbkit.convert.keymaps_text import clip_recipes, open_clip_recipes
from nbkit.convert.keymaps_unet import unet_recipes
from nbkit.convert.keymaps_vae import vae_recipes
from nbkit.convert.plan import Shape, TensorRecipe
from nbkit.families import Family

PlanFunction = Callable[..., list[TensorRecipe]]


@dataclass(frozen=True)
class ComponentLayout:
    """One component's place in a single file.

    Args:
        name: the diffusers component (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
        prefix: its key prefix in the original layout.
        plan: the key-map function (`unet_recipes`, `vae_recipes`, `clip_recipes`, `open_clip_recipes`).
        trailing_blocks: residual blocks the original text tower has after the diffusers model's last
            layer: 1 for SD 2.x, whose diffusers text encoder stops at the penultimate block it uses
            (see `nbkit.convert.text_extras`).
    """

    name: str
    prefix: str
    plan: PlanFunction
    trailing_blocks: int = 0

    @property
    def open_clip(self) -> bool:
        return self.plan is open_clip_recipes

    def recipes(self, shapes: Mapping[str, Shape], config: Mapping[str, Any]) -> list[TensorRecipe]:
        return self.plan(shapes, config, component=self.name, prefix=self.prefix)


_KEYMAPS: dict[str, PlanFunction] = {
    "unet": unet_recipes,
    "vae": vae_recipes,
    "clip": clip_recipes,
    "open_clip": open_clip_recipes,
}


def single_file_layout(family: Family) -> tuple[ComponentLayout, ...]:
    """The components of `family`'s single file (`Family.single_file`) with their key maps.

    Args:
        family: a family with a single-file layout.
    """
    if family.single_file is None:
        raise ValueError(f"{family.title} has no single-file layout")
    return tuple(
        ComponentLayout(
            component.name, component.prefix, _KEYMAPS[component.keymap], component.trailing_blocks
        )
        for component in family.single_file.components
    )
