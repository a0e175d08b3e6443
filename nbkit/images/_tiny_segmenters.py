"""A tiny random-weight CLIPSeg of the real topology, built offline for tests and demos.

`clipseg` is a `CLIPSegForImageSegmentation` laid out like CIDAS/clipseg-rd64-refined (a CLIP text and
vision tower, a decoder reading three of the vision layers through FiLM on the text embedding, and the
refined model's convolution and two transposed convolutions back to the input size) with nbkit's own
offline CLIP tokenizer (`nbkit.tokenizers.make_clip_tokenizer`) and a `ViTImageProcessor` that squashes
a photo to the model's square, as CIDAS's does. Nothing is downloaded. Random weights make a random
mask, which is all the tests need: a map of the photo's shape with values from 0 to 1.

A model is built once per process (the tokenizer learns its merges, which takes a moment) and each
caller gets its own copy, so moving one to a GPU in fp16 leaves the next caller's alone.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory

TINY_SEGMENTERS = ("clipseg",)
# CIDAS's CLIPSeg takes 352 px in 16 px patches (22x22); the tiny one 64 px in the same patches (4x4).
CLIPSEG_RESOLUTION = 64
CLIPSEG_PATCH = 16


def _clipseg() -> tuple[Any, Any]:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from nbkit.tokenizers import make_clip_tokenizer

    tokenizer = make_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        # The text tower pools at the end token, so its ids must be this tokenizer's, not OpenAI's.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": CLIPSEG_RESOLUTION,
        "patch_size": CLIPSEG_PATCH,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=16,
        extract_layers=(1, 2, 3),  # three layers, as CIDAS's (3, 6, 9) of twelve
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        use_complex_transposed_convolution=True,  # what makes CIDAS's model "refined"
    )
    image_processor = ViTImageProcessor(
        size={"height": CLIPSEG_RESOLUTION, "width": CLIPSEG_RESOLUTION},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return CLIPSegForImageSegmentation(config), CLIPSegProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    )


@functools.cache
def _built(kind: str, seed: int) -> tuple[Any, Any]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _clipseg()
    return model.eval(), processor


def build_tiny_segmenter(kind: str, *, seed: int = 0) -> tuple[Any, Any]:
    """Build a tiny segmenter and its processor in memory (bit-identical for the same seed).

    Args:
        kind: one of `TINY_SEGMENTERS`.
        seed: seed for the weight initialisation; the global torch RNG is left as it was.

    Returns:
        `(model, processor)`, the model a copy of its own in eval mode, fp32 on the CPU.
    """
    if kind not in TINY_SEGMENTERS:
        raise NbkitError(
            f"Unknown tiny segmenter {kind!r}.", fix=f"Use one of: {', '.join(TINY_SEGMENTERS)}."
        )
    model, processor = _built(kind, seed)
    return copy.deepcopy(model), processor


def save_tiny_segmenter(kind: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny segmenter and save it, with its processor, as an ordinary transformers folder.

    Args:
        kind: one of `TINY_SEGMENTERS`.
        out_dir: new, empty or earlier saved model folder; replaced atomically.
        seed: seed for the weight initialisation.

    Returns:
        `out_dir` as a Path.
    """
    # Imported here: it brings in every model family, which masking never needs.
    from nbkit.models.tiny import check_replaceable

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    model, processor = build_tiny_segmenter(kind, seed=seed)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        processor.save_pretrained(temporary)
    return out_dir
