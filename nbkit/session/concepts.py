"""Several concepts in one session: a person and their dog, a style and a subject.

A concept is a group of the session's photos with its own instance token (from its photos' file names
or the import's token), class word, class images and repeats, as kohya's dataset subsets and the
fast-DreamBooth notebooks' concept folders have. The first concept is named "" and needs no record:
its class word and class images are `training.prior`'s, as in a session with one concept, and its
repeats 1. Each further one is a `Concept` record in `session.json`, and its photos name it
(`ImageRecord.concept`). This module is the one place that puts those facts together; training,
scoring and the reports ask it.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from nbkit.errors import NbkitError, setting
from nbkit.session.manifest import Concept, Manifest

# A folder name on every filesystem Drive syncs to, and a word in a message.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
MAX_REPEATS = 100


@dataclasses.dataclass(frozen=True)
class ConceptView:
    """One concept as training and scoring see it.

    Args:
        name: "" for the session's first concept, else its record's name.
        token: its instance token: the most common among its photos ("" when they have none).
        class_prompt: its class word or prompt ("" for none).
        class_images: class images for prior preservation (0: none).
        repeats: draws of each photo per epoch.
        images: indices of its photos in `manifest.images`.
    """

    name: str
    token: str
    class_prompt: str
    class_images: int
    repeats: int
    images: tuple[int, ...]

    @property
    def label(self) -> str:
        """How messages name it: its name, or "first" for the unnamed one."""
        return self.name or "first"


def check_name(name: str) -> str:
    """`name` as a concept name (lower case), or a `ValueError`-style refusal naming the rule.

    Args:
        name: what the user typed ("" is the first concept).
    """
    name = name.strip().lower()
    if name and not NAME.fullmatch(name):
        raise NbkitError(
            f"{name!r} is not a concept name",
            fix="use up to 32 letters, digits, '-' or '_', starting with a letter or digit (e.g. 'dog')",
        )
    return name


def concepts(manifest: Manifest) -> list[ConceptView]:
    """The session's concepts, the first ("") first and then in the order they were added; a concept
    without photos is listed too (its photos may come later)."""
    members: dict[str, list[int]] = collections.defaultdict(list)
    for index, record in enumerate(manifest.images):
        members[record.concept].append(index)
    prior = manifest.training.prior
    views = [
        ConceptView(
            "", _token(manifest, members[""]), prior.class_prompt, prior.num_images, 1, tuple(members[""])
        )
    ]
    for concept in manifest.concepts:
        indices = tuple(members[concept.name])
        views.append(
            ConceptView(
                concept.name,
                _token(manifest, indices),
                concept.class_prompt,
                concept.class_images,
                concept.repeats,
                indices,
            )
        )
    return views


def _token(manifest: Manifest, indices) -> str:
    counts = collections.Counter(manifest.images[i].token for i in indices if manifest.images[i].token)
    return counts.most_common(1)[0][0] if counts else ""


def concept_of(manifest: Manifest, name: str) -> ConceptView:
    """The concept called `name`, or a refusal listing the session's concepts."""
    name = check_name(name)
    for view in concepts(manifest):
        if view.name == name:
            return view
    known = ", ".join(repr(view.name) for view in concepts(manifest))
    raise NbkitError(
        f"the session has no concept {name!r} (it has {known})",
        fix=f"import its photos first, with {setting('concept', name or 'NAME')}",
    )


def set_concept(
    manifest: Manifest,
    name: str,
    *,
    class_word: str | None = None,
    class_images: int | None = None,
    repeats: int | None = None,
) -> ConceptView:
    """Create the concept `name` or change its settings (None keeps a setting); the caller saves.

    The first concept's class word and class images are the prior preservation settings; its repeats
    stay 1 (give the others more, or fewer, relative to it).

    Args:
        manifest: the session's manifest.
        name: the concept ("" for the first).
        class_word: its class word or prompt ("dog"), what its class images are made of.
        class_images: class images to make of it for prior preservation (0: none).
        repeats: draws of each of its photos per epoch, 1 to 100.
    """
    name = check_name(name)
    if class_images is not None and class_images < 0:
        raise NbkitError(f"class_images is {class_images}", fix="use 0 (none) or more")
    if repeats is not None and not 1 <= repeats <= MAX_REPEATS:
        raise NbkitError(
            f"repeats is {repeats}",
            fix=f"use {setting('repeats', 'N')} with N a whole number from 1 to {MAX_REPEATS}",
        )
    if not name:
        if repeats not in (None, 1):
            raise NbkitError(
                f"the first concept's repeats are 1 (asked: {repeats})",
                fix="give the other concepts more (or fewer) repeats relative to it, or leave it at "
                + setting("repeats", "1"),
            )
        prior = manifest.training.prior
        prior = prior.replace(
            class_prompt=prior.class_prompt if class_word is None else class_word.strip(),
            num_images=prior.num_images if class_images is None else class_images,
        )
        manifest.training = manifest.training.replace(prior=prior.to_dict())
        return concept_of(manifest, name)
    record = next((concept for concept in manifest.concepts if concept.name == name), None)
    changes = {
        key: value
        for key, value in (
            ("class_prompt", None if class_word is None else class_word.strip()),
            ("class_images", class_images),
            ("repeats", repeats),
        )
        if value is not None
    }
    if record is None:
        manifest.concepts.append(Concept(name=name, **changes))
    else:
        manifest.concepts = [
            dataclasses.replace(concept, **changes) if concept is record else concept
            for concept in manifest.concepts
        ]
    return concept_of(manifest, name)


def check_concepts(manifest: Manifest) -> None:
    """Refuse what cannot train: a photo of an unknown concept, class images without a class word.

    Args:
        manifest: the session's manifest.
    """
    known = {""} | {concept.name for concept in manifest.concepts}
    for record in manifest.images:
        if record.concept not in known:
            raise NbkitError(
                f"the photo {record.file} is of concept {record.concept!r}, which session.json does not list",
                fix=f"import it again with {setting('concept', record.concept)}, or remove it from the session",
            )
    for view in concepts(manifest)[1:]:
        if view.class_images and not view.class_prompt:
            raise NbkitError(
                f"concept {view.label!r} asks for {view.class_images} class images but has no class word",
                fix=f"give it one ({setting('class_word', 'dog')} for concept {view.name!r}), or "
                + setting("class_images", "0"),
            )


def repeats_per_image(manifest: Manifest) -> list[int]:
    """How often each photo of `manifest.images` is drawn per epoch (its concept's repeats)."""
    by_name = {view.name: view.repeats for view in concepts(manifest)}
    return [by_name.get(record.concept, 1) for record in manifest.images]


def concept_for_prompt(views: list[ConceptView], prompt: str) -> ConceptView | None:
    """The concept whose instance token a prompt names (as a word); None when it names none or several
    tokens of different concepts."""
    text = prompt.lower()
    named = [
        view
        for view in views
        if view.token and re.search(rf"(?<![\w-]){re.escape(view.token.lower())}(?![\w-])", text)
    ]
    return named[0] if len(named) == 1 else None


def concept_settings(manifest: Manifest) -> list[dict]:
    """The further concepts' settings, as a checkpoint records them: a resume must keep them (their
    repeats and class images decide what each step draws)."""
    return [concept.to_dict() for concept in manifest.concepts]


def concept_prompts(manifest: Manifest) -> list[str]:
    """A sample prompt per concept with photos: the caption of its first captioned photo."""
    prompts = []
    for view in concepts(manifest):
        caption = next((manifest.images[i].caption for i in view.images if manifest.images[i].caption), "")
        if caption:
            prompts.append(caption)
    return prompts
