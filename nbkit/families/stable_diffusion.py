"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet that predicts noise (or v)
from a DDPM-trained schedule, attending to CLIP text embeddings, over a 4-channel latent.

`sd1`, `sd2` and `sdxl` subclass `StableDiffusionFamily` and set their facts; behaviour that differs
between them is a method they override.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nbkit.families._training import NoisyLatents, min_snr_weights, require, sample_timesteps, training_target
from nbkit.families.base import DetectedFamily, Family, FolderConfigs

# peft target modules, as in diffusers' DreamBooth LoRA examples.
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class StableDiffusionFamily(Family):
    """A Stable Diffusion family: a UNet denoiser, CLIP text encoders, a 4-channel VAE."""

    denoiser = "unet"

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
    # (methods about this family's models go here)

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (methods about this family's files go here)

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
    # (methods about training this family go here)

    def check_training_settings(self, config: Any) -> None:
        require(
            config.quantize_base in ("auto", "none"),
            f"quantize_base is {config.quantize_base!r}, but 8-bit/4-bit base weights are for FLUX.1 only",
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
    # (methods about generating with this family go here)


def cross_attention_width(unet: dict) -> int | None:
    """The UNet's cross-attention width (the first block's, when it lists one per block)."""
    width = unet.get("cross_attention_dim")
    return width[0] if isinstance(width, list | tuple) else width
