"""Image embeddings cached per image content, and a model-free perceptual hash.

The cache is one safetensors file per backbone under the session's `logs/vision_cache/`, keyed by the
sha256 of the image file's bytes (plus `:flip` for the mirrored copy), so re-runs embed nothing new and
a renamed photo is still found. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from nbkit.fsio import atomic_path

CACHE_FOLDER = "vision_cache"


def content_key(data: bytes) -> str:
    """The cache key of an image: sha256 of its file bytes.

    Args:
        data: the encoded image file.
    """
    return hashlib.sha256(data).hexdigest()


def image_content_key(image: Image.Image) -> str:
    """The cache key of an in-memory image: sha256 of its size, mode and pixels.

    Args:
        image: a PIL image.
    """
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def cache_file(cache_dir: str | os.PathLike, backbone_name: str) -> Path:
    """The cache file of one backbone: its name made file-safe.

    Args:
        cache_dir: the cache folder (`logs/vision_cache`).
        backbone_name: `Backbone.name`.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_name).strip("_") or "model"
    return Path(cache_dir) / f"{slug}-{hashlib.sha256(backbone_name.encode()).hexdigest()[:8]}.safetensors"


def embed_cached(
    backbone,
    images: Sequence[Image.Image],
    keys: Sequence[str],
    cache_dir: str | os.PathLike | None,
    *,
    flip: bool = False,
):
    """Embed `images` with `backbone`, reusing and extending the on-disk cache.

    Args:
        backbone: a `nbkit.vision.backbones.Backbone` (anything with `name` and `embed_images`).
        images: the images.
        keys: one content key per image (`content_key` / `image_content_key`).
        cache_dir: the cache folder; None embeds without a cache.
        flip: embed the horizontally mirrored images instead (cached under `key:flip`).

    Returns:
        `(N, D)` float32 L2-normalised embeddings.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    keys = [f"{key}:flip" if flip else key for key in keys]
    path = cache_file(cache_dir, backbone.name) if cache_dir is not None else None
    cache = load_file(path) if path is not None and path.is_file() else {}
    missing = [index for index, key in enumerate(keys) if key not in cache]
    if missing:
        batch = [images[index] for index in missing]
        if flip:
            batch = [ImageOps.mirror(image.convert("RGB")) for image in batch]
        vectors = backbone.embed_images(batch)
        for index, vector in zip(missing, vectors, strict=True):
            cache[keys[index]] = vector.contiguous().clone()
        if path is not None:
            with atomic_path(path) as temporary:
                save_file(cache, str(temporary))
    if not keys:
        return torch.zeros(0, 0)
    return torch.stack([cache[key] for key in keys]).float()


def dhash(image: Image.Image, size: int = 8) -> int:
    """The difference hash of an image: `size * size` bits of "brighter than its right neighbour".

    It survives re-encoding, resizing and small shifts, so it catches copies an embedding threshold
    might miss, for any backbone.

    Args:
        image: a PIL image.
        size: bits per side.
    """
    small = image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    bits = 0
    for row in range(size):
        for column in range(size):
            left = pixels[row * (size + 1) + column]
            right = pixels[row * (size + 1) + column + 1]
            bits = (bits << 1) | int(left > right)
    return bits


def hash_similarity(a: int, b: int, bits: int = 64) -> float:
    """1.0 for identical hashes, about 0.5 for unrelated images.

    Args:
        a: a `dhash`.
        b: another.
        bits: hash length.
    """
    return 1.0 - bin(a ^ b).count("1") / bits


def load_images(paths: Sequence[str | os.PathLike]) -> tuple[list[Image.Image], list[str]]:
    """Open image files upright as RGB and return them with their content keys.

    Args:
        paths: image files.
    """
    images, keys = [], []
    for path in paths:
        data = Path(path).read_bytes()
        with Image.open(Path(path)) as image:
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
        keys.append(content_key(data))
    return images, keys
