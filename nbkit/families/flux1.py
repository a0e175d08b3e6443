"""FLUX.1 (dev and schnell): a rectified-flow transformer (double- and single-stream blocks) with a CLIP
and a T5 text encoder over a 16-channel latent packed in 2x2 patches. dev embeds a distilled guidance
scale; schnell is timestep-distilled without one."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nbkit.families._generation import GenerationDefaults, accepts
from nbkit.families._training import NoisyLatents, require
from nbkit.families.facts import FusedModule, HubModel
from nbkit.families.flow_transformer import FlowTransformerFamily, transformer_memory_options

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

FLUX_FULL_FINE_TUNE = "full fine-tuning of FLUX.1 is not supported; use --lora-rank N"
# nbkit's choice: the attention layers diffusers' Flux DreamBooth LoRA example targets by default, plus
# the text-stream projections and the single blocks' MLP/output projections, as most Flux LoRAs do. A
# regex, so that the single blocks' `proj_out` matches but the transformer's final `proj_out` does not.
LORA_TARGETS = (
    r".*(attn\.(to_k|to_q|to_v|to_out\.0|add_k_proj|add_q_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))"
)
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


class Flux1(FlowTransformerFamily):
    name = "flux"
    title = "FLUX.1"
    allowed_resolutions = range(512, 1537, 16)
    pipeline_class = "FluxPipeline"
    pipeline_prefix = "Flux"
    transformer_class = "FluxTransformer2DModel"
    text_encoder_count = 2
    cross_attention_dim = 4096  # T5-XXL's width
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    tiny_native_resolution = 64  # an 8x8 latent, 4x4 = 16 image tokens after 2x2 packing
    # The FLUX.1 repositories ship bf16 weights only (no fp16 variant).
    hub_models = (
        HubModel(
            "flux1-dev", "black-forest-labs/FLUX.1-dev",
            "FLUX.1 [dev] (gated: accept the licence on the hub, then set HF_TOKEN)", variant=None, gated=True,
            aliases=("flux-dev",),
        ),
        HubModel(
            "flux1-schnell", "black-forest-labs/FLUX.1-schnell", "FLUX.1 [schnell] (4-step, Apache 2.0)",
            variant=None, aliases=("flux-schnell",),
        ),
    )  # fmt: skip
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
    # Generation quantizes the transformer and T5; figures in `figures/flux.json`.
    ways = transformer_memory_options("T5", ("text_encoder_2",))

    def make_tiny_pipeline(self, *, guidance: bool = True) -> DiffusionPipeline:
        """Assemble the tiny FLUX.1 pipeline; the caller seeds torch.

        Args:
            guidance: embed the guidance scale, as FLUX.1 [dev] does; False gives a schnell-like model.
        """
        from nbkit.families._tiny_flux import build_tiny_flux

        return build_tiny_flux(
            sample_size=self.tiny_native_resolution, vae_latent=self.vae_latent, guidance=guidance
        )

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (a FLUX.1 single file holds the transformer alone, in Black Forest Labs' layout)
    lora_network_module = "networks.lora_flux"

    def transformer_layout(self, config: Mapping[str, Any]) -> list[FusedModule] | None:
        from nbkit.families._layout_flux1 import flux1_modules

        return flux1_modules(config)

    def transformer_architecture(self, config: Mapping[str, Any]) -> str:
        return SCHNELL_ARCHITECTURE if is_flux_schnell(dict(config)) else self.modelspec_architecture

    def single_file_checkpoint(self, state_dict: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        from nbkit.families._layout_flux1 import diffusers_checkpoint

        return diffusers_checkpoint(state_dict, config)

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
    # nbkit trains a LoRA of the transformer only, with the flow-matching loss of diffusers' Flux
    # DreamBooth LoRA example; the CLIP and T5 encoders stay frozen and encode each caption once.

    lora_targets = LORA_TARGETS

    def check_training_settings(self, config: Any) -> None:
        require(
            config.training_mode != "full",
            f"{FLUX_FULL_FINE_TUNE} (training_mode is 'full')",
            "use training_mode 'auto' or 'lora' (--training-mode lora): nbkit trains FLUX.1 as a LoRA of its "
            "transformer",
        )
        require(
            config.lora_rank > 0,
            f"{FLUX_FULL_FINE_TUNE} (lora_rank is 0)",
            "pass --lora-rank 16 (lora_rank=16): nbkit trains FLUX.1 as a LoRA of its transformer",
        )
        require(
            config.text_encoder_steps == 0,
            f"training FLUX.1's text encoders is not supported (text_encoder_steps is {config.text_encoder_steps}): "
            "nbkit trains a LoRA of the FLUX.1 transformer only",
            "pass --te-steps 0 (text_encoder_steps=0): only the transformer's LoRA trains, the CLIP and T5 "
            "encoders stay frozen",
        )
        require(
            config.min_snr_gamma is None and config.offset_noise == 0,
            f"min_snr_gamma ({config.min_snr_gamma}) and offset_noise ({config.offset_noise}) are SD noise-schedule "
            "settings; FLUX.1's flow-matching loss has no use for them",
            "drop --min-snr-gamma and --offset-noise (set them to none and 0) for FLUX.1",
        )
        require(
            config.mixed_precision != "fp16",
            "mixed_precision is 'fp16', but FLUX.1 overflows in float16",
            "use mixed_precision 'auto' (bf16 on a GPU that has it) or 'bf16'",
        )
        require(
            config.flux_max_sequence_length in range(1, 513),
            f"flux_max_sequence_length is {config.flux_max_sequence_length}",
            "use 1 to 512 (512 for FLUX.1-dev, 256 for schnell)",
        )
        require(
            math.isfinite(config.flux_guidance) and config.flux_guidance >= 0,
            f"flux_guidance is {config.flux_guidance}",
            "use 1.0 (what diffusers' example's commands pass for FLUX.1-dev) or another value >= 0",
        )

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
        # (T5 sequence, CLIP pooled) through the pipeline's own `encode_prompt`; the text ids it also
        # returns are zeros, rebuilt per batch.
        embeds, pooled, _ = pipeline.encode_prompt(
            list(captions), prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled

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
        # The latents packed in 2x2 patches with their position ids, as FluxPipeline runs the transformer.
        import torch
        from diffusers import FluxPipeline

        size, channels, height, width = batch.noisy.shape
        device, dtype = batch.noisy.device, embeds.dtype
        packed = FluxPipeline._pack_latents(batch.noisy, size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if pipeline.transformer.config.guidance_embeds:  # FLUX.1-dev; schnell has no guidance input
            guidance = torch.full((size,), config.flux_guidance, device=device)
        prediction = denoiser(
            hidden_states=packed,
            timestep=batch.timesteps.to(device) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
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

    def generation_defaults(self, pipeline: Any) -> GenerationDefaults:
        """FLUX.1-schnell is timestep-distilled to 4 steps (its model card's); dev starts from Forge's
        Euler at 20 steps."""
        if pipeline is not None and is_flux_schnell(dict(pipeline.transformer.config)):
            return GenerationDefaults(4, 1.0, "Euler", own=True)
        return super().generation_defaults(pipeline)

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
