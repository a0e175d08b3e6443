"""FLUX.1 (dev and schnell): a rectified-flow transformer (double- and single-stream blocks) with a CLIP
and a T5 text encoder over a 16-channel latent packed in 2x2 patches. dev embeds a distilled guidance
scale; schnell is timestep-distilled without one."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from nbkit.families.base import DetectedFamily, Family, FolderConfigs, HubModel

# FLUX.1-schnell shares the family (no guidance input); this is its model-spec name.
SCHNELL_ARCHITECTURE = "flux-1-schnell"


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


FAMILY = Flux1()
