"""Training data: local copies of the images, the order they are drawn in, and cached VAE latents.

The VAE runs once per image and flip variant before training; each step then draws a latent from the
cached Gaussian (mean + std * noise) instead of encoding pixels again. Which images a step uses, and
whether they are flipped, depend only on (seed, stage, step), so a resumed run draws exactly what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from nbkit.errors import NbkitError
from nbkit.fsio import retry_io
from nbkit.train.components import cast_to

# Stream tags keep the per-purpose random streams of one step independent of each other.
STREAM_STEP, STREAM_INSTANCE_ORDER, STREAM_CLASS_ORDER, STREAM_INIT = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, stable across processes, platforms and Python versions."""
    words = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def copy_to_scratch(sources: Sequence[Path], target_dir: Path) -> list[Path]:
    """Copy images from the session (Drive) to local disk, so training never waits on the mount.

    Copies whose size and modification time match their source are kept. Returns the local paths.

    Args:
        sources: the image files in the session.
        target_dir: a local folder; created if missing.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, source in enumerate(sources):
        # The index keeps two images with the same name in different folders apart.
        target = target_dir / f"{index:05d}-{source.name}"
        stat = retry_io(source.stat, what=f"reading {source}")
        copied = target.stat() if target.exists() else None
        if copied is None or (copied.st_size, copied.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            retry_io(
                lambda source=source, target=target: shutil.copy2(source, target), what=f"copying {source}"
            )
        copies.append(target)
    return copies


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Load an image as a (3, R, R) tensor in [-1, 1], resized to cover R and centre-cropped.

    Returns (pixels, original (height, width), crop top-left (top, left) in resized pixels); SDXL
    conditions on the last two.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError) as error:
        raise NbkitError(
            f"cannot read this image: {error}", path=path, fix="replace or remove it in the session"
        ) from error
    width, height = image.size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)


class LatentCache:
    """VAE latent distributions of every image and flip variant, encoded once.

    Args:
        vae: the model's `AutoencoderKL`.
        paths: the images, in training order.
        resolution: the square training size in pixels.
        flip: also cache the horizontally flipped variant of each image.
        device: where the cached tensors live (the training device).
        normalize: turns sampled latents into the denoiser's input (`Family.latent_normalizer`).
    """

    def __init__(
        self,
        vae,
        paths: Sequence[Path],
        resolution: int,
        *,
        flip: bool,
        device: torch.device,
        normalize: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.resolution = resolution
        self.flip = flip
        self.normalize = normalize
        means, stds, sizes, crops = [], [], [], []
        # SDXL's VAE overflows in fp16; its config says so with force_upcast.
        dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
        original_dtype = vae.dtype
        cast_to(vae, dtype)
        with torch.no_grad():
            for path in paths:
                pixels, original_size, crop = load_image(path, resolution)
                variants = [pixels, pixels.flip(-1)] if flip else [pixels]
                for variant in variants:
                    # One image per encode call, so a latent never depends on what it was batched with.
                    batch = variant[None].to(device=vae.device, dtype=dtype)
                    distribution = vae.encode(batch).latent_dist
                    means.append(distribution.mean[0].float().to(device))
                    stds.append(distribution.std[0].float().to(device))
                sizes.append(original_size)
                crops.append(crop)
        cast_to(vae, original_dtype)
        self.means = torch.stack(means)
        self.stds = torch.stack(stds)
        self.original_sizes = sizes
        self.crops = crops

    def __len__(self) -> int:
        return len(self.original_sizes)

    def sample(
        self, indices: Sequence[int], flips: Sequence[bool], generator: torch.Generator
    ) -> torch.Tensor:
        """Draw normalised latents for images `indices` (flipped where `flips` says) with `generator`."""
        rows = [
            index * 2 + int(flip) if self.flip else index for index, flip in zip(indices, flips, strict=True)
        ]
        mean, std = self.means[rows], self.stds[rows]
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return self.normalize(mean + std * noise)

    def time_ids(self, indices: Sequence[int]) -> torch.Tensor:
        """SDXL's micro-conditioning per image: original size, crop top-left, target size."""
        rows = [
            [*self.original_sizes[index], *self.crops[index], self.resolution, self.resolution]
            for index in indices
        ]
        return torch.tensor(rows, dtype=torch.float32, device=self.means.device)


def epoch_order(seed: int, stream: int, stage_index: int, epoch: int, count: int) -> list[int]:
    """The shuffled order of `count` images in one epoch of one stage."""
    generator = torch.Generator().manual_seed(derive_seed(seed, stream, stage_index, epoch))
    return torch.randperm(count, generator=generator).tolist()


def batch_indices(
    *, seed: int, stream: int, stage_index: int, first_position: int, batch_size: int, count: int
) -> list[int]:
    """Images for `batch_size` consecutive draws starting at `first_position` of the stage's stream.

    Position p is image `epoch_order(epoch=p // count)[p % count]`: every image once per epoch.
    """
    indices, orders = [], {}
    for position in range(first_position, first_position + batch_size):
        epoch = position // count
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, stream, stage_index, epoch, count)
        indices.append(orders[epoch][position % count])
    return indices
