"""What the rectified-flow transformer families share (FLUX.1, Z-Image, FLUX.2 [klein]), as
`stable_diffusion.py` holds what the UNet families share.

Their models are a large transformer with one or two text encoders of which one is a language model
(T5-XXL, Qwen3) and a 16- or 32-channel VAE. They run in bf16, in sizes of 16 pixels; nbkit trains a
LoRA of the transformer only, on cached caption features with the encoders offloaded, optionally over
an 8-bit or 4-bit frozen transformer, with the flow-matching loss of diffusers' DreamBooth LoRA
examples; their A1111/ComfyUI LoRA file is kohya-style keys over the original fused layout; the hires
fix upscales pixels, since their latents are packed into tokens. A subclass sets its facts (names,
pipeline class, sizes, text encoder, LoRA targets, the word for its big text encoder in memory
messages) and overrides where it differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from nbkit.families._training import NoisyLatents, flow_matching_inputs, require_transformer_lora
from nbkit.families.base import Family
from nbkit.families.facts import DetectedFamily, FolderConfigs, MemoryOption, Task


def transformer_memory_options(
    encoder: str, encoders: tuple[str, ...]
) -> dict[Task, tuple[MemoryOption, ...]]:
    """The ways of running a transformer family, largest first (the planner computes their peaks from
    the family's traced figures). Generation quantizes the transformer and the big text encoder, as
    `nbkit.models.loading.load_pipeline` does; training quantizes the frozen transformer only, its text
    encoders on the CPU once the captions are cached.

    Args:
        encoder: the big text encoder's name in messages (`T5`, `Qwen3`).
        encoders: the pipeline components quantized with the transformer for generation.
    """
    quantized = ("transformer", *encoders)
    return {
        "generate": (
            MemoryOption("bf16", "everything on the GPU in bf16"),
            MemoryOption("bf16-offload", "bf16, each component moved to the GPU only while it runs", offload=True),
            # bitsandbytes' 8-bit modules cannot be offloaded: the int8 transformer and encoder stay.
            MemoryOption("8bit-offload", f"8-bit transformer and {encoder}, the rest offloaded", None, "8bit", True, quantized, quantized),
            MemoryOption("4bit-offload", f"4-bit (NF4) transformer and {encoder}, with offload", None, "4bit", True, quantized),
        ),
        "train": (
            MemoryOption("bf16", "bf16 transformer, text encoders offloaded after caching", offload=True),
            MemoryOption("8bit", "8-bit transformer (LoRA on top), text encoders offloaded", None, "8bit", True, ("transformer",)),
            MemoryOption("4bit", "4-bit (NF4, QLoRA) transformer, text encoders offloaded", None, "4bit", True, ("transformer",)),
        ),
    }  # fmt: skip


class FlowTransformerFamily(Family):
    """A rectified-flow transformer family; subclasses set the facts below and those of `Family`.

    Args:
        pipeline_prefix: the start of its pipelines' class names (`Flux`, `ZImage`, `Flux2`): its
            img2img and inpainting pipelines (made with `from_pipe`) share it.
        transformer_class: its denoiser's diffusers class (`FluxTransformer2DModel`, ...).
        lora_targets: peft `target_modules` of its transformer's LoRA (a regex).
        ways: its ways of running (`transformer_memory_options`).
    """

    pipeline_prefix: ClassVar[str]
    transformer_class: ClassVar[str]
    lora_targets: ClassVar[str]
    ways: ClassVar[Mapping[Task, tuple[MemoryOption, ...]]]

    prediction_type = "flow"
    native_resolution = 1024
    resolution_step = 16  # the VAE's 8 times the transformer's 2x2 patches
    needs_bf16 = True  # their activations overflow float16
    denoiser = "transformer"
    # A rank-16 LoRA of the transformer at a LoRA learning rate, as diffusers' examples.
    training_defaults = MappingProxyType(
        {"text_encoder_steps": 0, "lora_rank": 16, "unet_lr": 1e-4, "unet_steps": 500}
    )
    detection_priority = 100
    quantizable = True

    def detect(self, configs: FolderConfigs) -> DetectedFamily | None:
        if not configs.has_transformer:
            return None
        if (
            str(configs.index.get("_class_name", "")).startswith(self.pipeline_prefix)
            or configs.denoiser.get("_class_name") == self.transformer_class
        ):
            # The transformer has no size of its own; the VAE's sample_size is the size it was made for.
            return DetectedFamily(
                self.name, "flow", int(configs.vae.get("sample_size") or self.native_resolution)
            )
        return None

    def memory_options(self, task: Task) -> tuple[MemoryOption, ...]:
        return self.ways[task]

    # -- training: a LoRA of the transformer, the text encoders frozen and offloaded -----------------

    trains_text_encoders = False
    trains_full_denoiser = False
    offloads_text_encoders = True
    trains_on_quantized_base = True
    xformers_training = False
    lora_file_layout = "original"
    # A LoRA of the tiny transformer, its prompt kept short.
    demo_training_overrides = MappingProxyType(
        {"text_encoder_steps": 0, "lora_rank": 8, "unet_lr": 1e-3, "flux_max_sequence_length": 32}
    )

    @property
    def training_note(self) -> str:  # type: ignore[override]
        return (
            f"{self.title} trains as a LoRA of its transformer: set LORA_RANK (16) and TEXT_ENCODER_STEPS 0"
        )

    def check_training_settings(self, config: Any) -> None:
        require_transformer_lora(config, self.title)

    def training_noise_scheduler(self, scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # A copy, as diffusers' examples keep (`noise_scheduler_copy`): its sigmas and timesteps give the
        # training noise levels, and the pipeline's own scheduler stays free for samples.
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def lora_target_modules(self, role: str) -> list[str] | str:
        return self.lora_targets

    def noisy_latents(
        self, scheduler: Any, latents: Any, noise: Any, generator: Any, config: Any
    ) -> NoisyLatents:
        return flow_matching_inputs(
            latents, noise, scheduler, generator, sampling=config.flux_timestep_sampling
        )

    # -- generation ----------------------------------------------------------------------------------
    image_size_multiple = 16
    latent_hires = False  # latents packed into tokens: the hires fix upscales pixels
    session_lora_from_diffusers = True

    def owns_pipeline(self, pipeline: Any) -> bool:
        return getattr(pipeline, "transformer", None) is not None and type(pipeline).__name__.startswith(
            self.pipeline_prefix
        )
