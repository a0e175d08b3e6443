"""The denoising loss: noise, targets and weights for one training batch.

Everything random here draws from an explicit `torch.Generator` so that a step's noise and timesteps
depend only on the step's seed, never on what ran before (which is what makes resume bit-exact).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

# diffusers' Flux/SD3 examples' defaults for the logit-normal timestep density.
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


@dataclasses.dataclass
class FlowMatchingInputs:
    """One batch of a flow-matching (rectified flow) step.

    Args:
        noisy: `(1 - sigma) * latents + sigma * noise`.
        timesteps: the scheduler timesteps (`1000 * sigma`), one per sample, on the CPU.
        sigmas: the noise levels, shaped (B, 1, 1, 1) like the latents.
        target: `noise - latents`, the velocity the model predicts.
        weights: per-sample loss weights (ones: weighting "none").
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor


def flow_matching_inputs(
    latents: torch.Tensor,
    noise: torch.Tensor,
    scheduler,
    generator: torch.Generator,
    *,
    sampling: str = "logit_normal",
) -> FlowMatchingInputs:
    """Noise `latents` for FLUX.1's loss as diffusers' Flux DreamBooth LoRA example does.

    Timesteps are drawn from `compute_density_for_timestep_sampling` (logit-normal, or uniform for
    `none`) with `generator`, indexed into the scheduler's own timesteps and sigmas; the loss
    weighting is `compute_loss_weighting_for_sd3` with scheme "none".

    Args:
        latents: clean, shifted and scaled latents (B, 16, H, W).
        noise: Gaussian noise like `latents`.
        scheduler: a `FlowMatchEulerDiscreteScheduler` straight from the model's config.
        generator: a CPU generator seeded for this step.
        sampling: `logit_normal` or `none` (uniform).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    if sampling not in ("logit_normal", "none"):
        raise ValueError(f"sampling must be 'logit_normal' or 'none', got {sampling!r}")
    batch = latents.shape[0]
    density = compute_density_for_timestep_sampling(
        weighting_scheme=sampling,
        batch_size=batch,
        logit_mean=LOGIT_MEAN,
        logit_std=LOGIT_STD,
        generator=generator,
    )
    indices = (density * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype).view(batch, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    weights = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas).view(batch)
    return FlowMatchingInputs(noisy, timesteps, sigmas, noise - latents, weights)


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


def sample_timesteps(batch_size: int, scheduler: DDPMScheduler, generator: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps in [0, num_train_timesteps), drawn on the CPU."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768).

    Args:
        scheduler: the training noise scheduler; its `prediction_type` decides the target.
        latents: clean latents.
        noise: the noise added to them.
        timesteps: one timestep per sample.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None
) -> torch.Tensor | None:
    """Per-sample loss weights of Min-SNR weighting (Hang et al. 2023), or None when `gamma` is None.

    For v-prediction the weight is min(SNR, gamma) / (SNR + 1), for epsilon min(SNR, gamma) / SNR.
    """
    if gamma is None:
        return None
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in float32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def dreambooth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: torch.Tensor | None,
    num_class: int,
    prior_loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The DreamBooth loss of one batch whose last `num_class` samples are class (prior) images.

    Returns (total, instance loss, prior loss or None); total = instance + prior_loss_weight * prior.

    Args:
        prediction: the UNet output for the concatenated instance + class batch.
        target: the matching targets.
        weights: optional per-sample weights (Min-SNR), same order as the batch.
        num_class: how many trailing samples are class images (0 without prior preservation).
        prior_loss_weight: the weight of the class-image loss.
    """
    losses = per_sample_mse(prediction, target)
    if weights is not None:
        losses = losses * weights.to(losses.device)
    num_instance = losses.shape[0] - num_class
    instance_loss = losses[:num_instance].mean()
    if num_class == 0:
        return instance_loss, instance_loss, None
    prior_loss = losses[num_instance:].mean()
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
