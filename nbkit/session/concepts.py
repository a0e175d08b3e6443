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
from nbkit.session.settings import PriorPreservation, TrainConfig

# A folder name on every filesystem Drive syncs to, and a word in a message.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
FIRST = "first"  # how listings and messages name the first concept, whose name is ""
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
        return self.name or FIRST


def check_name(name: str) -> str:
    """`name` as a concept name (lower case), or a `ValueError`-style refusal naming the rule.

    Args:
        name: what the user typed ("" is the first concept, and so is `first`, as listings call it).
    """
    name = name.strip().lower()
    if name == FIRST:
        return ""
    if name and not NAME.fullmatch(name):
        raise NbkitError(
            f"{name!r} is not a concept name",
            fix="use up to 32 letters, digits, '-' or '_', starting with a letter or digit (e.g. 'dog')",
        )
    return name


def concepts(manifest: Manifest, prior: PriorPreservation | None = None) -> list[ConceptView]:
    """The session's concepts, the first ("") first and then in the order they were added; a concept
    without photos is listed too (its photos may come later).

    Args:
        manifest: the session's manifest.
        prior: the run's prior preservation settings, the first concept's class word and images
            (default: the session's).
    """
    members: dict[str, list[int]] = collections.defaultdict(list)
    for index, record in enumerate(manifest.images):
        members[record.concept].append(index)
    prior = prior or manifest.training.prior
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
    Class images need a class word to be made of.

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
        _need_class_word(name, prior.class_prompt, prior.num_images)
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
    changed = Concept(name=name, **changes) if record is None else dataclasses.replace(record, **changes)
    _need_class_word(name, changed.class_prompt, changed.class_images)
    if record is None:
        manifest.concepts.append(changed)
    else:
        manifest.concepts = [changed if concept is record else concept for concept in manifest.concepts]
    return concept_of(manifest, name)


def _need_class_word(name: str, class_prompt: str, class_images: int) -> None:
    if class_images and not class_prompt.strip():
        raise NbkitError(
            f"concept {name or FIRST!r} asks for {class_images} class images but has no class word to make "
            "them of",
            fix=f"give it one ({setting('class_word', 'dog')}), or {setting('class_images', '0')}",
        )


def remove_concept(manifest: Manifest, name: str) -> None:
    """Remove the record of concept `name`, which must have no photos left; the caller saves.

    Args:
        manifest: the session's manifest.
        name: a further concept (the first one cannot be removed).
    """
    view = concept_of(manifest, name)
    if not view.name:
        raise NbkitError("the first concept cannot be removed", fix="remove its photos instead")
    if view.images:
        raise NbkitError(
            f"concept {view.name!r} still has {len(view.images)} photo(s)",
            fix="remove them first (`nbkit images remove SESSION FILE ...`), then the concept",
        )
    manifest.concepts = [concept for concept in manifest.concepts if concept.name != view.name]


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
    views = [view for view in concepts(manifest) if view.images]
    for view in views:
        if view.name:  # the first concept's class word is prior preservation's, checked with the config
            _need_class_word(view.name, view.class_prompt, view.class_images)
    tokens: dict[str, str] = {}
    for view in views:
        other = tokens.setdefault(view.token.lower(), view.label)
        if view.token and other != view.label:
            raise NbkitError(
                f"concepts {other!r} and {view.label!r} share the instance token {view.token!r}, so "
                "prompts cannot call up one without the other",
                fix=f"remove concept {view.label!r}'s photos and import them again with another token "
                f"({setting('token', 'qrt')}, a rare word), or named after it (`qrt (1).jpg`)",
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


def concept_settings(manifest: Manifest) -> dict[str, dict]:
    """The further concepts' settings that decide what each step draws (their repeats and class
    images), by name, as a checkpoint records them: a resume must keep them. Concepts without photos
    train nothing and are left out, and so is the class word of a concept without class images."""
    return {
        view.name: {
            "repeats": view.repeats,
            "class_images": view.class_images,
            **({"class_prompt": view.class_prompt} if view.class_images else {}),
        }
        for view in concepts(manifest)[1:]
        if view.images
    }


def counting_class_images(manifest: Manifest, config: TrainConfig) -> TrainConfig:
    """`config` as GPU memory figures and advice should see it: with prior preservation on when any
    concept with photos has class images (each step then draws a class batch as well)."""
    if config.prior.num_images or not any(
        view.class_images for view in concepts(manifest)[1:] if view.images
    ):
        return config
    return config.replace(prior=config.prior.replace(num_images=1).to_dict())


def concept_prompts(manifest: Manifest) -> list[str]:
    """A sample prompt per concept with photos: the caption of its first captioned photo."""
    prompts = []
    for view in concepts(manifest):
        caption = next((manifest.images[i].caption for i in view.images if manifest.images[i].caption), "")
        if caption:
            prompts.append(caption)
    return prompts
