"""ImageNet-1k labels -> a short class noun for the class prompt ("dog", "cat", "person", "car", ...).

ImageNet has 118 dog breeds and no "person" class, so a photo of someone is usually labelled by what
they wear ("suit", "wig", "jersey"). Ranges of label indices cover the big families (valid only for a
1000-label ImageNet head); names cover the rest and any label set whose names already are nouns.
"""

from __future__ import annotations

IMAGENET_CLASSES = 1000

# Inclusive ImageNet-1k index ranges.
NOUN_RANGES: tuple[tuple[int, int, str], ...] = (
    (0, 6, "fish"),
    (7, 8, "chicken"),
    (9, 24, "bird"),
    (52, 68, "snake"),
    (80, 100, "bird"),
    (127, 146, "bird"),
    (151, 268, "dog"),
    (269, 272, "wolf"),
    (277, 280, "fox"),
    (281, 285, "cat"),
    (294, 297, "bear"),
    (330, 332, "rabbit"),
)

# Noun -> label names (any of a label's comma-separated synonyms, lower case).
NOUN_NAMES: dict[str, tuple[str, ...]] = {
    "person": (
        "groom",
        "ballplayer",
        "scuba diver",
        "suit",
        "wig",
        "bow tie",
        "windsor tie",
        "lab coat",
        "jersey",
        "sweatshirt",
        "cardigan",
        "trench coat",
        "academic gown",
        "abaya",
        "gown",
        "bikini",
        "maillot",
        "miniskirt",
        "cowboy hat",
        "sombrero",
        "sunglasses",
        "sunglass",
        "bonnet",
        "lipstick",
        "military uniform",
        "kimono",
        "pajama",
        "poncho",
        "stole",
        "fur coat",
        "ski mask",
        "mask",
        "person",
        "man",
        "woman",
    ),
    "car": (
        "sports car",
        "convertible",
        "cab",
        "jeep",
        "limousine",
        "minivan",
        "racer",
        "beach wagon",
        "station wagon",
        "pickup",
        "model t",
        "police van",
        "car wheel",
        "grille",
        "car",
    ),
    "shoe": ("running shoe", "loafer", "sandal", "clog", "cowboy boot", "shoe"),
    "horse": ("sorrel", "horse"),
    "lion": ("lion",),
    "tiger": ("tiger",),
    "bicycle": ("mountain bike", "bicycle-built-for-two", "tricycle", "bicycle"),
    "motorcycle": ("moped", "motor scooter", "motorcycle"),
    "teddy bear": ("teddy", "teddy bear"),
    "bag": ("backpack", "purse", "mailbag", "bag"),
    "guitar": ("acoustic guitar", "electric guitar", "guitar"),
    "mug": ("coffee mug", "cup", "mug"),
    "watch": ("digital watch", "analog clock", "watch"),
    "dog": ("dog",),
    "cat": ("cat",),
}

_BY_NAME = {name: noun for noun, names in NOUN_NAMES.items() for name in names}


def label_names(label: str) -> list[str]:
    """The comma-separated synonyms of an ImageNet label, lower case ("tabby, tabby cat" -> 2 names).

    Args:
        label: a `config.id2label` value.
    """
    return [name.strip().lower() for name in label.split(",") if name.strip()]


def class_noun(label: str, index: int | None = None, num_labels: int | None = None) -> tuple[str, bool]:
    """Map a classifier label to a class noun.

    Args:
        label: the label text.
        index: its logit index; ranges apply only when `num_labels` is 1000 (ImageNet-1k).
        num_labels: the classifier's label count.

    Returns:
        `(noun, known)`: `known` is False when the table has no entry and the noun is the label's
        first name.
    """
    if index is not None and num_labels == IMAGENET_CLASSES:
        for first, last, noun in NOUN_RANGES:
            if first <= index <= last:
                return noun, True
    names = label_names(label)
    for name in names:
        if name in _BY_NAME:
            return _BY_NAME[name], True
    return (names[0] if names else label.strip()), False
