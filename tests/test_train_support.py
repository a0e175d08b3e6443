"""Helpers shared by the training tests (this module has no tests of its own).

Sessions are built directly on tiny models with a few synthetic photos of one "subject" (a red disc
on blue, a little different in each photo), and trained with settings small enough for a CPU.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nbkit.families import FAMILIES
from nbkit.session.core import Session
from nbkit.session.manifest import BaseModelRef, ImageRecord

TINY_RESOLUTION = {name: family.tiny_native_resolution for name, family in FAMILIES.items()}

PROMPT = "photo of zwx toy"
# Small, fast, deterministic: no mixed precision, no gradient checkpointing, plain AdamW. Batch 2,
# because the tiny UNets' deepest level is 1x1 at 64 px, where group norm needs more than one sample.
FAST = {
    "text_encoder_steps": 2,
    "unet_steps": 3,
    "text_encoder_lr": 1e-3,
    "unet_lr": 1e-3,
    "batch_size": 2,
    "checkpoint_every": 0,
    "keep_checkpoints": 10,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "use_8bit_adam": False,
    "seed": 1234,
    "sample_steps": 2,
    "lr_schedule": "constant",
}


def subject_image(index: int, resolution: int) -> Image.Image:
    """A red disc on a blue background, shifted a little per index."""
    grid = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution
    centre = 0.5 + 0.08 * np.array([np.sin(index * 2.1), np.cos(index * 1.3)])
    inside = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) < 0.09
    pixels = np.zeros((resolution, resolution, 3), np.uint8)
    pixels[..., 2] = 180
    pixels[inside] = (230, 30, 30)
    return Image.fromarray(pixels)


def make_session(
    name: str,
    model_dir: Path,
    family: str,
    *,
    root: Path | None = None,
    images: int = 3,
    caption: str = PROMPT,
    **training,
) -> Session:
    """A session on the tiny model at `model_dir` with `images` subject photos and FAST settings."""
    resolution = TINY_RESOLUTION[family]
    prediction = FAMILIES[family].prediction_type
    base = BaseModelRef(source=str(model_dir), family=family, prediction_type=prediction)
    session = Session.create(name, root=root, base_model=base, resolution=resolution)
    for index in range(images):
        image = subject_image(index, resolution)
        relative = f"instance_images/zwx_{index}.png"
        image.save(session.path / relative)
        session.manifest.images.append(
            ImageRecord(
                file=relative,
                original=f"zwx ({index}).png",
                sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                caption=caption,
                width=resolution,
                height=resolution,
            )
        )
    session.manifest.training = session.manifest.training.replace(
        **{**FAST, "resolution": resolution, **training}
    )
    session.save()
    return session


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.fspath(path))


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{key} differs"


def model_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a diffusers folder, keyed by component."""
    return {path.parent.name: load_tensors(path) for path in sorted(folder.glob("*/*.safetensors"))}


@torch.no_grad()
def denoising_loss(pipeline, images: list[Image.Image], prompt: str, *, seed: int = 0) -> float:
    """Mean denoising loss of an SD 1.x/2.x pipeline on `images` with `prompt`, over fixed noise and timesteps.

    Written independently of nbkit.train: the pipeline's own prompt encoder and DDPM noising.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    embeds, _ = pipeline.encode_prompt(prompt, "cpu", 1, False)
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(50, 950, 10).long()
    losses = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        latents = latents.expand(len(timesteps), -1, -1, -1)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = pipeline.unet(
            noisy, timesteps, encoder_hidden_states=embeds.expand(len(timesteps), -1, -1)
        )
        losses.append(torch.nn.functional.mse_loss(prediction.sample, target).item())
    return float(np.mean(losses))
