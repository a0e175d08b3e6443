"""Tiny random-weight image classifiers with real topologies, for offline tests of the vision tools.

`vit` has the layout of google/vit-base-patch16-224 and `mobilevit` that of apple/mobilevit-small, each
with a handful of labels and its image processor saved beside it, so that the ordinary
`AutoModelForImageClassification` / `AutoImageProcessor` loaders are the ones exercised.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory
from nbkit.models.tiny import check_replaceable

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedModel

TINY_CLASSIFIERS = ("vit", "mobilevit")

# Pixels the tiny classifiers take (224 and 256 in the real ones).
TINY_CLASSIFIER_RESOLUTION = {"vit": 32, "mobilevit": 64}

DEFAULT_LABELS = ("cat", "dog", "person")


def _vit(labels: Sequence[str]):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    size = TINY_CLASSIFIER_RESOLUTION["vit"]
    config = ViTConfig(
        image_size=size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ViTForImageClassification(config), processor


def _mobilevit(labels: Sequence[str]):
    import torch
    from transformers import MobileViTConfig, MobileViTForImageClassification, MobileViTImageProcessor

    size = TINY_CLASSIFIER_RESOLUTION["mobilevit"]
    config = MobileViTConfig(
        image_size=size,
        patch_size=2,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    # Like apple/mobilevit-small: resize the short side a little larger, centre-crop, BGR, no normalising.
    processor = MobileViTImageProcessor(
        do_resize=True,
        size={"shortest_edge": size * 9 // 8},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_flip_channel_order=True,
    )
    model = MobileViTForImageClassification(config)
    # transformers draws convolutions and BatchNorm scales around 0.02 (fine for fine-tuning); through
    # ~20 such layers a random model's features underflow to zero, so use PyTorch's own initialisation.
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            module.reset_parameters()
    return model, processor


def build_tiny_classifier(
    kind: str, *, seed: int = 0, labels: Sequence[str] = DEFAULT_LABELS
) -> tuple[PreTrainedModel, BaseImageProcessor]:
    """Build a tiny random-weight classifier and its image processor in memory.

    The same arguments give bit-identical weights; the global torch RNG is left as it was.

    Args:
        kind: one of `TINY_CLASSIFIERS`.
        seed: seed for the weight initialisation.
        labels: class names, in logit order.

    Returns:
        `(model, image_processor)`.
    """
    import torch

    if kind not in TINY_CLASSIFIERS:
        raise NbkitError(
            f"Unknown tiny classifier {kind!r}.", fix=f"Use one of: {', '.join(TINY_CLASSIFIERS)}."
        )
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise NbkitError(f"Classifier labels {labels!r} must be two or more distinct names.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _vit(labels) if kind == "vit" else _mobilevit(labels)
    return model.eval(), processor


def save_tiny_classifier(
    kind: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    labels: Sequence[str] = DEFAULT_LABELS,
) -> Path:
    """Build a tiny classifier and save it, with its image processor, as an ordinary transformers folder.

    Args:
        kind: one of `TINY_CLASSIFIERS`.
        out_dir: folder to save into, replaced atomically: new, empty or an earlier saved classifier.
            It gets config.json, model.safetensors and preprocessor_config.json.
        seed: seed for the weight initialisation.
        labels: class names, in logit order.

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    model, processor = build_tiny_classifier(kind, seed=seed, labels=labels)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
    return out_dir
