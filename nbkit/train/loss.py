"""The denoising loss: the noise of one training batch and the DreamBooth loss of its prediction.

The noise levels, the target and its weights are each family's (`Family.noisy_latents`). Everything
random here draws from an explicit `torch.Generator` so that a step's noise depends only on the
step's seed, never on what ran before (which is what makes resume bit-exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, offset_noise: float = 0.0
) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus optional offset noise.

    Offset noise (`offset * randn(B, C, 1, 1)`, as fast-DreamBooth's "Offset_Noise") shifts whole
    channels, which lets the model learn very dark and very bright images.

    Args:
        latents: the clean latents, shape (B, C, H, W); noise is drawn on the CPU and moved to their device.
        generator: a CPU generator seeded for this step.
        offset_noise: the offset strength; 0 turns it off.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset_noise:
        channel_shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + offset_noise * channel_shift
    return noise.to(device=latents.device, dtype=latents.dtype)


def per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, computed in float32; with `pixel_weights` (B, 1, H, W), the
    weighted mean, so a sample's loss does not shrink with the size of its subject."""
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if pixel_weights is None:
        return errors.mean(dim=(1, 2, 3))
    weights = pixel_weights.to(device=errors.device, dtype=torch.float32).expand_as(errors)
    return (errors * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-6)


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: torch.Tensor | None,
    num_class: int,
    prior_loss_weight: float,
    pixel_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The DreamBooth loss of one batch whose last `num_class` samples are class (prior) images.

    Returns (total, instance loss, prior loss or None); total = instance + prior_loss_weight * prior.

    Args:
        prediction: the UNet output for the concatenated instance + class batch.
        target: the matching targets.
        weights: optional per-sample weights (Min-SNR, say), same order as the batch.
        num_class: how many trailing samples are class images (0 without prior preservation).
        prior_loss_weight: the weight of the class-image loss.
        pixel_weights: masked loss's per-pixel weights, (B, 1, H, W), or None for none.
    """
    losses = per_sample_mse(prediction, target, pixel_weights)
    if weights is not None:
        losses = losses * weights.to(losses.device)
    num_instance = losses.shape[0] - num_class
    instance_loss = losses[:num_instance].mean()
    if num_class == 0:
        return instance_loss, instance_loss, None
    prior_loss = losses[num_instance:].mean()
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
