"""FLUX.1 (dev and schnell): a rectified-flow transformer (double- and single-stream blocks) with a CLIP
and a T5 text encoder over a 16-channel latent packed in 2x2 patches. dev embeds a distilled guidance
scale; schnell is timestep-distilled without one."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from nbkit.families._generation import accepts
from nbkit.families.base import DetectedFamily, Family, FolderConfigs, HubModel

# FLUX.1-schnell shares the family (no guidance input); this is its model-spec name.
SCHNELL_ARCHITECTURE = "flux-1-schnell"
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance default (diffusers' and Forge's)
# How many T5 tokens FLUX.1 reads: what BFL's reference code uses for each model.
FLUX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}


def is_flux_schnell(transformer_config: dict[str, Any]) -> bool:
    """FLUX.1-schnell is timestep-distilled without a guidance input; dev embeds the guidance scale."""
    return not transformer_config.get("guidance_embeds", False)


def flux_sequence_length(pipeline: Any) -> int:
    """How many T5 tokens a FLUX.1 pipeline reads: 512 for dev, 256 for schnell (no guidance embedding),
    never more than its T5 tokenizer holds."""
    schnell = is_flux_schnell(dict(pipeline.transformer.config))
    length = FLUX_SEQUENCE_LENGTH["schnell" if schnell else "dev"]
    limit = getattr(getattr(pipeline, "tokenizer_2", None), "model_max_length", None)
    return min(length, limit) if isinstance(limit, int) and limit > 0 else length


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

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    image_size_multiple = 16  # the VAE's 8 times the transformer's 2x2 patches
    # FLUX.1's 16 latent channels (ComfyUI's and Forge's latent_rgb_factors for Flux).
    preview_coefficients = (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    )
    distilled_guidance_default = FLUX_GUIDANCE
    latent_hires = False  # its latents are packed into tokens: the hires fix upscales pixels
    session_lora_from_diffusers = True

    def owns_pipeline(self, pipeline: Any) -> bool:
        # Its img2img and inpainting pipelines (made with from_pipe) are Flux*Pipeline too.
        return getattr(pipeline, "transformer", None) is not None and type(pipeline).__name__.startswith(
            "Flux"
        )

    def call_arguments(
        self, pipeline: Any, *, guidance_scale: float | None, distilled_guidance: float | None, negative: bool
    ) -> tuple[dict[str, Any], float | None]:
        """FLUX.1's call: the distilled guidance goes to `guidance_scale` (dev only: schnell has no
        guidance embedding and ignores it), the T5 reads `flux_sequence_length` tokens, and true CFG
        (`true_cfg_scale`) runs only with a CFG scale above 1 and a negative prompt (it runs the
        transformer twice per step; diffusers does it only with a negative)."""
        kwargs: dict[str, Any] = {"max_sequence_length": flux_sequence_length(pipeline)}
        distilled = None
        if not is_flux_schnell(dict(pipeline.transformer.config)):
            distilled = self.distilled_guidance_default if distilled_guidance is None else distilled_guidance
            kwargs["guidance_scale"] = distilled
        if (
            guidance_scale is not None
            and guidance_scale > 1
            and negative
            and accepts(pipeline, "true_cfg_scale")
        ):
            kwargs["true_cfg_scale"] = guidance_scale
        return kwargs, distilled

    def cfg_used(self, call_arguments: dict[str, Any], guidance_scale: float | None, pipeline: Any) -> Any:
        return call_arguments.get("true_cfg_scale", 1)  # without true CFG, FLUX.1 runs unguided (CFG 1)

    def needs_negative_pass(self, call_arguments: dict[str, Any]) -> bool:
        return "true_cfg_scale" in call_arguments  # the distilled guidance needs no negative pass

    def preview_latents(self, pipeline: Any, latents: Any, width: int, height: int) -> Any:
        # 2x2 latent patches packed into tokens: unpacked for a preview, or none.
        if latents is None or latents.ndim != 3:
            return latents
        unpack = getattr(pipeline, "_unpack_latents", None)
        factor = getattr(pipeline, "vae_scale_factor", None)
        return unpack(latents, height, width, factor) if unpack and factor else None


FAMILY = Flux1()
