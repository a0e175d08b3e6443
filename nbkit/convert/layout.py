"""Which diffusers component goes where in each family's single file, and how it is mapped."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbkit.convert.keymaps_text import clip_recipes, open_clip_recipes
from nbkit.convert.keymaps_unet import LDM_UNET_PREFIX, unet_recipes
from nbkit.convert.keymaps_vae import LDM_VAE_PREFIX, vae_recipes
from nbkit.convert.plan import Shape, TensorRecipe

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


_UNET = ComponentLayout("unet", LDM_UNET_PREFIX, unet_recipes)
_VAE = ComponentLayout("vae", LDM_VAE_PREFIX, vae_recipes)
_SD2 = (
    _UNET,
    _VAE,
    ComponentLayout("text_encoder", "cond_stage_model.model.", open_clip_recipes, trailing_blocks=1),
)

LAYOUTS: dict[str, tuple[ComponentLayout, ...]] = {
    "sd1": (_UNET, _VAE, ComponentLayout("text_encoder", "cond_stage_model.transformer.", clip_recipes)),
    "sd2": _SD2,
    "sd2-v": _SD2,
    "sdxl": (
        _UNET,
        _VAE,
        ComponentLayout("text_encoder", "conditioner.embedders.0.transformer.", clip_recipes),
        ComponentLayout("text_encoder_2", "conditioner.embedders.1.model.", open_clip_recipes),
    ),
}
