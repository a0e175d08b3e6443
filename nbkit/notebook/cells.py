"""The notebooks' first cells: set-up, storage, base model, session, photos, captions, class images.

    import nbkit.notebook as nb
    nb.storage("")                 # Drive on Colab, NBKIT_HOME elsewhere
    nb.base_model("sd15")
    nb.session("zwx_dog")
    nb.add_images("/content/drive/MyDrive/photos", token="zwx")

Each takes only form values; what it makes is kept in `nbkit.notebook.state` for the cells below. Where
a form leaves something out, the cell shows a widget (`nbkit.notebook.widgets`: session picker, upload
box) instead of waiting for input, and says in one line what to do. Nothing returns a value, so a cell
shows its messages and never an object's repr.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError
from nbkit.notebook.state import friendly, need_root, need_session, state
from nbkit.notebook.widgets import SessionPicker, UploadBox, picked_session, show, show_image

VISION_MODELS = ("default", "tiny", "off")


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


@friendly()
def setup(sets: list[str]) -> None:
    """Install the package sets from the wheel cache and quieten the libraries.

    `NBKIT_INSTALL_WHEELS=0` skips the install (an environment that has everything, e.g. from
    environment.yml).

    Args:
        sets: `train`, `ui`, `images`, `vision`.
    """
    if _flag("NBKIT_INSTALL_WHEELS", True):
        from nbkit.wheels import install

        install(sets=sets)
    from nbkit.env import describe_runtime
    from nbkit.quiet import quiet_libraries

    quiet_libraries()
    print(describe_runtime())


@friendly()
def storage(where: str = "", *, shared_drive: str = "") -> None:
    """Choose where sessions live.

    Args:
        where: "" for the default (Google Drive on Colab, `NBKIT_HOME` or ~/nbkit elsewhere), or a folder.
        shared_drive: the name of a Google shared drive (Colab) instead of My Drive.
    """
    from nbkit.env import storage_root

    if where:
        os.environ["NBKIT_HOME"] = str(Path(where).expanduser())
    state.root = storage_root(shared_drive=shared_drive or None)
    print(f"Sessions and models are kept in {state.root}")


@friendly()
def base_model(model: str, family: str = "") -> None:
    """Check and describe the base model: a registry name in any common spelling (`sd1.5`, `SD 1.5`,
    `flux-dev`), a hub id, a diffusers folder, or a single file or URL with `family`.

    A private hub model needs a token: Colab's `HF_TOKEN` secret (or `HF_TOKEN`) is used by itself.

    Args:
        model: the model ("" for none: an existing session's own).
        family: the model family of a single file or URL ("" detects it).
    """
    from nbkit.families import get_family
    from nbkit.models.registry import find_model
    from nbkit.models.sources import check_source
    from nbkit.session.base_model import base_model_ref
    from nbkit.session.manifest import BaseModelRef

    state.base, state.base_asked = None, True
    if not model.strip():
        print("No base model: an existing session keeps its own")
        return
    check_source(model)
    base = (
        BaseModelRef(model, family, get_family(family).prediction_type) if family else base_model_ref(model)
    )
    spec = find_model(base.source)
    title = f"{spec.title} ({spec.key})" if spec is not None else base.source
    print(f"Base model {title}: {get_family(base.family).title}, {base.prediction_type} prediction")
    if spec is not None and spec.gated:
        print(f"{spec.repo_id} is gated: accept its licence at https://huggingface.co/{spec.repo_id}, then add your "
              "token as the Colab secret HF_TOKEN")  # fmt: skip
    note = get_family(base.family).training_note
    if note:
        print(note)
    state.base = base


def _describe_training(session) -> str:
    config = session.manifest.training
    stages = [f"{config.resolution} px"]
    if config.text_encoder_steps:
        stages.append(f"text encoder {config.text_encoder_steps} steps at {config.text_encoder_lr:g}")
    stages.append(f"UNet/transformer {config.unet_steps} steps at {config.unet_lr:g}")
    kind = (
        f"a rank-{config.lora_rank} LoRA" if config.lora_rank else "a full fine-tune where the GPU holds it"
    )
    return f"Training settings ('auto' in Settings): {', '.join(stages)}, {kind}"


@friendly()
def session(name: str, *, import_zip: str = "", required: bool = True) -> None:
    """Open session `name`, or create it on the base model, or import a shared session zip.

    With no name the session picker is shown; picking opens the session for the cells below. The cell
    does not wait.

    Args:
        name: the session name (spaces become `_`); "" shows the picker.
        import_zip: a session zip (from `nbkit session export` or a friend) to import as `name`.
        required: with no name and nothing picked, stop "Run all" here (False: go on without one).
    """
    from nbkit.session.core import Session, session_path
    from nbkit.session.store import import_session

    root = need_root()
    if not state.base_asked and required:
        raise NbkitError("the base model is not chosen yet", fix="run the Base model cell first")
    state.session = None
    if import_zip.strip() and not (name and session_path(name, root).exists()):
        state.session = import_session(import_zip.strip(), name=name or None, root=root)
        print(f"Imported session '{state.session.name}' from {import_zip.strip()}")
    elif not name:
        show(SessionPicker(root, state.base, on_pick=_picked))
        state.session = picked_session(root)
        if state.session is None and required:
            raise NbkitError(
                "no session is named in Settings",
                fix="pick a session in the list above (or type a new name and press Create), then run "
                "the next cell; or fill in SESSION_NAME and run all again",
            )
        print("No session" if state.session is None else f"Session '{state.session.name}'")
    else:
        existed = session_path(name, root).exists()
        base = state.base if required else None  # fast-UI opens sessions, it never makes one
        opened = (
            Session.create(name, root=root, base_model=base, exist_ok=True)
            if base
            else Session.open(name, root=root)
        )
        progress = opened.manifest.state
        if existed:
            images = len(opened.manifest.images)
            print(
                f"Opened session '{opened.name}' ({images} photos, stage {progress.stage}, step {progress.step})"
            )
        else:
            print(f"Created session '{opened.name}' in {opened.path}")
        state.session = opened
    if state.session is not None:
        state.result = None
        print(_describe_training(state.session))


def _picked(opened) -> None:
    state.session, state.result = opened, None


@friendly(
    "the import was undone (an import is all or nothing): the session's photos are as before; run the "
    "cell again"
)
def add_images(
    folder: str = "",
    *,
    token: str = "",
    crop: str = "smart",
    buckets: str = "auto",
    replace: bool = False,
    upload: bool = True,
    concept: str = "",
) -> None:
    """Import photos (a folder, zip or URL; or Colab's upload button), then show the report and contact sheet.

    Args:
        folder: a folder, .zip or URL of photos; "" offers an upload (Colab's button while the session has
            no photos; elsewhere an upload box whose files are imported on arrival).
        token: the instance token of the photos ("" takes it from each file name: `zwx (1).jpg`); it
            also captions photos already imported without one.
        crop: `smart`, `center` or `none`.
        buckets: `on` crops each photo to its aspect-ratio bucket, `off` to a square, `auto` keeps the
            session's setting (a new session's is its model family's).
        replace: remove the concept's current photos first (the session's, without concepts).
        upload: with no folder, offer an upload.
        concept: what these photos show when the session trains several subjects ("": the first;
            another name, e.g. `dog`, adds a concept: run the cell again with its photos).
    """
    from nbkit.images import check_captions, import_images, remove_images, write_contact_sheet
    from nbkit.session.concepts import check_name

    opened = need_session()
    wanted = bucket_choice(buckets)
    if wanted is not None and wanted != opened.manifest.training.buckets:
        # Set before the import, so the photos are cropped as they will train.
        opened.manifest.training = opened.manifest.training.replace(buckets=wanted)
        opened.save()
    concept = check_name(concept)
    mine = [record.file for record in opened.manifest.images if record.concept == concept]
    colab = _colab_files()
    sources: Any = [folder] if folder else None
    # Colab's upload button waits for the user, so it is offered only while the concept has no photos.
    if sources is None and upload and colab is not None and not mine:
        sources = colab.upload()
    if replace and sources and mine:
        remove_images(opened, mine)  # this concept's photos only
    report = (
        import_images(opened, sources, crop=crop, token=token, concept=concept) if sources or token else None
    )
    if report is not None:
        show(report)
    if sources is None and upload and colab is None:
        show(UploadBox(opened, crop=crop, replace=replace, concept=concept))
    if not opened.manifest.images:
        raise NbkitError(
            f"none of the files in {folder} could be imported (the report above says why, file by file)"
            if folder
            else f"session '{opened.name}' has no photos yet",
            path=opened.dir("instance_images"),
            fix="fix or replace the files the report names, then run this cell again"
            if folder
            else "upload photos with the button above (they are imported at once) and run the next cell, "
            "or put a folder (or .zip) of photos in IMAGES and run this cell again",
        )
    check_captions(opened)
    show_image(write_contact_sheet(opened))
    print(f"{len(opened.manifest.images)} photos in session '{opened.name}'")


def bucket_choice(value: str) -> bool | None:
    """The form's BUCKETS: `on` True, `off` False, `auto` None (the session's setting)."""
    choice = str(value).strip().lower()
    if choice not in ("auto", "", "on", "off"):
        raise NbkitError(f"BUCKETS = {value!r} is not a choice", fix='use "auto", "on" or "off" in Settings')
    return {"on": True, "off": False}.get(choice)


def _colab_files():
    """Colab's `google.colab.files`, or None elsewhere."""
    try:
        from google.colab import files  # type: ignore[import-not-found]
    except ImportError:
        return None
    return files


