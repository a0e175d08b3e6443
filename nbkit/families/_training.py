"""Training math the families share: noise levels, loss targets and weights, and settings checks.

A family's `noisy_latents` draws a batch's noise level and target with these; every random draw comes
from an explicit `torch.Generator`, so a step's noise and timesteps depend only on the step's seed,
never on what ran before (which is what makes resume bit-exact). torch and diffusers are imported
when called: `nbkit.families` stays cheap to import.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from nbkit.errors import NbkitError

if TYPE_CHECKING:
    import torch

# diffusers' Flux/SD3 examples' defaults for the logit-normal timestep density.
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


@dataclasses.dataclass
class NoisyLatents:
    """One training batch's noised latents and what the denoiser should predict from them.

    Args:
        noisy: the noised latents.
        timesteps: the scheduler timesteps, one per sample (DDPM: on the latents' device; flow
            matching: `1000 * sigma`, on the CPU).
        target: the prediction the loss compares with (noise, v, or flow matching's velocity).
        weights: per-sample loss weights, or None for none (Min-SNR off).
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


def require(condition: bool, message: str, fix: str) -> None:
    """Raise `NbkitError(message, fix=fix)` unless `condition` holds."""
    if not condition:
        raise NbkitError(message, fix=fix)


def sample_timesteps(batch_size: int, scheduler: Any, generator: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps in [0, num_train_timesteps), drawn on the CPU."""
    import torch

    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768).

    Args:
        scheduler: the training `DDPMScheduler`; its `prediction_type` decides the target.
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


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor | None:
    """Per-sample loss weights of Min-SNR weighting (Hang et al. 2023), or None when `gamma` is None.

    For v-prediction the weight is min(SNR, gamma) / (SNR + 1), for epsilon min(SNR, gamma) / SNR.
    """
    if gamma is None:
        return None
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def flow_matching_inputs(
    latents: torch.Tensor,
    noise: torch.Tensor,
    scheduler: Any,
    generator: torch.Generator,
    *,
    sampling: str = "logit_normal",
) -> NoisyLatents:
    """Noise `latents` for a rectified-flow loss as diffusers' Flux DreamBooth LoRA example does.

    Timesteps are drawn from `compute_density_for_timestep_sampling` (logit-normal, or uniform for
    `none`) with `generator`, indexed into the scheduler's own timesteps and sigmas; the loss
    weighting is `compute_loss_weighting_for_sd3` with scheme "none". The target is the velocity
    `noise - latents`.

    Args:
        latents: clean, shifted and scaled latents (B, C, H, W).
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
    return NoisyLatents(noisy, timesteps, noise - latents, weights)


def require_transformer_lora(config: Any, title: str) -> None:
    """The settings every family that trains as a LoRA of its flow-matching transformer refuses:
    full fine-tuning, text-encoder training, SD noise-schedule settings and float16.

    Args:
        config: the run's `TrainConfig`.
        title: the family's name, for messages.
    """
    require(
        config.training_mode != "full",
        f"full fine-tuning of {title} is not supported (training_mode is 'full')",
        f"use training_mode 'auto' or 'lora' (--training-mode lora): nbkit trains {title} as a LoRA of its "
        "transformer",
    )
    require(
        config.lora_rank > 0,
        f"full fine-tuning of {title} is not supported; use --lora-rank N (lora_rank is 0)",
        f"pass --lora-rank 16 (lora_rank=16): nbkit trains {title} as a LoRA of its transformer",
    )
    require(
        config.text_encoder_steps == 0,
        f"training {title}'s text encoder is not supported (text_encoder_steps is {config.text_encoder_steps}): "
        f"nbkit trains a LoRA of the {title} transformer only",
        "pass --te-steps 0 (text_encoder_steps=0): only the transformer's LoRA trains",
    )
    require(
        config.min_snr_gamma is None and config.offset_noise == 0,
        f"min_snr_gamma ({config.min_snr_gamma}) and offset_noise ({config.offset_noise}) are SD noise-schedule "
        f"settings; {title}'s flow-matching loss has no use for them",
        f"drop --min-snr-gamma and --offset-noise (set them to none and 0) for {title}",
    )
    require(
        config.mixed_precision != "fp16",
        f"mixed_precision is 'fp16', but {title} overflows in float16",
        "use mixed_precision 'auto' (bf16 on a GPU that has it) or 'bf16'",
    )
    require(
        config.flux_max_sequence_length in range(1, 513),
        f"flux_max_sequence_length (the text encoder's prompt length) is {config.flux_max_sequence_length}",
        "use 1 to 512 (512 is the pipeline's default)",
    )
