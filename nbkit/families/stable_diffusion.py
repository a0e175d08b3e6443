"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet that predicts noise (or v)
from a DDPM-trained schedule, attending to CLIP text embeddings, over a 4-channel latent.

`sd1`, `sd2` and `sdxl` subclass `StableDiffusionFamily` and set their facts; behaviour that differs
between them is a method they override.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from nbkit.families._training import NoisyLatents, min_snr_weights, require, sample_timesteps, training_target
from nbkit.families.base import Family
from nbkit.families.facts import DetectedFamily, FolderConfigs, SingleFileComponent

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Every SD family's UNet and VAE sit under these prefixes in its original (LDM) single file.
LDM_UNET = SingleFileComponent("unet", "model.diffusion_model.", "unet")
LDM_VAE = SingleFileComponent("vae", "first_stage_model.", "vae")

# peft target modules, as in diffusers' DreamBooth LoRA examples.
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusionFamily(Family):
    """A Stable Diffusion family: a UNet denoiser, CLIP text encoders, a 4-channel VAE."""

    denoiser = "unet"
    textual_inversion = ((None, "text_encoder", "tokenizer"),)

    def claims(self, configs: FolderConfigs) -> bool:
        """Whether a UNet folder's configs are of this family (the prediction type aside)."""
        raise NotImplementedError

    def accepts_prediction(self, prediction_type: str) -> bool:
        """Whether a folder whose scheduler predicts `prediction_type` can be of this family."""
        return True

    def detect(self, configs: FolderConfigs) -> DetectedFamily | None:
        if configs.has_transformer or not configs.denoiser or not self.claims(configs):
            return None
        prediction_type = configs.scheduler.get("prediction_type") or "epsilon"
        if not self.accepts_prediction(prediction_type):
            return None
        sample_size = configs.denoiser.get("sample_size") or self.native_resolution // 8
        sample_size = max(sample_size) if isinstance(sample_size, list | tuple) else sample_size
        vae_scale = 2 ** (len(configs.vae.get("block_out_channels", [0] * 4)) - 1)
        return DetectedFamily(self.name, prediction_type, int(sample_size) * vae_scale)

    # -- models: the tiny model, memory figures ---------------------------------------------------

    # The tiny UNet's head widths (one per level, or one for all): 8 heads everywhere, as SD 1.x.
    tiny_attention_head_dim: ClassVar[int | tuple[int, ...]] = 8
    # Linear (SD 2.x, SDXL) rather than 1x1 convolution projections into the UNet's attention.
    linear_projection: ClassVar[bool] = False
    # The UNet computes attention in fp32 (SD 2.x 768-v overflows in fp16 otherwise).
    upcast_attention: ClassVar[bool] = False

    def tiny_scheduler(self) -> Any:
        """The scheduler the real model's repository ships, with the SD training betas."""
        from nbkit.families._tiny import pndm_scheduler

        return pndm_scheduler()

    def make_tiny_pipeline(self) -> DiffusionPipeline:
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        from nbkit.families._tiny import sd_unet, text_encoder_config, vae
        from nbkit.tokenizers import EOS_TOKEN, make_clip_tokenizer

        open_clip = self.open_clip_tokenizer("tokenizer")
        tokenizer = make_clip_tokenizer(pad_token="!" if open_clip else EOS_TOKEN)
        # OpenCLIP uses plain gelu, OpenAI's CLIP quick_gelu. Built first: the seed's first draws.
        text_encoder = CLIPTextModel(
            text_encoder_config(
                tokenizer, hidden_size=32, hidden_act="gelu" if open_clip else "quick_gelu", projection_dim=32
            )
        )
        size = self.tiny_native_resolution
        return StableDiffusionPipeline(
            vae=vae(size, **self.vae_latent),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=sd_unet(
                size // 8,
                cross_attention_dim=32,
                attention_head_dim=self.tiny_attention_head_dim,
                linear_projection=self.linear_projection,
                upcast_attention=self.upcast_attention,
            ),
            scheduler=self.tiny_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def build_tiny_controlnet(self, *, seed: int = 0) -> Any:
        from nbkit.families._tiny import controlnet_from_unet

        return controlnet_from_unet(self.build_tiny_pipeline(seed=seed).unet, seed=seed + 1)

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    def single_file_pipeline_extras(self, index: Mapping[str, Any]) -> dict[str, Any]:
        # No safety checker: single files carry none, and nbkit's downloads leave it out.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------

    def check_training_settings(self, config: Any) -> None:
        require(
            config.quantize_base in ("auto", "none"),
            f"quantize_base is {config.quantize_base!r}, but 8-bit/4-bit base weights are for the large "
            f"transformer families (FLUX.1, Z-Image, FLUX.2 [klein]), not {self.title}",
            "use quantize_base 'auto' (--quantize-base auto): every GPU nbkit supports has room for this model",
        )

    def training_noise_scheduler(self, scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)

    def lora_target_modules(self, role: str) -> list[str] | str:
        return list(UNET_LORA_TARGETS if role == self.denoiser else TEXT_ENCODER_LORA_TARGETS)

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
        # One CLIP encoder's last hidden state, as StableDiffusionPipeline conditions the UNet.
        return text_encoders[0](token_ids[0])[0], None

    def noisy_latents(
        self, scheduler: Any, latents: Any, noise: Any, generator: Any, config: Any
    ) -> NoisyLatents:
        timesteps = sample_timesteps(latents.shape[0], scheduler, generator).to(latents.device)
        return NoisyLatents(
            noisy=scheduler.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            target=training_target(scheduler, latents, noise, timesteps),
            weights=min_snr_weights(scheduler, timesteps, config.min_snr_gamma),
        )

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
        return denoiser(
            batch.noisy,
            batch.timesteps,
            encoder_hidden_states=embeds,
            **self.added_conditions(pooled, time_ids),
        ).sample

    def added_conditions(self, pooled: Any | None, time_ids: Any) -> dict[str, Any]:
        """The UNet's conditioning beyond the prompt embeddings (SDXL's pooled text and time ids).

        Args:
            pooled: the pooled prompt embeddings, or None.
            time_ids: each image's original size, crop corner and target size.
        """
        return {}

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    # A1111's "Approx cheap" coefficients for the SD 1.x/2.x latent space.
    preview_coefficients = (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    )


def cross_attention_width(unet: dict) -> int | None:
    """The UNet's cross-attention width (the first block's, when it lists one per block)."""
    width = unet.get("cross_attention_dim")
    return width[0] if isinstance(width, list | tuple) else width
