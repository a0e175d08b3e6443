"""Tiny random-weight vision backbones of the real topologies, built offline for tests.

`vit` and `mobilevit` are the classifiers of `nbkit.models.tiny_vision`; `dino` is a bare `ViTModel`
laid out like facebook/dino-vits16 and `clip` a `CLIPModel` like openai/clip-vit-base-patch32 whose
text side uses nbkit's own offline CLIP tokenizer. Each is saved with its processor beside it, so the
ordinary Auto loaders are what the tests exercise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory
from nbkit.models.tiny import check_replaceable
from nbkit.models.tiny_vision import TINY_CLASSIFIERS, build_tiny_classifier
from nbkit.tokenizers import write_clip_vocab_files

TINY_BACKBONES = (*TINY_CLASSIFIERS, "dino", "clip")
TINY_RESOLUTION = 32


def _image_processor():
    from transformers import ViTImageProcessor

    size = TINY_RESOLUTION
    return ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _dino():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=TINY_RESOLUTION,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return ViTModel(config), _image_processor()


def _clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from nbkit.tokenizers import make_clip_tokenizer

    tokenizer = make_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": TINY_RESOLUTION,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_RESOLUTION},
        crop_size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return CLIPModel(config), processor


def build_tiny_backbone(kind: str, *, seed: int = 0) -> tuple[Any, Any]:
    """Build a tiny backbone and its processor in memory (bit-identical for the same seed).

    Args:
        kind: one of `TINY_BACKBONES`.
        seed: seed for the weight initialisation; the global torch RNG is left as it was.

    Returns:
        `(model, processor)`.
    """
    import torch

    if kind not in TINY_BACKBONES:
        raise NbkitError(f"Unknown tiny backbone {kind!r}.", fix=f"Use one of: {', '.join(TINY_BACKBONES)}.")
    if kind in TINY_CLASSIFIERS:
        return build_tiny_classifier(kind, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _dino() if kind == "dino" else _clip()
    return model.eval(), processor


def save_tiny_backbone(kind: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny backbone and save it as an ordinary transformers folder (safetensors).

    Args:
        kind: one of `TINY_BACKBONES`.
        out_dir: new, empty or earlier saved model folder; replaced atomically.
        seed: seed for the weight initialisation.

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    model, processor = build_tiny_backbone(kind, seed=seed)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        processor.save_pretrained(temporary)
        if kind == "clip":
            # Slow (pure-Python) CLIP tokenizers read these files, not tokenizer.json.
            write_clip_vocab_files(temporary)
    return out_dir
