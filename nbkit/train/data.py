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
from nbkit.images.buckets import Sizing
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


def load_image(path: Path, sizing: Sizing) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Load an image as a (3, H, W) tensor in [-1, 1] at its training size (`Sizing.target`: its
    bucket, or the square), resized to cover it and centre-cropped.

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
    target_width, target_height = sizing.target(width, height)
    # Imported photos are already cropped to their size: this only resizes class images and strays.
    scale = max(target_width / width, target_height / height)
    resized = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - target_width) // 2, (resized[1] - target_height) // 2
    image = image.crop((left, top, left + target_width, top + target_height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)


def latent_mask(path: Path, size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """A subject mask as a (1, h, w) tensor in [0, 1] at the latents' size: each latent pixel gets the
    share of its 8x8 (or so) image pixels that are subject.

    Args:
        path: the mask, grayscale, cropped like its photo.
        size: the photo's training (height, width).
        latent_size: the latents' (height, width).
    """
    try:
        with Image.open(path) as opened:
            mask = opened.convert("L")
    except (OSError, ValueError) as error:
        raise NbkitError(
            f"cannot read this subject mask: {error}", path=path, fix="add the mask again, or remove it"
        ) from error
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(pixels, tuple(latent_size))[0]


class LatentCache:
    """VAE latent distributions of every image and flip variant, encoded once, each at its training
    size (in aspect-ratio buckets, latents differ in shape: a batch is drawn from one shape).

    Args:
        vae: the model's `AutoencoderKL`.
        paths: the images, in training order.
        sizing: the run's training size, in buckets or squares.
        flip: also cache the horizontally flipped variant of each image.
        device: where the cached tensors live (the training device).
        normalize: turns sampled latents into the denoiser's input (`Family.latent_normalizer`).
        masks: each image's subject mask (None for none), cached at the latents' size for masked loss.
    """

    def __init__(
        self,
        vae,
        paths: Sequence[Path],
        sizing: Sizing,
        *,
        flip: bool,
        device: torch.device,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        masks: Sequence[Path | None] | None = None,
    ):
        self.flip = flip
        self.normalize = normalize
        means, stds, sizes, crops, shapes, mask_rows = [], [], [], [], [], []
        masks = list(masks) if masks is not None else [None] * len(paths)
        # SDXL's VAE overflows in fp16; its config says so with force_upcast.
        dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
        original_dtype = vae.dtype
        cast_to(vae, dtype)
        with torch.no_grad():
            for path, mask_path in zip(paths, masks, strict=True):
                pixels, original_size, crop = load_image(path, sizing)
                variants = [pixels, pixels.flip(-1)] if flip else [pixels]
                for variant in variants:
                    # One image per encode call, so a latent never depends on what it was batched with.
                    batch = variant[None].to(device=vae.device, dtype=dtype)
                    distribution = vae.encode(batch).latent_dist
                    means.append(distribution.mean[0].float().to(device))
                    stds.append(distribution.std[0].float().to(device))
                if mask_path is not None:
                    mask = latent_mask(mask_path, pixels.shape[-2:], means[-1].shape[-2:]).to(device)
                    mask_rows += [mask, mask.flip(-1)] if flip else [mask]
                else:
                    mask_rows += [None] * len(variants)
                sizes.append(original_size)
                crops.append(crop)
                shapes.append(tuple(pixels.shape[-2:]))
        cast_to(vae, original_dtype)
        # One tensor per row rather than one stacked tensor: in buckets the rows differ in shape.
        self.means, self.stds = means, stds
        self.original_sizes = sizes
        self.crops = crops
        self.target_sizes: list[tuple[int, int]] = shapes  # (height, width) each image trains at
        self.mask_rows = mask_rows
        self.device = device

    @property
    def buckets(self) -> list[list[int]]:
        """The images grouped by training size, sizes in ascending order; one group without buckets."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(self.target_sizes):
            groups.setdefault(size, []).append(index)
        return [groups[size] for size in sorted(groups)]

    def __len__(self) -> int:
        return len(self.original_sizes)

    def sample(
        self, indices: Sequence[int], flips: Sequence[bool], generator: torch.Generator
    ) -> torch.Tensor:
        """Draw normalised latents for images `indices` (flipped where `flips` says) with `generator`."""
        rows = [
            index * 2 + int(flip) if self.flip else index for index, flip in zip(indices, flips, strict=True)
        ]
        mean = torch.stack([self.means[row] for row in rows])
        std = torch.stack([self.stds[row] for row in rows])
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return self.normalize(mean + std * noise)

    def pixel_weights(
        self, indices: Sequence[int], flips: Sequence[bool], background: float | None
    ) -> torch.Tensor | None:
        """Masked loss's weight of each latent pixel, (B, 1, h, w): 1 on the subject, `background`
        elsewhere, 1 everywhere for images without a mask; None when masked loss is off.

        Args:
            indices: the drawn images.
            flips: which of them are flipped.
            background: the weight of the background (`TrainConfig.mask_background`), or None.
        """
        if background is None:
            return None
        rows = [
            index * 2 + int(flip) if self.flip else index for index, flip in zip(indices, flips, strict=True)
        ]
        height, width = self.means[rows[0]].shape[-2:]
        masks = [
            torch.ones(1, height, width, device=self.device)
            if self.mask_rows[row] is None
            else self.mask_rows[row]
            for row in rows
        ]
        return background + (1.0 - background) * torch.stack(masks)

    def time_ids(self, indices: Sequence[int]) -> torch.Tensor:
        """SDXL's micro-conditioning per image: original size, crop top-left, target size."""
        rows = [
            [*self.original_sizes[index], *self.crops[index], *self.target_sizes[index]] for index in indices
        ]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)


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


def bucket_batch_indices(
    *,
    seed: int,
    stream: int,
    stage_index: int,
    first_position: int,
    batch_size: int,
    buckets: list[list[int]],
) -> list[int]:
    """The images of the batch starting at draw `first_position` when images come in buckets.

    Each epoch shuffles every bucket, tops its last batch up from the bucket's own start (so every
    batch is full and of one size, and every image comes at least once per epoch), and shuffles the
    batches; the epoch has the same number of batches each time, so batch n is found without the
    ones before it: a resumed run draws exactly what an uninterrupted one would.

    Args:
        seed: the run's seed.
        stream: the set's random stream.
        stage_index: the stage, mixed into the seed.
        first_position: the first draw of the batch (a multiple of `batch_size`).
        batch_size: images per batch.
        buckets: the image indices of each bucket (`LatentCache.buckets`).
    """
    per_epoch = sum(-(-len(bucket) // batch_size) for bucket in buckets)
    epoch, number = divmod(first_position // batch_size, per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, stream, stage_index, epoch))
    batches = []
    for bucket in buckets:
        order = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
        full = -(-len(order) // batch_size) * batch_size  # rounded up to whole batches
        padded = (order * (full // len(order) + 1))[:full]
        batches += [padded[i : i + batch_size] for i in range(0, len(padded), batch_size)]
    return batches[int(torch.randperm(per_epoch, generator=generator)[number])]


def draw_indices(
    latents: LatentCache,
    *,
    seed: int,
    stream: int,
    stage_index: int,
    first_position: int,
    batch_size: int,
    repeats: Sequence[int] | None = None,
) -> list[int]:
    """The images of one batch: from the stage's stream of draws, or from one bucket when the
    images have several training sizes.

    With `repeats`, image i stands `repeats[i]` times in each epoch's draws (a concept with more
    repeats is drawn more often); with every repeat 1 the draws are those of a run without them.

    Args:
        latents: the set's cached latents.
        seed: the run's seed.
        stream: the set's random stream.
        stage_index: the stage, mixed into the seed.
        first_position: the batch's first draw.
        batch_size: images per batch.
        repeats: draws of each image per epoch (None: 1 each).
    """
    order = {"seed": seed, "stream": stream, "stage_index": stage_index, "first_position": first_position}
    entries = [index for index, times in enumerate(repeats or [1] * len(latents)) for _ in range(times)]
    buckets = latents.buckets
    if len(buckets) == 1:  # squares (or one bucket): the stream every run before buckets drew
        drawn = batch_indices(**order, batch_size=batch_size, count=len(entries))
        return [entries[position] for position in drawn]
    by_image: dict[int, list[int]] = {}
    for position, index in enumerate(entries):
        by_image.setdefault(index, []).append(position)
    bucket_entries = [[position for index in bucket for position in by_image[index]] for bucket in buckets]
    drawn = bucket_batch_indices(**order, batch_size=batch_size, buckets=bucket_entries)
    return [entries[position] for position in drawn]
