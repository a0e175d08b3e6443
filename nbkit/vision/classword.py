"""Suggest the class word and class prompt from the instance photos, by a vote of a classifier.

Each photo's top labels are mapped to class nouns (`nbkit.vision.labels`) and their probabilities
summed per noun; the photo votes for its strongest noun. Nothing changes until the user accepts:
`apply_suggestion` writes the class prompt into the training config.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.vision.labels import class_noun


@dataclasses.dataclass
class ImageVote:
    """One photo's vote: `noun`, its summed probability, and the labels it came from."""

    file: str
    noun: str
    score: float
    labels: list[tuple[str, float]]


@dataclasses.dataclass
class ClassSuggestion:
    """The suggested class word, its class prompt, and the votes behind it."""

    class_word: str
    class_prompt: str
    votes: dict[str, int]
    images: list[ImageVote]

    def __str__(self) -> str:
        total = sum(self.votes.values())
        lines = [
            f"suggested class word: {self.class_word!r} ({self.votes[self.class_word]} of {total} photos)"
        ]
        lines.append(f"suggested class prompt: {self.class_prompt!r}")
        lines.append("votes: " + ", ".join(f"{noun} {count}" for noun, count in self.votes.items()))
        for vote in self.images:
            shown = ", ".join(f"{label} {probability:.2f}" for label, probability in vote.labels)
            lines.append(f"  {vote.file}: {vote.noun} ({vote.score:.2f}; {shown})")
        return "\n".join(lines)


def class_prompt_for(word: str) -> str:
    """The class prompt fast-DreamBooth users write for a class word ("photo of a dog").

    Args:
        word: the class noun.
    """
    article = "an" if word[:1].lower() in "aeiou" else "a"
    return f"photo of {article} {word}"


def suggest_class_word(
    backbone, images: Sequence[Image.Image], files: Sequence[str], *, top_k: int = 5
) -> ClassSuggestion:
    """Classify the photos and vote on a class word.

    Args:
        backbone: a classifier `Backbone`.
        images: the instance photos.
        files: a name per photo, for the report.
        top_k: labels per photo that count towards its vote.
    """
    if not images:
        raise NbkitError(
            "The session has no instance images to classify.", fix="Add photos with `nbkit images add`."
        )
    num_labels = len(backbone.model.config.id2label)
    votes: list[ImageVote] = []
    for file, ranked in zip(files, backbone.classify(images, top_k=top_k), strict=True):
        per_noun: dict[str, float] = collections.defaultdict(float)
        for index, label, probability in ranked:
            per_noun[class_noun(label, index, num_labels)[0]] += probability
        noun = max(per_noun, key=lambda key: (per_noun[key], key))
        votes.append(ImageVote(file, noun, per_noun[noun], [(label, p) for _, label, p in ranked]))
    counts = collections.Counter(vote.noun for vote in votes)
    strength = collections.defaultdict(float)
    for vote in votes:
        strength[vote.noun] += vote.score
    ordered = sorted(counts, key=lambda noun: (-counts[noun], -strength[noun], noun))
    word = ordered[0]
    return ClassSuggestion(word, class_prompt_for(word), {noun: counts[noun] for noun in ordered}, votes)


def apply_suggestion(session, suggestion: ClassSuggestion | str) -> str:
    """Write an accepted class prompt into the session's training config (`training.prior.class_prompt`).

    Args:
        session: an open `nbkit.session.core.Session`; saved.
        suggestion: the accepted `ClassSuggestion`, or a class prompt the user edited.

    Returns:
        The class prompt now in the config.
    """
    prompt = suggestion.class_prompt if isinstance(suggestion, ClassSuggestion) else str(suggestion).strip()
    if not prompt:
        raise NbkitError(
            "The class prompt is empty.", fix="Accept a suggestion or type a prompt such as 'photo of a dog'."
        )
    training = session.manifest.training
    session.manifest.training = training.replace(prior=training.prior.replace(class_prompt=prompt).to_dict())
    session.save()
    return prompt