@friendly()
def auto_captions(model: str = "florence2", *, overwrite: bool = False) -> None:
    """Caption the photos with a captioning model, the instance token and class word in each; run before
    the editor. Captions written by hand (or from .txt files) are kept unless `overwrite`.

    Args:
        model: `florence2`, `blip`, a hub id or a folder; "off" (or "") skips. `NBKIT_VISION_MODELS=tiny`
            takes the offline tiny captioner of its kind, `off` skips (see `captioner`).
        overwrite: also replace hand-written captions.
    """
    from nbkit.images import auto_caption

    opened = need_session()
    source = captioner(model)
    if source is None:
        print("Automatic captions are off")
        return
    show(auto_caption(opened, source, overwrite=overwrite))


def captioner(model: str) -> str | None:
    """The captioning model `NBKIT_VISION_MODELS` asks for in place of `model` (None: off).

    `default` is `model` itself, `tiny` nbkit's offline tiny captioner of the same kind (`tiny:florence2`
    for any model that is not a known name), `off` none.
    """
    from nbkit.images.autocaption import CAPTIONERS, DEFAULT_CAPTIONER

    name = model.strip()
    vision = _vision()
    if vision == "off" or name.lower() in ("", "off", "none"):
        return None
    if vision == "tiny":
        return f"tiny:{name.lower() if name.lower() in CAPTIONERS else DEFAULT_CAPTIONER}"
    return name


