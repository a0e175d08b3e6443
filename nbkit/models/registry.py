"""The base models users pick from, and the facts about each model family.

`FAMILIES` is the one place that knows what sets SD 1.x, SD 2.x (epsilon and v-prediction), SDXL and
FLUX.1 apart: prediction type, native resolution, the resolutions that make sense, the text encoders, the
names the SAI model spec gives them. `UNET_FAMILIES` are the Stable Diffusion ones (a UNet denoiser);
FLUX.1 is a rectified-flow transformer with a CLIP and a T5 text encoder and takes its own paths. The conversion, LoRA export and training code read it from here
rather than repeating those facts, and `detect_family_from_config` tells a diffusers folder's family
from its configs with them.

`MODELS` are the choices a notebook offers: the four real hub models and a tiny random-weight model of
each family that nbkit builds offline for tests and demos.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

from nbkit.errors import NbkitError
from nbkit.fsio import read_json

# "flow": a rectified-flow model that predicts the velocity (noise - image), as FLUX.1 does.
PredictionType = Literal["epsilon", "v_prediction", "flow"]
RESOLUTION_STEP = 64  # VAE downsamples by 8, the UNet by 8 more: sizes must divide by 64


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What a model family is.

    Args:
        name: `sd1`, `sd2`, `sd2-v`, `sdxl` or `flux`.
        title: the name people know it by.
        prediction_type: what its denoiser predicts, `epsilon`, `v_prediction` or `flow`.
        native_resolution: the square size it was trained at, in pixels.
        allowed_resolutions: the sizes that give sensible images without forcing.
        pipeline_class: the diffusers pipeline class that runs it.
        text_encoder_count: 1, or 2 for SDXL and FLUX.1.
        cross_attention_dim: the real models' text-embedding width the denoiser attends to.
        modelspec_architecture: the SAI model spec's `modelspec.architecture` (LoRAs append `/lora`).
        modelspec_implementation: the SAI model spec's `modelspec.implementation`: the code base whose
            names the original (single-file) layout uses.
        resolution_step: image sizes must be multiples of this (64 for the UNets; 16 for FLUX.1, whose
            VAE downsamples by 8 and whose transformer packs 2x2 latent patches).
        needs_bf16: the family only runs in bfloat16 or float32 on a GPU (FLUX.1's activations overflow
            float16), so a GPU without bf16 (a T4) cannot run it at a useful speed.
        denoiser: the diffusers component that denoises, `unet` or `transformer`.
    """

    name: str
    title: str
    prediction_type: PredictionType
    native_resolution: int
    allowed_resolutions: range
    pipeline_class: str
    text_encoder_count: int
    cross_attention_dim: int
    modelspec_architecture: str
    modelspec_implementation: str
    resolution_step: int = RESOLUTION_STEP
    needs_bf16: bool = False
    denoiser: Literal["unet", "transformer"] = "unet"

    @property
    def smallest_useful_resolution(self) -> int:
        """Below this size the model forgets what it knows; memory advice never goes lower."""
        return self.allowed_resolutions[0]


_COMPVIS = "https://github.com/CompVis/stable-diffusion"
_STABILITY_SD2 = "https://github.com/Stability-AI/stablediffusion"
_STABILITY_SGM = "https://github.com/Stability-AI/generative-models"
_BFL = "https://github.com/black-forest-labs/flux"

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "sd1", "SD 1.x", "epsilon", 512, range(384, 641, 64), "StableDiffusionPipeline", 1, 768,
            "stable-diffusion-v1", _COMPVIS,
        ),
        FamilySpec(
            "sd2", "SD 2.x (512)", "epsilon", 512, range(384, 641, 64), "StableDiffusionPipeline", 1, 1024,
            "stable-diffusion-v2-512", _STABILITY_SD2,
        ),
        FamilySpec(
            "sd2-v", "SD 2.x (768, v-prediction)", "v_prediction", 768, range(640, 961, 64),
            "StableDiffusionPipeline", 1, 1024, "stable-diffusion-v2-768-v", _STABILITY_SD2,
        ),
        FamilySpec(
            "sdxl", "SDXL", "epsilon", 1024, range(768, 1153, 64), "StableDiffusionXLPipeline", 2, 2048,
            "stable-diffusion-xl-v1-base", _STABILITY_SGM,
        ),
        # cross_attention_dim: T5-XXL's width. FLUX.1-schnell shares the family (no guidance input);
        # `FLUX_SCHNELL_ARCHITECTURE` is its model-spec name.
        FamilySpec(
            "flux", "FLUX.1", "flow", 1024, range(512, 1537, 16), "FluxPipeline", 2, 4096,
            "flux-1-dev", _BFL, resolution_step=16, needs_bf16=True, denoiser="transformer",
        ),
    )
}  # fmt: skip
UNET_FAMILIES = tuple(name for name, spec in FAMILIES.items() if spec.denoiser == "unet")
# Training settings a family starts from instead of `TrainConfig`'s (SD-era) defaults: FLUX.1 trains a
# rank-16 LoRA of its transformer at a LoRA learning rate, as diffusers' Flux DreamBooth LoRA example.
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "flux": {"text_encoder_steps": 0, "lora_rank": 16, "unet_lr": 1e-4, "unet_steps": 500},
}
FLUX_SCHNELL_ARCHITECTURE = "flux-1-schnell"


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

    @property
    def family_spec(self) -> FamilySpec:
        return FAMILIES[self.family]


