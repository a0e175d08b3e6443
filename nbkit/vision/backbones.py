"""The vision backbones nbkit uses and how they load.

Each registry entry is a hub id with a role: `classifier` (ImageNet-1k labels, for the class word),
`embedder` (image embeddings only), `dino` (self-supervised ViT, the DreamBooth paper's DINO metric)
or `clip` (image and text embeddings: CLIP-I and CLIP-T). A model loads from its hub id, a local
folder, or `tiny:<kind>` (the offline builders of `nbkit.vision.tiny`), always with transformers' Auto
classes and the model's own processor, safetensors only, fp16 on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from nbkit.device import default_device
from nbkit.errors import NbkitError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Args:
        source: hub id.
        role: `classifier`, `embedder`, `dino` or `clip`.
        note: what it is for, shown in `--help`.
    """

    source: str
    role: str
    note: str


BACKBONES: dict[str, BackboneSpec] = {
    spec.source: spec
    for spec in (
        BackboneSpec("google/vit-base-patch16-224", "classifier", "default classifier, ImageNet-1k, 224 px"),
        BackboneSpec("google/vit-large-patch16-384", "classifier", "accurate classifier, 384 px"),
        BackboneSpec("apple/mobilevit-small", "classifier", "fast classifier on CPU"),
        BackboneSpec(
            "amunchet/rorshark-vit-base", "embedder", "embeddings only: its labels are not ImageNet's"
        ),
        BackboneSpec("facebook/dino-vits16", "dino", "DINO ViT-S/16: subject fidelity (DreamBooth paper)"),
        BackboneSpec("openai/clip-vit-base-patch32", "clip", "CLIP-I and CLIP-T"),
    )
}
DEFAULT_CLASSIFIER = "google/vit-base-patch16-224"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_BATCH_SIZE = 16


def _role_of(config: Any, class_name: str | None = None) -> str:
    if config.model_type == "clip":
        return "clip"
    # An in-memory model has no `architectures` yet: its class says the same.
    architectures = [*(config.architectures or []), *([class_name] if class_name else [])]
    if any(name.endswith("ForImageClassification") for name in architectures):
        return "classifier"
    return "dino"


class Backbone:
    """A loaded vision model and its processor: `embed_images`, `classify`, `embed_texts`.

    Args:
        model: the transformers model (eval mode, on `device`).
        processor: its image processor (a `CLIPProcessor` for CLIP).
        name: the source it came from; part of the embedding cache key.
        role: see `BackboneSpec`.
        batch_size: images per forward pass.
    """

    def __init__(
        self, model: Any, processor: Any, *, name: str, role: str, batch_size: int = DEFAULT_BATCH_SIZE
    ):
        self.model = model
        self.processor = processor
        self.name = name
        self.role = role
        self.batch_size = batch_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def _pixels(self, images: Sequence[Image.Image]):
        processor = getattr(self.processor, "image_processor", self.processor)
        batch = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype)

    def embed_images(self, images: Sequence[Image.Image]):
        """Return `(N, D)` float32 CPU embeddings, L2-normalised: the pooled / [CLS] output.

        CLIP gives its projected image embedding; a ViT its [CLS] token after the final layer norm
        (DINO's own choice); MobileViT its globally pooled features.

        Args:
            images: PIL images, any size (the processor resizes them).
        """
        import torch

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self._pixels(images[start : start + self.batch_size])
                if self.role == "clip":
                    features = self.model.get_image_features(pixel_values=pixels)
                    features = getattr(features, "pooler_output", features)
                else:
                    base = getattr(self.model, self.model.base_model_prefix, self.model)
                    out = base(pixel_values=pixels)
                    if self.model.config.model_type == "mobilevit":
                        features = out.pooler_output
                    else:
                        features = out.last_hidden_state[:, 0]
                outputs.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        if not outputs:
            return torch.zeros(0, 0)
        return torch.cat(outputs)

    def embed_texts(self, texts: Sequence[str]):
        """Return `(N, D)` L2-normalised CLIP text embeddings (CLIP backbones only).

        Args:
            texts: prompts; truncated to the tokenizer's length.
        """
        import torch

        if self.role != "clip":
            raise NbkitError(f"{self.name} has no text side.", fix="Use a CLIP model for text embeddings.")
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_text_features(**tokens.to(self.device))
            features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def classify(
        self, images: Sequence[Image.Image], *, top_k: int = 3
    ) -> list[list[tuple[int, str, float]]]:
        """Return, per image, the `top_k` `(label index, label, probability)` of a classifier.

        Args:
            images: PIL images.
            top_k: how many labels per image.
        """
        import torch

        if self.role != "classifier":
            raise NbkitError(
                f"{self.name} is not an image classifier.",
                fix=f"Use one of: {', '.join(s for s, spec in BACKBONES.items() if spec.role == 'classifier')}.",
            )
        labels = self.model.config.id2label
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                logits = self.model(pixel_values=self._pixels(images[start : start + self.batch_size])).logits
                probs = logits.float().softmax(-1).cpu()
                values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
                for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
                    results.append(
                        [(i, str(labels[i]), v) for i, v in zip(row_indices, row_values, strict=True)]
                    )
        return results


def load_backbone(
    source: str | os.PathLike,
    *,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    local_files_only: bool | None = None,
) -> Backbone:
    """Load a backbone from a hub id, a local folder, or `tiny:<kind>`.

    Args:
        source: a `BACKBONES` id or any compatible hub id, a saved folder, or `tiny:vit|mobilevit|dino|clip`.
        device: `cuda`, `cpu`, ...; default: CUDA when available. On CUDA the weights are fp16.
        batch_size: images per forward pass.
        local_files_only: passed to `from_pretrained` (default: only when HF_HUB_OFFLINE is set).

    Returns:
        A `Backbone`.
    """
    import torch

    device = default_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    text = str(source)
    if text.startswith("tiny:"):
        from nbkit.vision.tiny import build_tiny_backbone

        model, processor = build_tiny_backbone(text.split(":", 1)[1])
        role = _role_of(model.config, type(model).__name__)
        return Backbone(
            model.to(device, dtype).eval(), processor, name=text, role=role, batch_size=batch_size
        )
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoProcessor,
    )

    folder = Path(text)
    if folder.exists() and not (folder / "config.json").is_file():
        raise NbkitError(
            "This folder holds no config.json, so it is not a saved transformers model.",
            path=folder,
            fix="Give the folder that save_pretrained wrote, or a hub id such as " + DEFAULT_CLASSIFIER + ".",
        )
    if local_files_only is None:
        local_files_only = bool(os.environ.get("HF_HUB_OFFLINE"))
    options = {"local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(text, **options)
    except OSError as error:
        raise NbkitError(
            f"Could not load the vision model {text!r}: {error}",
            fix="Check the hub id or folder; offline, download it first or give a local folder.",
        ) from error
    role = _role_of(config)
    spec = BACKBONES.get(text)
    if spec is not None and spec.role == "embedder":
        role = "embedder"
    loader = AutoModelForImageClassification if role in ("classifier", "embedder") else AutoModel
    model = loader.from_pretrained(text, use_safetensors=True, dtype=dtype, **options)
    processor = (AutoProcessor if role == "clip" else AutoImageProcessor).from_pretrained(text, **options)
    return Backbone(model.to(device).eval(), processor, name=text, role=role, batch_size=batch_size)
