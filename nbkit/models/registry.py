"""The base models users pick from: the hub models and nbkit's tiny model of each family.

`MODELS` are the choices a notebook offers: the real hub models and a tiny random-weight model of each
family that nbkit builds offline for tests and demos. What sets the families apart (prediction type,
sizes, text encoders, model-spec names) is in `nbkit.families`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Literal

from nbkit.errors import NbkitError, setting
from nbkit.families import FAMILIES
from nbkit.families.facts import RESOLUTION_STEP, HubModel, PredictionType


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A base model users can pick.

    Args:
        key: the short name (`sd15`, `sdxl`, `tiny-sd1`, ...).
        family: a key of `FAMILIES`.
        title: a one-line description for menus.
        repo_id: the Hugging Face hub repository, or None for models nbkit builds itself.
        source: `hub` (downloaded) or `tiny` (built locally by `nbkit.models.tiny`).
        native_resolution: the square size the model was trained at.
        allowed_resolutions: the sizes accepted without `force`.
        variant: the weight variant to download by default (`fp16` halves the download).
        revision: a pinned hub revision, or None for the default branch.
        aliases: other names that mean this model (renamed hub repositories).
        gated: the hub repository asks users to accept a licence (and so needs a token) first.
    """

    key: str
    family: str
    title: str
    repo_id: str | None
    source: Literal["hub", "tiny"]
    native_resolution: int
    allowed_resolutions: range
    variant: str | None = None
    revision: str | None = None
    aliases: tuple[str, ...] = ()
    gated: bool = False

    @property
    def prediction_type(self) -> PredictionType:
        return FAMILIES[self.family].prediction_type


def _hub(family: str, model: HubModel) -> ModelSpec:
    facts = FAMILIES[family]
    return ModelSpec(
        model.key, family, model.title, model.repo_id, "hub", facts.native_resolution,
        facts.allowed_resolutions, variant=model.variant, aliases=model.aliases, gated=model.gated,
    )  # fmt: skip


# The tiny models keep the real VAE's factor of 8 and the real UNet depths, so 64 px (an 8x8 latent)
# is the smallest size that goes through every level; sd2-v is built at 128, as 768 is to 512. Tiny
# FLUX.1 at 64 px has an 8x8 latent, 4x4 = 16 image tokens after 2x2 packing.
# nbkit.models.tiny builds them at these sizes, in the family's size step (64 for the UNets, 16 for
# the transformer families).
TINY_RESOLUTIONS = range(64, 257, 64)


def _tiny(family: str) -> ModelSpec:
    sizes = range(TINY_RESOLUTIONS.start, TINY_RESOLUTIONS.stop, FAMILIES[family].resolution_step)
    return ModelSpec(
        f"tiny-{family}", family, f"Tiny random {FAMILIES[family].title} (offline, for tests and demos)",
        None, "tiny", FAMILIES[family].tiny_native_resolution, sizes,
    )  # fmt: skip


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        *(_hub(name, model) for name, family in FAMILIES.items() for model in family.hub_models),
        *(_tiny(family) for family in FAMILIES),
    )
}


def _loose(name: str) -> str:
    """A model name as people vary it: `SD 1.5`, `sd-1.5` and `sd15` are one name."""
    return re.sub(r"[\s._-]", "", name.lower())


def find_model(key_or_repo: str) -> ModelSpec | None:
    """Return the registry entry for a key, hub repo id or alias, or None.

    Case, spaces, dots, dashes and underscores are ignored in keys and aliases (`SD 1.5` is `sd15`);
    a hub repo id must match but for case.
    """
    wanted = key_or_repo.strip()
    for spec in MODELS.values():
        if wanted.lower() in (name.lower() for name in (spec.key, spec.repo_id or "", *spec.aliases)):
            return spec
    if "/" in wanted:
        return None
    for spec in MODELS.values():
        if _loose(wanted) in (_loose(name) for name in (spec.key, *spec.aliases) if "/" not in name):
            return spec
    return None


def close_models(name: str) -> list[str]:
    """The registry keys closest to `name`, for a did-you-mean (best first, at most three)."""
    keys = {_loose(key): key for key in MODELS}
    return [keys[match] for match in difflib.get_close_matches(_loose(name), keys, n=3, cutoff=0.6)]


def get_model(key_or_repo: str) -> ModelSpec:
    """Return the registry entry for a key (`sd15`), hub repo id or alias.

    Args:
        key_or_repo: what the user typed.

    Raises:
        NbkitError: when it names no registry model; the message lists the keys.
    """
    spec = find_model(key_or_repo)
    if spec is None:
        raise NbkitError(
            f"{key_or_repo!r} is not a model nbkit knows",
            fix=f"use one of: {', '.join(MODELS)}; or give a hub repo id (owner/name), a local "
            "diffusers folder, a .safetensors file or a URL",
        )
    return spec


def check_resolution_step(px: int, step: int = RESOLUTION_STEP) -> int:
    """Check that `px` is a positive multiple of `step`: 64 for any Stable Diffusion model, 16 for FLUX.1.

    Args:
        px: the size in pixels.
        step: the family's `resolution_step`.

    Raises:
        NbkitError: naming the size and the nearest sizes that work.
    """
    if isinstance(px, bool) or not isinstance(px, int) or px <= 0:
        raise NbkitError(f"resolution {px!r} is not a positive whole number of pixels")
    if px % step:
        lower = max(step, px // step * step)
        why = (
            "the VAE and UNet halve it 6 times" if step == RESOLUTION_STEP else "the VAE's 8x and 2x2 patches"
        )
        raise NbkitError(
            f"resolution {px} is not a multiple of {step} ({why})",
            fix=f"use {lower} or {lower + step}",
        )
    return px


def validate_resolution(spec: ModelSpec, px: int, *, force: bool = False) -> int:
    """Check a square training/generation size against what the model was trained for.

    Args:
        spec: the model.
        px: the size in pixels.
        force: accept a size outside the model's sensible range, with a warning.

    Returns:
        `px`, when it is accepted.

    Raises:
        NbkitError: when `px` is not a positive multiple of the family's step (64; 16 for FLUX.1), or
            outside the sensible range without force.
    """
    check_resolution_step(px, FAMILIES[spec.family].resolution_step)
    allowed = spec.allowed_resolutions
    if px in allowed:
        return px
    family = FAMILIES[spec.family]
    if spec.source == "tiny":
        # The tiny models are built small; saying "SD 1.x was trained at 64" would be false.
        trained = (
            f"the tiny test model {spec.key} is built at {spec.native_resolution} px "
            f"({family.title} itself was trained at {family.native_resolution})"
        )
    else:
        trained = f"{family.title} was trained at {spec.native_resolution}"
    effect = (
        "usually gives doubled subjects" if px > allowed[-1] else "usually gives smeared, low-detail images"
    )
    reason = f"{trained}; {px} needs {setting('force_resolution')} and {effect}"
    if not force:
        raise NbkitError(
            f"resolution {px} is outside {allowed[0]}-{allowed[-1]} for {spec.key}: {reason}",
            fix=f"use {spec.native_resolution}, or try it anyway with {setting('force_resolution')}",
        )
    warnings.warn(
        f"forcing resolution {px} on {spec.key}: {trained}; {px} {effect}", UserWarning, stacklevel=2
    )
    return px
