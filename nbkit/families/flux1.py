"""FLUX.1 (dev and schnell): a rectified-flow transformer (double- and single-stream blocks) with a CLIP
and a T5 text encoder over a 16-channel latent packed in 2x2 patches. dev embeds a distilled guidance
scale; schnell is timestep-distilled without one."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nbkit.families.base import DetectedFamily, Family, FolderConfigs, HubModel, MemoryOption, Task

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# FLUX.1-schnell shares the family (no guidance input); this is its model-spec name.
SCHNELL_ARCHITECTURE = "flux-1-schnell"


# Rough peak GPU memory of each way of running FLUX.1 (dev and schnell share the architecture), measured
# by the diffusers and kohya communities and rounded up, largest first: bf16 weights, 1024 px, batch 1;
# training is a rank-16 LoRA with gradient checkpointing and cached text embeddings.
MEMORY_OPTIONS: dict[Task, tuple[MemoryOption, ...]] = {
    "generate": (
        MemoryOption("bf16", "everything on the GPU in bf16", 36.0),
        MemoryOption("bf16-offload", "bf16, each component moved to the GPU only while it runs", 26.0, offload=True),
        # bitsandbytes' 8-bit modules cannot be offloaded: the int8 transformer and T5 (15.5 GB) stay.
        MemoryOption("8bit-offload", "8-bit transformer and T5, the rest offloaded", 18.0, "8bit", offload=True),
        MemoryOption("4bit-offload", "4-bit (NF4) transformer and T5, with offload", 11.0, "4bit", offload=True),
    ),
    "train": (
        MemoryOption("bf16", "bf16 transformer, text encoders offloaded after caching", 36.0, offload=True),
        MemoryOption("8bit", "8-bit transformer (LoRA on top), text encoders offloaded", 24.0, "8bit", offload=True),
        MemoryOption("4bit", "4-bit (NF4, QLoRA) transformer, text encoders offloaded", 16.0, "4bit", offload=True),
    ),
}  # fmt: skip


def is_flux_schnell(transformer_config: dict[str, Any]) -> bool:
    """FLUX.1-schnell is timestep-distilled without a guidance input; dev embeds the guidance scale."""
    return not transformer_config.get("guidance_embeds", False)


class Flux1(Family):
    name = "flux"
    title = "FLUX.1"
    prediction_type = "flow"
    native_resolution = 1024
    allowed_resolutions = range(512, 1537, 16)
    pipeline_class = "FluxPipeline"
    text_encoder_count = 2
    cross_attention_dim = 4096  # T5-XXL's width
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    resolution_step = 16
    needs_bf16 = True
    denoiser = "transformer"
    # A rank-16 LoRA of the transformer at a LoRA learning rate, as diffusers' Flux DreamBooth LoRA example.
    training_defaults = MappingProxyType(
        {"text_encoder_steps": 0, "lora_rank": 16, "unet_lr": 1e-4, "unet_steps": 500}
    )
    tiny_native_resolution = 64  # an 8x8 latent, 4x4 = 16 image tokens after 2x2 packing
    # The FLUX.1 repositories ship bf16 weights only (no fp16 variant).
    hub_models = (
        HubModel(
            "flux1-dev", "black-forest-labs/FLUX.1-dev",
            "FLUX.1 [dev] (gated: accept the licence on the hub, then set HF_TOKEN)", variant=None, gated=True,
        ),
        HubModel("flux1-schnell", "black-forest-labs/FLUX.1-schnell", "FLUX.1 [schnell] (4-step, Apache 2.0)", variant=None),
    )  # fmt: skip
    detection_priority = 100

    def detect(self, configs: FolderConfigs) -> DetectedFamily | None:
        if not configs.has_transformer:
            return None

        # -- models: the tiny model, memory figures ---------------------------------------------------
        # (methods about this family's models go here)

        # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
        # (methods about this family's files go here)

        # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
        # (methods about training this family go here)

        # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
        # (methods about generating with this family go here)
        if (
            str(configs.index.get("_class_name", "")).startswith("Flux")
            or configs.denoiser.get("_class_name") == "FluxTransformer2DModel"
        ):
            # The transformer has no size of its own; the VAE's sample_size is the size it was made for.
            return DetectedFamily(
                self.name, "flow", int(configs.vae.get("sample_size") or self.native_resolution)
            )
        return None

    # -- models: the tiny model, memory figures ---------------------------------------------------

    # 16 latent channels, no quant convs, latents scaled and shifted.
    vae_latent = MappingProxyType(
        {
            "latent_channels": 16,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "force_upcast": True,
        }
    )
    clip_tokenizers = ("tokenizer",)  # the second is T5's
    quantizable = True

    def make_tiny_pipeline(self, *, guidance: bool = True) -> DiffusionPipeline:
        """Assemble the tiny FLUX.1 pipeline; the caller seeds torch.

        Args:
            guidance: embed the guidance scale, as FLUX.1 [dev] does; False gives a schnell-like model.
        """
        from nbkit.families._tiny_flux import build_tiny_flux

        return build_tiny_flux(
            sample_size=self.tiny_native_resolution, vae_latent=self.vae_latent, guidance=guidance
        )

    def memory_options(self, task: Task) -> tuple[MemoryOption, ...]:
        return MEMORY_OPTIONS[task]

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (a FLUX.1 single file holds the transformer alone: `nbkit.convert.flux` converts it)


FAMILY = Flux1()