def _hub(
    key: str,
    repo_id: str,
    family: str,
    title: str,
    aliases: tuple[str, ...] = (),
    *,
    variant: str | None = "fp16",
    gated: bool = False,
) -> ModelSpec:
    facts = FAMILIES[family]
    return ModelSpec(
        key, family, title, repo_id, "hub", facts.native_resolution, facts.allowed_resolutions,
        variant=variant, aliases=aliases, gated=gated,
    )  # fmt: skip


# The tiny models keep the real VAE's factor of 8 and the real UNet depths, so 64 px (an 8x8 latent)
# is the smallest size that goes through every level; sd2-v is built at 128, as 768 is to 512. Tiny
# FLUX.1 at 64 px has an 8x8 latent, 4x4 = 16 image tokens after 2x2 packing.
# nbkit.models.tiny builds them at these sizes.
TINY_NATIVE_RESOLUTION = {"sd1": 64, "sd2": 64, "sd2-v": 128, "sdxl": 64, "flux": 64}
TINY_RESOLUTIONS = range(64, 257, 64)


def _tiny(family: str) -> ModelSpec:
    return ModelSpec(
        f"tiny-{family}", family, f"Tiny random {FAMILIES[family].title} (offline, for tests and demos)",
        None, "tiny", TINY_NATIVE_RESOLUTION[family], TINY_RESOLUTIONS,
    )  # fmt: skip


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        _hub("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", "Stable Diffusion 1.5",
             aliases=("runwayml/stable-diffusion-v1-5",)),
        _hub("sd21-512", "stabilityai/stable-diffusion-2-1-base", "sd2", "Stable Diffusion 2.1 base (512 px)"),
        _hub("sd21-768", "stabilityai/stable-diffusion-2-1", "sd2-v", "Stable Diffusion 2.1 (768 px, v-prediction)"),
        _hub("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "Stable Diffusion XL base 1.0"),
        # The FLUX.1 repositories ship bf16 weights only (no fp16 variant).
        _hub("flux1-dev", "black-forest-labs/FLUX.1-dev", "flux",
             "FLUX.1 [dev] (gated: accept the licence on the hub, then set HF_TOKEN)", variant=None, gated=True),
        _hub("flux1-schnell", "black-forest-labs/FLUX.1-schnell", "flux",
             "FLUX.1 [schnell] (4-step, Apache 2.0)", variant=None),
        *(_tiny(family) for family in FAMILIES),
    )
}  # fmt: skip


def get_family(name: str) -> FamilySpec:
    """Return the facts of family `name`, or raise `NbkitError` listing the families."""
    if name not in FAMILIES:
        raise NbkitError(
            f"unknown model family {name!r}",
            fix=f"use one of: {', '.join(FAMILIES)}",
        )
    return FAMILIES[name]


def find_model(key_or_repo: str) -> ModelSpec | None:
    """Return the registry entry for a key, hub repo id or alias (case-insensitive), or None."""
    wanted = key_or_repo.strip().lower()
    for spec in MODELS.values():
        names = (spec.key, spec.repo_id or "", *spec.aliases)
        if wanted in (name.lower() for name in names):
            return spec
    return None


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
    reason = f"{trained}; {px} needs --force-resolution and {effect}"
    if not force:
        raise NbkitError(
            f"resolution {px} is outside {allowed[0]}-{allowed[-1]} for {spec.key}: {reason}",
            fix=f"use {spec.native_resolution}, or pass --force-resolution (force_resolution=True in "
            "Python) to try it anyway",
        )
    warnings.warn(f"forcing resolution {px} on {spec.key}: {reason}", UserWarning, stacklevel=2)
    return px