@friendly()
def auto_masks(model: str = "off") -> None:
    """Make subject masks from the class word with CLIPSeg, for the photos without one (masks given as
    files are kept), then show the report and the contact sheet with the masks on it.

    Args:
        model: `clipseg`, a hub id or a folder; "off" (or "") skips. `NBKIT_VISION_MODELS=tiny` takes
            the offline `tiny:clipseg`, `off` skips.
    """
    from nbkit.images import auto_mask

    opened = need_session()
    name = model.strip()
    vision = _vision()
    if vision == "off" or name.lower() in ("", "off", "none"):
        print("Automatic masks are off")
        return
    report = auto_mask(opened, "tiny:clipseg" if vision == "tiny" else name)
    show(report)
    show_image(report.contact_sheet)


@friendly()
def captions(model: str = "") -> None:
    """The caption editor: pick an image, edit its caption (or have `model` write one), save.

    Args:
        model: the captioning model of the editor's "Write with" button ("" or "off": no button; see
            `captioner`).
    """
    from nbkit.images import caption_editor

    show(caption_editor(need_session(), captioner=captioner(model)))


def _vision() -> str:
    vision = os.environ.get("NBKIT_VISION_MODELS", "default")
    if vision not in VISION_MODELS:
        raise NbkitError(
            f"NBKIT_VISION_MODELS={vision!r} is not a choice", fix=f"use one of {', '.join(VISION_MODELS)}"
        )
    return vision


def backbone(kind: str):
    """The vision model of `kind` (`vit`, `dino`, `clip`) `NBKIT_VISION_MODELS` asks for (None: off).

    `default` is the real one, `tiny` nbkit's offline test model, `off` none.
    """
    from nbkit.vision import backbones

    vision = _vision()
    if vision == "off":
        return None
    default = {
        "vit": backbones.DEFAULT_CLASSIFIER,
        "dino": backbones.DEFAULT_DINO,
        "clip": backbones.DEFAULT_CLIP,
    }
    return backbones.load_backbone(f"tiny:{kind}" if vision == "tiny" else default[kind])


@friendly()
def class_images(class_word: str = "", num_images: int = 0, *, concept: str = "", repeats: int = 1) -> None:
    """Set the class word (suggested from the photos when "") and prior preservation's class images.

    Args:
        class_word: what the subject is (`dog`, `woman`); "" takes the one suggested from the photos.
        num_images: class images for prior preservation (0: off); they are made at training.
        concept: the concept these are for ("": the session's first).
        repeats: draws of the concept's photos per epoch, relative to the first concept's 1.
    """
    from nbkit.session.concepts import check_name, concept_of, set_concept
    from nbkit.vision.classword import apply_suggestion, suggest_class_word
    from nbkit.vision.scoring import instance_photos

    opened = need_session()
    concept = check_name(concept)
    prompt = class_word.strip()
    model = backbone("vit") if not prompt and not concept else None
    if model is not None:
        files, images, _ = instance_photos(opened, concept="")  # the first concept's word
        suggestion = suggest_class_word(model, images, files)
        print(suggestion)
        prompt = apply_suggestion(opened, suggestion)
    if num_images and not prompt:
        raise NbkitError(
            f"{num_images} class images are asked for, but there is no class word to make them of",
            fix='fill in CLASS_WORD in Settings with what your subject is ("dog", "woman"), or set '
            "CLASS_IMAGES to 0",
        )
    if concept:
        concept_of(opened.manifest, concept)  # its photos come first
    if prompt or concept:
        set_concept(
            opened.manifest,
            concept,
            class_word=prompt or None,
            class_images=num_images if prompt else None,
            repeats=repeats if concept else None,
        )
        opened.save()
    what = f"Concept {concept!r}: " if concept else ""
    print(what + (f"class prompt {prompt!r}, {num_images} class images" if prompt else "no class word"))


__all__ = [
    "add_images",
    "auto_captions",
    "auto_masks",
    "base_model",
    "captions",
    "class_images",
    "session",
    "setup",
    "storage",
]
