"""A caption for an image from CLIP alone (A1111's "Interrogate CLIP", without its BLIP captioner).

A1111 captions with BLIP, then appends the artist, medium, movement and "flavors" CLIP ranks highest
from its word lists. nbkit has no captioning model: CLIP ranks phrases of a vocabulary shipped here
(subjects, mediums, movements and flavors), and the caption is the best subject, the best medium and
movement, then the flavors that score well, in A1111's comma-separated form:
`a dog, a photograph, realism, highly detailed, soft lighting`.

The CLIP model is the vision checks' (`NBKIT_VISION_CLIP`, default the registry's CLIP ViT-B/32); the
phrases' text embeddings are computed once per model.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

SUBJECTS = (
    "a man", "a woman", "a boy", "a girl", "a child", "a baby", "an old man", "an old woman",
    "a group of people", "a couple", "a crowd", "a soldier", "a knight", "a robot", "a dog", "a cat",
    "a puppy", "a kitten", "a bird", "a horse", "a cow", "a fish", "a lion", "a tiger", "a bear",
    "a wolf", "a fox", "a rabbit", "an owl", "a dragon", "a monster", "a car", "a truck", "a bicycle",
    "a motorcycle", "a train", "an airplane", "a boat", "a ship", "a house", "a castle", "a building",
    "a city", "a street", "a bridge", "a room", "a kitchen", "a garden", "a forest", "a tree",
    "flowers", "a field", "mountains", "a river", "a lake", "the sea", "a beach", "the sky",
    "clouds", "a sunset", "the night sky", "a desert", "snow", "food", "a cake", "a cup of coffee",
    "a table", "a chair", "a book", "a guitar", "a sword", "a flower", "a fruit", "a face",
    "a pattern", "text", "a logo", "a map",
)  # fmt: skip
MEDIUMS = (
    "a photograph", "a close-up photograph", "a black and white photograph", "a polaroid photo",
    "a painting", "an oil painting", "a watercolor painting", "an acrylic painting", "a digital painting",
    "a drawing", "a pencil sketch", "a charcoal drawing", "an ink drawing", "an illustration",
    "a cartoon", "an anime drawing", "a comic book panel", "a 3D render", "pixel art", "a poster",
    "a sculpture", "a screenshot", "concept art", "a stained glass window", "an engraving",
)  # fmt: skip
MOVEMENTS = (
    "realism", "photorealism", "impressionism", "expressionism", "surrealism", "cubism", "pop art",
    "art nouveau", "art deco", "baroque", "renaissance", "romanticism", "minimalism", "abstract art",
    "ukiyo-e", "fantasy art", "cyberpunk", "steampunk", "vaporwave", "gothic art", "folk art",
    "street art", "pointillism", "academic art",
)  # fmt: skip
FLAVORS = (
    "highly detailed", "sharp focus", "soft focus", "bokeh", "soft lighting", "dramatic lighting",
    "studio lighting", "natural light", "cinematic", "golden hour", "at night", "backlit", "colorful",
    "vibrant colors", "pastel colors", "muted colors", "monochrome", "sepia", "high contrast", "dark",
    "bright", "vintage", "retro", "futuristic", "wide angle", "macro", "aerial view", "symmetrical",
    "minimalist", "intricate", "beautiful", "cute", "moody", "foggy", "rainy", "sunny", "snowy",
    "trending on artstation", "award winning", "8k", "film grain", "depth of field", "hdr",
)  # fmt: skip
FLAVOR_COUNT = 3  # A1111 appends its best flavors; three keep a caption prompt-sized
MODELS = ("clip",)  # the interrogation models nbkit has (A1111 also has `deepdanbooru`)


class Interrogator:
    """Captions images with a CLIP backbone.

    Args:
        backbone: a `nbkit.vision.backbones.Backbone` with the `clip` role.
        flavors: how many flavors a caption ends with.
    """

    def __init__(self, backbone: Any, *, flavors: int = FLAVOR_COUNT):
        if backbone.role != "clip":
            raise ValueError(
                f"the interrogator needs a CLIP backbone, got {backbone.name!r} ({backbone.role})"
            )
        self.backbone = backbone
        self.flavors = flavors
        self._phrases: dict[str, Any] = {}

    def _embedded(self, kind: str, phrases: tuple[str, ...]) -> Any:
        if kind not in self._phrases:
            texts = [f"a picture of {phrase}" for phrase in phrases] if kind == "subject" else list(phrases)
            self._phrases[kind] = self.backbone.embed_texts(texts)
        return self._phrases[kind]

    def caption(self, image: Image.Image) -> str:
        """The caption: subject, medium, movement and the best flavors, comma-separated."""
        picture = self.backbone.embed_images([image.convert("RGB")])[0]
        parts = []
        for kind, phrases, count in (
            ("subject", SUBJECTS, 1),
            ("medium", MEDIUMS, 1),
            ("movement", MOVEMENTS, 1),
            ("flavor", FLAVORS, self.flavors),
        ):
            scores = self._embedded(kind, phrases) @ picture
            best = scores.topk(min(count, len(phrases))).indices.tolist()
            parts += [phrases[index] for index in best]
        return ", ".join(parts)


def load_interrogator(source: str | None = None, *, device: str | None = None) -> Interrogator:
    """The CLIP interrogator on `source` (default: `NBKIT_VISION_CLIP`, else the registry's CLIP).

    Args:
        source: a hub id, a saved folder or `tiny:clip`.
        device: `cuda` or `cpu` (default: CUDA when available).
    """
    from nbkit.vision.backbones import DEFAULT_CLIP, load_backbone
    from nbkit.vision.scoring import CLIP_ENV

    name = source or os.environ.get(CLIP_ENV) or DEFAULT_CLIP
    if name == "none":
        name = DEFAULT_CLIP
    return Interrogator(load_backbone(name, device=device))
