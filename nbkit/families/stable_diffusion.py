"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet that predicts noise (or v)
from a DDPM-trained schedule, attending to CLIP text embeddings, over a 4-channel latent.

`sd1`, `sd2` and `sdxl` subclass `StableDiffusionFamily` and set their facts; behaviour that differs
between them is a method they override.
"""

from __future__ import annotations

from nbkit.families.base import DetectedFamily, Family, FolderConfigs


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
