"""Automatic captions for a session's instance images, from Florence-2 or BLIP.

    from nbkit.images import auto_caption
    report = auto_caption(session, model="florence2")   # or "blip", a hub id, a folder, "tiny:blip"

The captioner is Florence-2 (`florence2`: florence-community/Florence-2-base, the conversion that
transformers' own `Florence2ForConditionalGeneration` loads; its `<DETAILED_CAPTION>` task) or BLIP
(`blip`: Salesforce/blip-image-captioning-large), from the hub, from a folder `save_pretrained` wrote,
or `tiny:florence2` / `tiny:blip`, random-weight models built offline for tests. It runs batched, fp16
on a GPU and fp32 on the CPU, with beam search and no sampling, so the same photo always gets the same
caption.

Training needs the subject's words in every caption, so each one gets the image's instance token and
the session's class word (the last word of `training.prior.class_prompt`) by `insert_subject`: the
first mention of the class ("a dog on a beach", or a synonym such as "man" for `person`, or a plural)
becomes "a zwx dog on a beach"; a caption that never mentions it starts with "zwx dog, ".

Hand-written captions are kept unless `overwrite`: session.json records where each caption came from
(`caption_source`), and one from a .txt file or the editor that is more than the file-name token is a
person's. Editing an automatic caption (`auto`, its model in `caption_model`) makes it hand-written.
An automatic caption from the same model that already holds the subject is kept too, so running the
notebook again does not load the model for nothing.

Loading is shared with the subject masks (`nbkit.images.automask`): a `ModelTask` names a task's models,
`resolve_model` turns a name, hub id, folder or `tiny:<kind>` into a source with a did-you-mean for a
typo, and `load_task_model` loads it, fp16 on a GPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from PIL import Image

from nbkit.device import default_device, free_memory
from nbkit.errors import NbkitError
from nbkit.images._tiny_captioners import TINY_CAPTIONERS, TINY_MAX_NEW_TOKENS, build_tiny_captioner
from nbkit.images.captions import caption_warnings, normalise_caption, write_caption_file
from nbkit.images.report import ImageReport
from nbkit.session.concepts import concept_of, concepts

if TYPE_CHECKING:
    from nbkit.session.core import Session
    from nbkit.session.manifest import ImageRecord

CAPTIONERS: dict[str, str] = {
    "florence2": "florence-community/Florence-2-base",
    "blip": "Salesforce/blip-image-captioning-large",
}
DEFAULT_CAPTIONER = "florence2"
TINY_PREFIX = "tiny:"
FLORENCE2_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
# Two or three sentences: the detail a caption can add, within the ~75 tokens CLIP reads.
FLORENCE2_TASK = "<DETAILED_CAPTION>"
DEFAULT_BATCH_SIZE = 8
MAX_NEW_TOKENS = 77
NUM_BEAMS = 3  # Florence-2's documented setting; fixed, with no sampling, so captions repeat exactly
RUN_KIND = "captions"  # the history entry of a run of the captioner

# Other words a captioner uses for a class word's subject. Plurals are added by `class_nouns`.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "gentleman", "human"),
    "man": ("person", "guy", "gentleman", "male"),
    "woman": ("person", "lady", "female"),
    "boy": ("child", "kid", "person"),
    "girl": ("child", "kid", "person"),
    "child": ("kid", "boy", "girl", "toddler", "baby"),
    "baby": ("infant", "toddler", "child"),
    "dog": ("puppy", "pup", "doggy"),
    "puppy": ("dog", "pup"),
    "cat": ("kitten", "kitty"),
    "kitten": ("cat", "kitty"),
    "horse": ("pony",),
    "car": ("vehicle", "automobile"),
    "toy": ("doll", "figurine", "plush toy", "stuffed animal"),
}
_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "gentleman": "gentlemen",
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
}
# How Florence-2 and BLIP open a caption, and BLIP-large's habit of inventing "arafed".
_PREAMBLE = re.compile(
    r"^(?:(?:the|this) (?:image|picture|photo(?:graph)?) (?:shows|depicts|features|is of|is)"
    r"|in (?:this|the) (?:image|picture|photo(?:graph)?),? (?:we can see|i can see|there is|there are)"
    r"|(?:this is|it is|there is) (?:an? )?(?:image|picture|photo(?:graph)?) of)\s+",
    re.IGNORECASE,
)
_FILLER = re.compile(r"(?<![\w-])ara+f+(?:e|ed|ly)?(?![\w-])\s*", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------- the subject's words


@functools.lru_cache(maxsize=64)
def class_nouns(class_word: str) -> tuple[str, ...]:
    """The words that name the subject's class in a caption: the class word, its synonyms
    (`CLASS_SYNONYMS`), and the plurals of both, longest first.

    Args:
        class_word: the session's class word (`dog`, `person`); "" gives none.
    """
    word = " ".join(class_word.lower().split())
    if not word:
        return ()
    words = (word, *CLASS_SYNONYMS.get(word, ()))
    forms = dict.fromkeys(form for name in words for form in (name, _plural(name)))
    return tuple(sorted(forms, key=len, reverse=True))


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


@functools.lru_cache(maxsize=256)
def _words(phrases: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(r"\s+".join(map(re.escape, phrase.split())) for phrase in phrases)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def subject_phrase(token: str, class_word: str = "") -> str:
    """What names the subject in a caption: `zwx dog`; the token alone when there is no class word or
    the token already ends with it (`my dog`).

    Args:
        token: the instance token.
        class_word: the class word.
    """
    token, class_word = " ".join(token.split()), " ".join(class_word.split())
    if not class_word or token.casefold().endswith(class_word.casefold()):
        return token
    return f"{token} {class_word}"


def insert_subject(text: str, token: str, class_word: str = "") -> str:
    """Put the subject's words into a caption, changing nothing else.

    The first mention of the token becomes `<token> <class>`; without one, the first mention of the
    class (`class_nouns`); without either, the caption starts with `<token> <class>, `. A caption that
    already holds `<token> <class>` is returned as it is, so inserting twice changes nothing.

    Args:
        text: the captioner's caption.
        token: the image's instance token ("" leaves the caption alone).
        class_word: the session's class word ("" puts in the token only).

    Example: `insert_subject("a dog on a beach", "zwx", "dog")` is `"a zwx dog on a beach"`.
    """
    if not token.strip():
        return text
    subject = subject_phrase(token, class_word)
    if _words((subject,)).search(text):
        return text
    nouns = class_nouns(class_word)
    match = _words((token,)).search(text) or (_words(nouns).search(text) if nouns else None)
    if match is not None:
        return text[: match.start()] + subject + text[match.end() :]
    return f"{subject}, {text}" if text else subject


def clean_caption(text: str) -> str:
    """A captioner's text as a training caption: one line, without "The image shows" and the like,
    BLIP's invented "arafed", or a final full stop.

    Args:
        text: what the captioner wrote.
    """
    text = normalise_caption(_FILLER.sub("", text))
    text = _PREAMBLE.sub("", text, count=1)
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


def session_class_word(session: Session, concept: str = "") -> str:
    """A concept's class word: the last word of its class prompt ("photo of a dog" -> "dog"), or "".

    Args:
        session: the session.
        concept: the concept ("": the session's first, whose class prompt is prior preservation's).
    """
    prompt = concept_of(session.manifest, concept).class_prompt.split(",")[0].split()
    return prompt[-1] if prompt else ""


# ---------------------------------------------------------------- loading image models


@dataclasses.dataclass(frozen=True)
class ModelTask:
    """What one task's models (captioning, subject masks) are called in messages, which names and
    transformers classes it knows, and how its `tiny:<kind>` models are built.

    Args:
        what: a model of the task in words (`captioning model`).
        role: the same in one word (`captioner`).
        names: short name -> hub id (`florence2` -> florence-community/Florence-2-base).
        tiny: the kinds `tiny:<kind>` builds.
        classes: `config.model_type` -> the transformers class that loads it.
        described: what a saved folder holds (`a Florence-2 or BLIP model`).
        native: the fix when a model is of no type in `classes`.
        build_tiny: `kind` -> `(model, processor)` of a tiny model, fp32 on the CPU.
        use_safetensors: passed to `from_pretrained` (None: safetensors, else the repository's
            PyTorch weights).
    """

    what: str
    role: str
    names: dict[str, str]
    tiny: tuple[str, ...]
    classes: dict[str, str]
    described: str
    native: str
    build_tiny: Callable[[str], tuple[Any, Any]]
    use_safetensors: bool | None = True


CAPTIONING = ModelTask(
    what="captioning model",
    role="captioner",
    names=CAPTIONERS,
    tiny=TINY_CAPTIONERS,
    classes={"florence2": "Florence2ForConditionalGeneration", "blip": "BlipForConditionalGeneration"},
    described="a Florence-2 or BLIP model",
    native=f"use a Florence-2 that transformers loads itself ({CAPTIONERS['florence2']}) or a BLIP captioner",
    build_tiny=build_tiny_captioner,
)


def resolve_model(model: str, task: ModelTask) -> str:
    """What `model` loads from: a known name's hub id, a hub id, a model folder, or `tiny:<kind>`.

    Args:
        model: a name of `task.names` in any spelling (`Florence-2`), `tiny:<kind>`, a hub id
            (`owner/name`) or a folder.
        task: the task whose names and messages apply.
    """
    text = str(model).strip()
    key = re.sub(r"[\s_-]", "", text.lower())
    if key in task.names:
        return task.names[key]
    if key.startswith(TINY_PREFIX) and key.removeprefix(TINY_PREFIX) in task.tiny:
        return key
    path = Path(text).expanduser()
    if text and path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise NbkitError(
                f"this holds no config.json, so it is not a saved {task.what}",
                path=path,
                fix=f"give the folder save_pretrained wrote for {task.described} (config.json, "
                f"weights and processor files), or a name: {', '.join(task.names)}",
            )
        return str(path)
    if _HUB_ID.fullmatch(text):
        return text
    if text.startswith((".", "~", "/")) or "/" in text or "\\" in text:
        raise NbkitError(
            "no such folder", path=path, fix=f"give the folder of a saved {task.what}, or a hub id"
        )
    names = [*task.names, *(TINY_PREFIX + kind for kind in task.tiny)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    raise NbkitError(
        f"unknown {task.what} {text!r}",
        fix=(f"did you mean {close[0]}? " if close else "")
        + f"use {', '.join(names)}, a hub id (owner/name) or a folder saved with save_pretrained",
    )


def load_task_model(
    source: str, task: ModelTask, *, device: str | None = None, local_files_only: bool | None = None
) -> tuple[Any, Any, str]:
    """Load a resolved model (`resolve_model`) and its processor.

    Args:
        source: a hub id, a folder or `tiny:<kind>`.
        task: the task it is a model of.
        device: `cuda`, `cpu`, ...; default: CUDA when available. On CUDA the weights are fp16.
        local_files_only: passed to `from_pretrained` (default: only when HF_HUB_OFFLINE is set).

    Returns:
        `(model, processor, kind)`: the model in eval mode on `device`, and its `config.model_type`
        (the tiny kind for `tiny:<kind>`).
    """
    import torch

    device = default_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if source.startswith(TINY_PREFIX):
        kind = source.removeprefix(TINY_PREFIX)
        loaded, processor = task.build_tiny(kind)
        loaded = loaded.to(device, dtype)
    else:
        loaded, processor, kind = _from_pretrained(source, task, dtype, local_files_only)
        loaded = loaded.to(device)
    return loaded.eval(), processor, kind


def _from_pretrained(
    source: str, task: ModelTask, dtype: Any, local_files_only: bool | None
) -> tuple[Any, Any, str]:
    import huggingface_hub
    import transformers

    if local_files_only is None:
        local_files_only = huggingface_hub.constants.HF_HUB_OFFLINE
    options = {"local_files_only": local_files_only}
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(source, **options)
        except ValueError as error:  # a config.json without a model type transformers knows
            raise NbkitError(
                f"{source} is not a model transformers knows ({error})", fix=task.native
            ) from error
        if config.model_type not in task.classes:
            raise NbkitError(
                f"{source} is a {config.model_type} model, not a {task.role} nbkit runs", fix=task.native
            )
        try:
            model = getattr(transformers, task.classes[config.model_type]).from_pretrained(
                source, dtype=dtype, use_safetensors=task.use_safetensors, **options
            )
            processor = transformers.AutoProcessor.from_pretrained(source, **options)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            # microsoft/Florence-2-* ship their own modelling code (`auto_map`), in another layout.
            if not getattr(config, "auto_map", None):
                raise
            raise NbkitError(
                f"{source} is laid out for its own remote code, which nbkit does not run ({error})",
                fix=task.native,
            ) from error
    except OSError as error:
        if Path(source).is_dir():
            raise NbkitError(
                f"the {task.what} in this folder is incomplete: {str(error).splitlines()[0]}",
                path=source,
                fix="save it again with save_pretrained (config.json, model.safetensors, processor files)",
            ) from error
        # transformers' message is a paragraph about connections; its first line says what happened.
        where = "HF_HUB_OFFLINE is set" if local_files_only else f"the hub says: {str(error).splitlines()[0]}"
        raise NbkitError(
            f"could not load the {task.what} {source}: it is not downloaded and {where}",
            fix="connect to the internet (and unset HF_HUB_OFFLINE) so it downloads once, or give a local "
            "folder saved with save_pretrained",
        ) from error
    return model, processor, config.model_type


class LoadedModel:
    """A model in eval mode and its processor, run a batch of images at a time.

    Args:
        model: the model.
        processor: its processor.
        name: where it came from (hub id, folder or `tiny:<kind>`); recorded with what it makes.
        batch_size: images per model call.
    """

    def __init__(self, model: Any, processor: Any, *, name: str, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model, self.processor = model, processor
        self.name, self.batch_size = name, max(1, batch_size)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


# ---------------------------------------------------------------- the captioning models


def resolve_captioner(model: str) -> str:
    """What `model` loads from: a known name's hub id, a hub id, a model folder, or `tiny:<kind>`.

    Args:
        model: `florence2`, `blip`, `tiny:florence2`, `tiny:blip`, a hub id (`owner/name`) or a folder.
    """
    return resolve_model(model, CAPTIONING)


class Captioner(LoadedModel):
    """A loaded captioning model and its processor: `caption(images)`.

    Args:
        model: a `Florence2ForConditionalGeneration` or `BlipForConditionalGeneration` in eval mode.
        processor: its processor.
        name: where it came from (hub id, folder or `tiny:<kind>`); recorded with the captions.
        kind: `florence2` or `blip`.
        batch_size: images per `generate` call.
        task: Florence-2's task, one of `FLORENCE2_TASKS`.
        max_new_tokens: the longest caption, in tokens.
        num_beams: beam search width.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        kind: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        task: str = FLORENCE2_TASK,
        max_new_tokens: int = MAX_NEW_TOKENS,
        num_beams: int = NUM_BEAMS,
    ):
        if task not in FLORENCE2_TASKS:
            raise NbkitError(
                f"{task!r} is not a Florence-2 caption task", fix=f"use {', '.join(FLORENCE2_TASKS)}"
            )
        super().__init__(model, processor, name=name, batch_size=batch_size)
        self.kind, self.task = kind, task
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def _inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        if self.kind == "florence2":
            batch = self.processor(text=[self.task] * len(images), images=images, return_tensors="pt")
        else:
            batch = self.processor(images=images, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """The cleaned caption of each image (`clean_caption`), without the subject's words.

        Args:
            images: PIL images, any size and mode.
        """
        import torch

        texts: list[str] = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                ids = self.model.generate(
                    **self._inputs(batch),
                    max_new_tokens=self.max_new_tokens,
                    num_beams=self.num_beams,
                    do_sample=False,
                )
                texts += self.processor.batch_decode(ids, skip_special_tokens=True)
        return [clean_caption(text) for text in texts]


def load_captioner(
    model: str = DEFAULT_CAPTIONER,
    *,
    device: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    local_files_only: bool | None = None,
) -> Captioner:
    """Load a captioner from a name, hub id, folder or `tiny:<kind>` (see `resolve_captioner`).

    Args:
        model: the captioner.
        device: `cuda`, `cpu`, ...; default: CUDA when available. On CUDA the weights are fp16.
        batch_size: images per `generate` call.
        local_files_only: passed to `from_pretrained` (default: only when HF_HUB_OFFLINE is set).
    """
    source = resolve_captioner(model)
    loaded, processor, kind = load_task_model(
        source, CAPTIONING, device=device, local_files_only=local_files_only
    )
    # Random weights rarely end a caption: a tiny captioner stops early.
    length = TINY_MAX_NEW_TOKENS if source.startswith(TINY_PREFIX) else MAX_NEW_TOKENS
    return Captioner(loaded, processor, name=source, kind=kind, batch_size=batch_size, max_new_tokens=length)


# ---------------------------------------------------------------- captioning a session


def is_hand_written(record: ImageRecord) -> bool:
    """Whether a caption was written by a person: from a .txt file or the editor, and more than the
    file-name token.

    Args:
        record: the image's record.
    """
    caption = normalise_caption(record.caption)
    token_only = caption.casefold() in ("", normalise_caption(record.token).casefold())
    return record.caption_source in ("txt", "editor") and not token_only


def _kept_because(record: ImageRecord, source: str, class_word: str) -> str | None:
    if is_hand_written(record):
        return "kept: written by hand (overwrite replaces it)"
    subject = subject_phrase(record.token, class_word)
    if (
        record.caption_source == "auto"
        and record.caption_model == source
        and (not subject or _words((subject,)).search(record.caption))
    ):
        return f"kept: captioned by {source} already (overwrite captions it again)"
    return None


def auto_caption(
    session: Session,
    model: str = DEFAULT_CAPTIONER,
    *,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    class_word: str | None = None,
    device: str | None = None,
    tokenizer=None,
) -> ImageReport:
    """Caption the session's images with a captioning model, with the subject's words in each caption.

    Writes session.json once (the captions and a `captions` history entry) and each image's
    `captions/<stem>.txt`, atomically. The model is loaded only when some image needs a caption.

    Args:
        session: the session.
        model: `florence2`, `blip`, a hub id, a folder, or `tiny:florence2` / `tiny:blip`.
        overwrite: caption every image, also those with a hand-written caption.
        batch_size: images per `generate` call.
        class_word: the subject's class (`dog`); None takes each photo's concept's
            (`session_class_word`), "" puts in the instance token only.
        device: `cuda`, `cpu`, ...; default: CUDA when available.
        tokenizer: a CLIP tokenizer, for the exact caption-length warning.

    Returns:
        A report with a row per image: its caption, or why it was kept.
    """
    if not session.manifest.images:
        raise NbkitError(
            f"session '{session.name}' has no instance images to caption",
            path=session.path,
            fix="add photos first (`nbkit images add SESSION FILES`, or the Photos cell)",
        )
    source = resolve_captioner(model)
    if class_word is None:
        words = {view.name: session_class_word(session, view.name) for view in concepts(session.manifest)}
        class_words = {record.file: words.get(record.concept, "") for record in session.manifest.images}
    else:
        class_words = {record.file: " ".join(class_word.split()) for record in session.manifest.images}
    reasons: dict[str, str] = {}
    todo: list[ImageRecord] = []
    for record in session.manifest.images:
        reason = None if overwrite else _kept_because(record, source, class_words[record.file])
        if reason:
            reasons[record.file] = reason
        elif not (session.path / record.file).is_file():
            reasons[record.file] = "missing"
        else:
            todo.append(record)
    if todo:
        with session.lock("captioning images"):
            _caption_records(session, todo, source, class_words, device=device, batch_size=batch_size)
    report = ImageReport(title=f'Automatic captions ({source}) in session "{session.name}"')
    for record in session.manifest.images:
        name, reason = PurePath(record.file).name, reasons.get(record.file)
        if reason == "missing":
            report.add(name, "error", f"missing {record.file}", fix="import the photo again")
            continue
        problems = caption_warnings(record.caption, record.token, tokenizer)
        report.add(
            name,
            "warning" if problems else "ok",
            "; ".join([f'caption "{record.caption}"', *filter(None, [reason]), *problems]),
        )
    without = sorted({record.concept for record in session.manifest.images if not class_words[record.file]})
    if without == [""]:
        report.warnings.append(
            "no class word yet (the class prompt is empty): captions name the subject by its token only; "
            "set the class word (the Class word cell, or `nbkit vision classify SESSION --accept`) and "
            "caption again: automatic captions then get it"
        )
    elif without:
        names = ", ".join(repr(name or "first") for name in without)
        report.warnings.append(
            f"concept(s) {names} have no class word yet: their captions name the subject by its token only; "
            "give each one (`nbkit images concept SESSION NAME --class-word dog`, or the Class word cell "
            "with CONCEPT) and caption again"
        )
    return report


def suggest_caption(session: Session, record: ImageRecord, captioner: Captioner) -> str:
    """What `captioner` writes for one photo, with its token and its concept's class word put in; the
    session is not changed (the caption editor shows it for the user to edit and save).

    Args:
        session: the session.
        record: the photo.
        captioner: a loaded captioner (`load_captioner`).
    """
    with Image.open(session.path / record.file) as image:
        text = captioner.caption([image.convert("RGB")])[0]
    return normalise_caption(insert_subject(text, record.token, session_class_word(session, record.concept)))


def _caption_records(
    session: Session,
    records: list[ImageRecord],
    source: str,
    class_words: dict[str, str],
    *,
    device: str | None,
    batch_size: int,
) -> None:
    """Caption `records` (with each one's class word, by file) and save them with one session.json
    write (the caller holds the lock)."""
    captioner = load_captioner(source, device=device, batch_size=batch_size)
    captions: dict[str, str] = {}
    try:
        # A batch at a time: a hundred full-size photos never sit in memory together.
        for start in range(0, len(records), captioner.batch_size):
            batch = records[start : start + captioner.batch_size]
            images = []
            for record in batch:
                with Image.open(session.path / record.file) as image:
                    images.append(image.convert("RGB"))
            for record, text in zip(batch, captioner.caption(images), strict=True):
                # A captioner may write nothing; an image without a token then keeps what it had.
                caption = normalise_caption(insert_subject(text, record.token, class_words[record.file]))
                captions[record.file] = caption or record.caption
    finally:
        # Training usually comes next and wants the whole GPU.
        del captioner
        free_memory()
    before = [(record, record.caption, record.caption_source, record.caption_model) for record in records]
    history = list(session.manifest.history)
    for record in records:
        record.caption, record.caption_source, record.caption_model = captions[record.file], "auto", source
    words = sorted({class_words[record.file] for record in records})
    detail = {"model": source, "class_word": ", ".join(words), "captioned": len(captions)}
    session.manifest.record_run(RUN_KIND, "ok", detail)
    try:
        session.save()
    except BaseException:
        for record, caption, caption_source, caption_model in before:
            record.caption, record.caption_source, record.caption_model = (
                caption,
                caption_source,
                caption_model,
            )
        session.manifest.history = history
        raise
    for record in records:
        write_caption_file(session, record)
