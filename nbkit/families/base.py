"""What a model family is and does: the one interface every other layer asks.

A model family (SD 1.x, SDXL, FLUX.1, ...) is one module in `nbkit.families` holding a `Family`
subclass: its facts (sizes, prediction type, text encoders, model-spec names, training defaults) and its
behaviour (telling its folders apart, building its tiny model, what generation and training do
differently for it). Code outside `nbkit.families` asks the family object and never tests a family's
name, so a new family is one new module plus its registry entries.

This module imports neither torch nor diffusers: the behaviour methods import them when called.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from nbkit.families._generation import HubControlNet, config_dict

# "flow": a rectified-flow model that predicts the velocity (noise - image), as FLUX.1 does.
PredictionType = Literal["epsilon", "v_prediction", "flow"]
RESOLUTION_STEP = 64  # VAE downsamples by 8, the UNet by 8 more: sizes must divide by 64


class DetectedFamily(NamedTuple):
    """What a model folder's configs say it is.

    Args:
        family: a key of `nbkit.families.FAMILIES`.
        prediction_type: `epsilon` or `v_prediction` (from the scheduler); `flow` for FLUX.1.
        native_resolution: the denoiser's default image size in pixels.
    """

    family: str
    prediction_type: str
    native_resolution: int


@dataclasses.dataclass(frozen=True)
class FolderConfigs:
    """The JSON configs of a diffusers pipeline folder that tell its family (missing files are `{}`).

    Args:
        folder: the pipeline folder.
        index: `model_index.json`.
        denoiser: `unet/config.json`, or `transformer/config.json` when the folder has a transformer.
        text_encoder: `text_encoder/config.json`.
        scheduler: `scheduler/scheduler_config.json`.
        vae: `vae/config.json`.
    """

    folder: Path
    index: Mapping[str, Any]
    denoiser: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    vae: Mapping[str, Any]

    @property
    def has_transformer(self) -> bool:
        return "transformer" in self.index


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A model of the family on the Hugging Face hub that the notebooks and the CLI offer by key.

    Args:
        key: the short name (`sd15`, `sdxl`, ...).
        repo_id: the hub repository.
        title: a one-line description for menus.
        aliases: other names that mean this model (renamed hub repositories).
        variant: the weight variant to download by default (`fp16` halves the download).
        gated: the hub repository asks users to accept a licence (and so needs a token) first.
    """

    key: str
    repo_id: str
    title: str
    aliases: tuple[str, ...] = ()
    variant: str | None = "fp16"
    gated: bool = False