class DetectedFamily(NamedTuple):
    """What a model folder's configs say it is.

    Args:
        family: `sd1`, `sd2`, `sd2-v`, `sdxl` or `flux`.
        prediction_type: `epsilon` or `v_prediction` (from the scheduler); `flow` for FLUX.1.
        native_resolution: the denoiser's default image size in pixels.
    """

    family: str
    prediction_type: str
    native_resolution: int


def _config(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError as error:
        raise NbkitError(
            f"not valid JSON ({error})", path=path, fix="download or save the model again"
        ) from error


def detect_family_from_config(folder: str | os.PathLike) -> DetectedFamily:
    """Tell the family, prediction type and native resolution of a diffusers folder from its configs.

    Never from file sizes: FLUX.1 has a `transformer` (FluxTransformer2DModel) instead of a UNet, SDXL
    has a second text encoder and `text_time` conditioning, SD 2.x has OpenCLIP (1024-wide cross
    attention, linear projections, gelu), and the scheduler says whether the UNet predicts noise or v.

    Args:
        folder: a diffusers pipeline folder (with model_index.json and unet/ or transformer/config.json).

    Raises:
        NbkitError: when the folder lacks model_index.json or the denoiser's config, or a config is not JSON.
    """
    folder = Path(folder)
    index = _config(folder, "model_index.json")
    if index and "transformer" in index:
        return _detect_flux(folder, index)
    unet = _config(folder, "unet/config.json")
    if not index or not unet:
        raise NbkitError(
            "cannot tell the model family: model_index.json or unet/config.json is missing",
            path=folder,
            fix="give a diffusers pipeline folder",
        )
    text_encoder = _config(folder, "text_encoder/config.json")
    scheduler = _config(folder, "scheduler/scheduler_config.json")
    vae = _config(folder, "vae/config.json")

    second_encoder = index.get("text_encoder_2")
    has_second_encoder = isinstance(second_encoder, list) and None not in second_encoder
    if has_second_encoder or unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
    else:
        cross_attention = unet.get("cross_attention_dim")
        cross_attention = cross_attention[0] if isinstance(cross_attention, list | tuple) else cross_attention
        open_clip_width = FAMILIES["sd2"].cross_attention_dim
        # OpenCLIP ViT-H: 1024 wide, plain gelu (CLIP ViT-L of SD 1.x uses quick_gelu).
        open_clip = (
            text_encoder.get("hidden_act") == "gelu" or text_encoder.get("hidden_size") == open_clip_width
        )
        sd2 = cross_attention == open_clip_width or unet.get("use_linear_projection") or open_clip
        family = "sd2" if sd2 else "sd1"
    prediction_type = scheduler.get("prediction_type") or "epsilon"
    if family == "sd2" and prediction_type == "v_prediction":
        family = "sd2-v"
    sample_size = unet.get("sample_size") or FAMILIES[family].native_resolution // 8
    sample_size = max(sample_size) if isinstance(sample_size, list | tuple) else sample_size
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return DetectedFamily(family, prediction_type, int(sample_size) * vae_scale)


def _detect_flux(folder: Path, index: dict) -> DetectedFamily:
    transformer = _config(folder, "transformer/config.json")
    if not transformer:
        raise NbkitError(
            "cannot tell the model family: transformer/config.json is missing",
            path=folder,
            fix="give a complete diffusers pipeline folder",
        )
    if (
        index.get("_class_name", "").startswith("Flux")
        or transformer.get("_class_name") == "FluxTransformer2DModel"
    ):
        # The transformer has no size of its own; the VAE's sample_size is the size it was made for.
        vae = _config(folder, "vae/config.json")
        return DetectedFamily(
            "flux", "flow", int(vae.get("sample_size") or FAMILIES["flux"].native_resolution)
        )
    raise NbkitError(
        f"{index.get('_class_name', 'this pipeline')} is not a model family nbkit knows",
        path=folder,
        fix=f"use a model of one of: {', '.join(spec.title for spec in FAMILIES.values())}",
    )


def is_flux_schnell(transformer_config: dict) -> bool:
    """FLUX.1-schnell is timestep-distilled without a guidance input; dev embeds the guidance scale."""
    return not transformer_config.get("guidance_embeds", False)
