"""Z-Image (Tongyi-MAI): a 6B single-stream rectified-flow DiT conditioned on a Qwen3-4B encoder's
hidden states, over FLUX.1's 16-channel VAE latent. Z-Image-Turbo is distilled to render in 8 steps
without classifier-free guidance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nbkit.families._generation import GenerationDefaults
from nbkit.families._training import NoisyLatents
from nbkit.families.facts import FusedModule, HubModel
from nbkit.families.flow_transformer import FlowTransformerFamily, transformer_memory_options
from nbkit.families.flux1 import FAMILY as FLUX1

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# The attention and feed-forward layers of the 30 shared blocks (not the refiners), as ai-toolkit's
# and diffusers' Z-Image LoRAs train them.
LORA_TARGETS = r".*(^|\.)layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"
TURBO_STEPS = 8  # Z-Image-Turbo's distilled step count (diffusers' example uses 9 scheduler steps: 8 NFEs)
# Z-Image-Turbo's scheduler shifts by 3, the base model's (Tongyi-MAI/Z-Image) by 6; the base model card
# samples 50 steps at guidance 4 (Z-Image's own scale: A1111's CFG 5).
TURBO_SHIFT = 3.0
BASE_STEPS = 50
BASE_GUIDANCE = 4.0


class ZImage(FlowTransformerFamily):
    name = "zimage"
    title = "Z-Image"
    allowed_resolutions = range(512, 2049, 16)
    pipeline_class = "ZImagePipeline"
    pipeline_prefix = "ZImage"
    transformer_class = "ZImageTransformer2DModel"
    text_encoder_count = 1
    cross_attention_dim = 2560  # Qwen3-4B's width
    modelspec_architecture = "z-image"
    modelspec_implementation = "https://github.com/Tongyi-MAI/Z-Image"
    # needs_bf16: fp16 overflows to NaN (black images) on a T4 or V100 (Tongyi-MAI/Z-Image issue 15).
    tiny_native_resolution = 64
    # Apache 2.0, not gated; one precision each, no fp16 variant (Turbo's transformer is stored in fp32).
    hub_models = (
        HubModel("zimage-turbo", "Tongyi-MAI/Z-Image-Turbo", "Z-Image-Turbo (6B, 8 steps, no CFG; Apache 2.0)", variant=None),
        HubModel("zimage", "Tongyi-MAI/Z-Image", "Z-Image base (6B, 28-50 steps with CFG; Apache 2.0)", variant=None),
    )  # fmt: skip

    # -- models: the tiny model, memory figures ---------------------------------------------------

    vae_latent = FLUX1.vae_latent  # FLUX.1's VAE
    clip_tokenizers = ()  # Qwen's tokenizer only
    ways = transformer_memory_options("Qwen3", ("text_encoder",))

    def make_tiny_pipeline(self) -> DiffusionPipeline:
        from nbkit.families._tiny_zimage import build_tiny_zimage

        return build_tiny_zimage(sample_size=self.tiny_native_resolution, vae_latent=self.vae_latent)

    # -- conversion: its single file holds the transformer alone, in its original layout --------------
    lora_network_module = "networks.lora_zimage"

    def transformer_layout(self, config: Mapping[str, Any]) -> list[FusedModule] | None:
        from nbkit.families._layout_zimage import zimage_modules

        return zimage_modules(config)

    # -- training: a LoRA of the transformer, the Qwen3 encoder frozen ------------------------------
    # The loss of diffusers' Z-Image DreamBooth LoRA example: flow matching on the velocity, with the
    # model's prediction negated (Z-Image predicts image - noise) and its timestep reversed.

    lora_targets = LORA_TARGETS

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
        """(caption features padded to the longest caption, their token mask): the pipeline's own
        `encode_prompt` gives each caption's features without its padding, of its own length."""
        import torch

        features, _ = pipeline.encode_prompt(
            list(captions),  # a copy: the pipeline writes the chat-templated prompts into the list
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        length = max_sequence_length
        embeds = features[0].new_zeros(len(features), length, features[0].shape[-1])
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=embeds.device)
        for row, caption in enumerate(features):
            embeds[row, : len(caption)] = caption
            mask[row, : len(caption)] = True
        return embeds, mask

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
        """The transformer takes lists: one (C, 1, H, W) latent and one unpadded caption per image."""
        import torch

        device = batch.noisy.device
        images = list(batch.noisy.to(embeds.dtype).unsqueeze(2).unbind(0))
        captions = [row[mask] for row, mask in zip(embeds, pooled, strict=True)]
        timestep = (1000 - batch.timesteps.to(device)) / 1000
        prediction = denoiser(images, timestep, captions, return_dict=False)[0]
        return -torch.stack(prediction).squeeze(2)

    # -- generation: few-step, CFG as `pos + s * (pos - neg)` ---------------------------------------
    preview_coefficients = FLUX1.preview_coefficients  # the same VAE latent

    def generation_defaults(self, pipeline: Any) -> GenerationDefaults:
        """Z-Image-Turbo's 8 steps without guidance (CFG 1), or the base model's 50 steps at guidance 4
        (CFG 5); told apart by the scheduler's shift (Turbo's 3, the base model's 6)."""
        shift = getattr(getattr(pipeline, "scheduler", None), "config", {}).get("shift", TURBO_SHIFT)
        if shift > TURBO_SHIFT:
            return GenerationDefaults(BASE_STEPS, BASE_GUIDANCE + 1, "Euler", own=True)
        return GenerationDefaults(TURBO_STEPS, 1.0, "Euler", own=True)

    def call_arguments(
        self, pipeline: Any, *, guidance_scale: float | None, distilled_guidance: float | None, negative: bool
    ) -> tuple[dict[str, Any], float | None]:
        """Z-Image guides as `pos + s * (pos - neg)`, so A1111's CFG scale c is s = c - 1: CFG 1 (what
        Turbo runs at) turns guidance off. Without a CFG scale, the model's own (`generation_defaults`)."""
        if guidance_scale is None:
            guidance_scale = self.generation_defaults(pipeline).cfg_scale
        return {"guidance_scale": max(guidance_scale - 1.0, 0.0)}, None

    def cfg_used(self, call_arguments: dict[str, Any], guidance_scale: float | None, pipeline: Any) -> Any:
        return call_arguments["guidance_scale"] + 1

    def needs_negative_pass(self, call_arguments: dict[str, Any]) -> bool:
        return call_arguments["guidance_scale"] > 0


FAMILY = ZImage()