class Family:
    """A model family: its facts as class attributes, its behaviour as methods.

    Subclasses set every fact below; the methods' defaults are what most families do.

    Args:
        name: the registry key (`sd1`, `sdxl`, `flux`, ...) stored in sessions and single-file metadata.
        title: the name people know it by.
        prediction_type: what its denoiser predicts, `epsilon`, `v_prediction` or `flow`.
        native_resolution: the square size it was trained at, in pixels.
        allowed_resolutions: the sizes that give sensible images without forcing.
        pipeline_class: the diffusers pipeline class that runs it (txt2img).
        text_encoder_count: 1, or 2 for SDXL and FLUX.1.
        cross_attention_dim: the real models' text-embedding width the denoiser attends to.
        modelspec_architecture: the SAI model spec's `modelspec.architecture` (LoRAs append `/lora`).
        modelspec_implementation: the SAI model spec's `modelspec.implementation`: the code base whose
            names the original (single-file) layout uses.
        resolution_step: image sizes must be multiples of this (64 for the UNets; 16 for FLUX.1, whose
            VAE downsamples by 8 and whose transformer packs 2x2 latent patches).
        needs_bf16: the family only runs in bfloat16 or float32 on a GPU (its activations overflow
            float16), so a GPU without bf16 (a T4) cannot run it at a useful speed.
        denoiser: the diffusers component that denoises, `unet` or `transformer`.
        training_defaults: settings a session of this family starts from instead of the SD-era
            defaults of `nbkit.session.settings.TrainConfig`.
        tiny_native_resolution: the size nbkit's tiny random-weight model of this family is built at.
        hub_models: the family's models on the hub, in the order menus list them.
        detection_priority: families are asked to claim a folder in descending order of this; the most
            general family (SD 1.x, any UNet that is nothing else) asks last.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    prediction_type: ClassVar[PredictionType]
    native_resolution: ClassVar[int]
    allowed_resolutions: ClassVar[range]
    pipeline_class: ClassVar[str]
    text_encoder_count: ClassVar[int]
    cross_attention_dim: ClassVar[int]
    modelspec_architecture: ClassVar[str]
    modelspec_implementation: ClassVar[str]
    resolution_step: ClassVar[int] = RESOLUTION_STEP
    needs_bf16: ClassVar[bool] = False
    denoiser: ClassVar[Literal["unet", "transformer"]] = "unet"
    training_defaults: ClassVar[Mapping[str, Any]] = {}
    tiny_native_resolution: ClassVar[int] = 64
    hub_models: ClassVar[tuple[HubModel, ...]] = ()
    detection_priority: ClassVar[int] = 0

    @property
    def smallest_useful_resolution(self) -> int:
        """Below this size the model forgets what it knows; memory advice never goes lower."""
        return self.allowed_resolutions[0]

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.title}>"

    # -- telling a folder's family ----------------------------------------------------------------

    def detect(self, configs: FolderConfigs) -> DetectedFamily | None:
        """This family's reading of a diffusers folder's configs, or None when it is not this family.

        Args:
            configs: the folder's configs.
        """
        raise NotImplementedError

    # -- models: the tiny model, memory figures ---------------------------------------------------
    # (methods about a family's models go here)

    def build_tiny(self, out_dir: str | os.PathLike) -> Path:
        """Build this family's tiny random-weight model (deterministic, offline) as a diffusers folder.

        Args:
            out_dir: the folder to write (created).
        """
        raise NotImplementedError

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (methods about a family's files go here)

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
    # (methods about training a family go here)

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    # image_size_multiple: generated image sides must be multiples of this (A1111's 8: the VAE's factor).
    # preview_coefficients: A1111's "Approx cheap" live preview, a linear map from each latent channel
    #     to RGB (one row per channel).
    # distilled_guidance_default: the default of a guidance-distilled model's embedded guidance scale
    #     (Forge's "Distilled CFG Scale"); None: the family has none and the UI hides the field.
    # latent_hires: the hires fix may upscale the first pass's latents (False: they are packed, so
    #     only pixel upscalers work).
    # controlnet_group: the ControlNet architecture its models take (families that share one, as SD 2.x
    #     512 and 768-v do, name the same group); None: ControlNet is not offered for it.
    # controlnet_title: the group's name in messages ("SD 1.5").
    # controlnets: the hub ControlNets of its group, in the order menus list them.
    image_size_multiple: ClassVar[int] = 8
    preview_coefficients: ClassVar[tuple[tuple[float, float, float], ...]] = ()
    distilled_guidance_default: ClassVar[float | None] = None
    latent_hires: ClassVar[bool] = True
    controlnet_group: ClassVar[str | None] = None
    controlnet_title: ClassVar[str] = ""
    controlnets: ClassVar[tuple[HubControlNet, ...]] = ()
    # session_lora_from_diffusers: the web UI loads a session's LoRA from its diffusers file (the kohya
    #     file is still what it lists and hashes), for a family whose kohya file diffusers cannot read
    #     at every model width.
    session_lora_from_diffusers: ClassVar[bool] = False

    @property
    def flow_matching(self) -> bool:
        """Its denoiser is a rectified-flow model: it takes the flow-matching samplers and schedules."""
        return self.prediction_type == "flow"

    def owns_pipeline(self, pipeline: Any) -> bool:
        """Whether a loaded diffusers pipeline is one of this family's (read from its components' configs).

        Args:
            pipeline: a diffusers pipeline (text-to-image, or one made from it with `from_pipe`).
        """
        denoiser = getattr(pipeline, self.denoiser, None)
        configs = FolderConfigs(
            folder=Path(),
            index=config_dict(getattr(pipeline, "config", None)),
            denoiser=config_dict(denoiser),
            text_encoder=config_dict(getattr(pipeline, "text_encoder", None)),
            scheduler=config_dict(getattr(pipeline, "scheduler", None)),
            vae=config_dict(getattr(pipeline, "vae", None)),
        )
        return denoiser is not None and self.detect(configs) is not None

    def generation_dtype(self, device: Any) -> Any:
        """The weights' dtype for generating on `device`: float32 on the CPU; on a GPU float16, or
        bfloat16 for a family whose activations overflow float16 (`needs_bf16`).

        Args:
            device: a torch device or its name.
        """
        import torch

        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if self.needs_bf16 else torch.float16

    def call_arguments(
        self, pipeline: Any, *, guidance_scale: float | None, distilled_guidance: float | None, negative: bool
    ) -> tuple[dict[str, Any], float | None]:
        """The guidance arguments of a pipeline call, and the distilled guidance the infotext names.

        Args:
            pipeline: the pipeline about to be called.
            guidance_scale: A1111's "CFG scale"; None: the pipeline's default.
            distilled_guidance: the distilled guidance asked for (None: the family's default).
            negative: whether any image of the request has a negative prompt.

        Returns:
            The keyword arguments, and the distilled guidance used (None when the model has none).
        """
        return ({} if guidance_scale is None else {"guidance_scale": guidance_scale}), None

    def cfg_used(self, call_arguments: dict[str, Any], guidance_scale: float | None, pipeline: Any) -> Any:
        """The CFG scale that ran, as the infotext's `CFG scale` names it.

        Args:
            call_arguments: what `call_arguments` returned.
            guidance_scale: the CFG scale asked for (None: the pipeline's default).
            pipeline: the pipeline that ran.
        """
        return guidance_scale if guidance_scale is not None else getattr(pipeline, "guidance_scale", None)

    def needs_negative_pass(self, call_arguments: dict[str, Any]) -> bool:
        """Whether the pipeline call takes the negative prompt (False: the model runs unguided).

        Args:
            call_arguments: what `call_arguments` returned.
        """
        return True

    def preview_latents(self, pipeline: Any, latents: Any, width: int, height: int) -> Any:
        """A step's latents as (batch, channels, height/8, width/8) for a live preview, or None.

        Args:
            pipeline: the pipeline running.
            latents: the latents its step callback got.
            width: the image width in pixels.
            height: the image height in pixels.
        """
        return latents

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a ControlNet's (or UNet's) config is of this family's ControlNet group.

        Args:
            config: the ControlNet's `config.json` (or a UNet config).
        """
        return False
