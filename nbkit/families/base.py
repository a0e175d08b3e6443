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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from nbkit.families._training import NoisyLatents

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

    # Facts: `trains_text_encoders` (stage 1 can train them; else they only encode each caption once),
    # `offloads_text_encoders` (on a GPU they wait on the CPU once the captions are encoded),
    # `trains_on_quantized_base` (its frozen denoiser may load in 8 or 4 bits under the LoRA, QLoRA),
    # `xformers_training` (its denoiser trains with xformers' attention where installed),
    # `lora_file_layout` (the key layout of its LoRA's A1111/ComfyUI file: `kohya`, as sd-scripts
    # writes it from the diffusers modules, or `bfl`, the fused modules of Black Forest Labs' code),
    # `lora_oom_hint` (said after "train a LoRA" in out-of-memory advice), `training_note` (the
    # notebook's line about how it trains), `demo_training_overrides` (the tiny demo's settings).
    trains_text_encoders: ClassVar[bool] = True
    offloads_text_encoders: ClassVar[bool] = False
    trains_on_quantized_base: ClassVar[bool] = False
    xformers_training: ClassVar[bool] = True
    lora_file_layout: ClassVar[Literal["kohya", "bfl"]] = "kohya"
    lora_oom_hint: ClassVar[str] = ""
    training_note: ClassVar[str] = ""
    demo_training_overrides: ClassVar[Mapping[str, Any]] = {}

    @property
    def text_encoder_roles(self) -> tuple[str, ...]:
        """The pipeline attributes of its text encoders, in pipeline order."""
        return ("text_encoder", "text_encoder_2")[: self.text_encoder_count]

    @property
    def tokenizer_roles(self) -> tuple[str, ...]:
        """The pipeline attributes of its tokenizers, one per text encoder."""
        return ("tokenizer", "tokenizer_2")[: self.text_encoder_count]

    def check_training_settings(self, config: Any) -> None:
        """Refuse training settings this family cannot train with (raises `NbkitError`).

        Args:
            config: the run's `nbkit.session.settings.TrainConfig`.
        """

    def training_noise_scheduler(self, scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        """The scheduler that noises training latents (a fresh one: the pipeline's renders samples).

        Args:
            scheduler_config: the pipeline scheduler's config.
            prediction_type: the session's prediction type (overrides the config's).
        """
        raise NotImplementedError

    def lora_target_modules(self, role: str) -> list[str] | str:
        """peft `target_modules` of a LoRA on pipeline component `role` (a list, or a regex).

        Args:
            role: `text_encoder`, `text_encoder_2` or the denoiser's role.
        """
        raise NotImplementedError

    def kohya_lora_prefix(self, role: str) -> str:
        """The kohya key prefix of pipeline component `role` in a `kohya`-layout LoRA file.

        Args:
            role: the denoiser's role, `text_encoder` or `text_encoder_2`.
        """
        return "lora_unet" if role == self.denoiser else "lora_te"

    def encode_prompts(
        self,
        pipeline: Any,
        text_encoders: Sequence[Any],
        token_ids: Sequence[Any],
        captions: Sequence[str],
        *,
        max_sequence_length: int,
        device: Any,
    ) -> tuple[Any, Any | None]:
        """The denoiser's text conditioning: (prompt embeddings, pooled embeddings or None).

        Args:
            pipeline: the pipeline (for families that encode through its `encode_prompt`).
            text_encoders: the encoders in pipeline order; may be accelerate-wrapped (training) modules.
            token_ids: the captions' token ids, one tensor per tokenizer, on the encoders' device.
            captions: the captions themselves.
            max_sequence_length: the prompt length of families whose tokenizer has none of its own.
            device: the encoders' device.
        """
        raise NotImplementedError

    def noisy_latents(
        self, scheduler: Any, latents: Any, noise: Any, generator: Any, config: Any
    ) -> NoisyLatents:
        """Draw the batch's noise levels (with `generator`) and noise `latents` for the loss.

        Args:
            scheduler: the training noise scheduler (`training_noise_scheduler`).
            latents: the clean latents.
            noise: Gaussian noise like them.
            generator: the step's CPU generator.
            config: the run's `TrainConfig`.
        """
        raise NotImplementedError

    def denoise(
        self,
        pipeline: Any,
        denoiser: Any,
        batch: NoisyLatents,
        embeds: Any,
        pooled: Any | None,
        time_ids: Any,
        config: Any,
    ) -> Any:
        """The denoiser's training prediction for `batch`, shaped like the latents.

        Args:
            pipeline: the pipeline (its unwrapped denoiser's config, its VAE scale).
            denoiser: the denoiser to call (accelerate may have wrapped it).
            batch: the noised latents and timesteps.
            embeds: the prompt embeddings.
            pooled: the pooled embeddings, or None.
            time_ids: each image's size and crop conditioning (original size, crop corner, target size).
            config: the run's `TrainConfig`.
        """
        raise NotImplementedError

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    # (methods about generating with a family go here)
