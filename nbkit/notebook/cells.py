"""What the notebooks' cells call: one small function per cell, so that cells hold a form and one line.

    import nbkit.notebook.cells as nb
    root = nb.storage("")                      # Drive on Colab, NBKIT_HOME elsewhere
    session = nb.session("zwx_dog", nb.base_model("sd15"), root=root)
    nb.add_images(session, "/content/drive/MyDrive/photos")

Every function shows a user-fixable failure as nbkit's one paragraph (an `NbkitError`) instead of a
traceback, and still raises, so "Run all" stops at the first real error. Each can be run again. Choices
a cell would otherwise make with `if`/`or` are made here, so cells hold no logic. Where a form leaves
something out, the cell shows a widget (`nbkit.notebook.widgets`: session picker, upload box) instead of
waiting for input, and says in one line what to do.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from nbkit.errors import NbkitError
from nbkit.notebook.widgets import SessionPicker, UILinks, UploadBox, picked_session, show, show_image

F = TypeVar("F", bound=Callable[..., Any])
VISION_MODELS = ("default", "tiny", "off")


class CellError(Exception):
    """An `NbkitError` as a notebook shows it: the paragraph alone (IPython calls `_render_traceback_`)."""

    def __init__(self, error: NbkitError):
        super().__init__(str(error))
        self.error = error

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31mnbkit: {self.error}\x1b[0m"]


def friendly(func: F) -> F:
    """Turn an `NbkitError` raised by `func` into a `CellError` (the paragraph, no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NbkitError as error:
            raise CellError(error) from None

    return wrapper  # type: ignore[return-value]


@friendly
def setup(sets: list[str], *, wheels: bool = True, quiet: bool = True) -> None:
    """Install the package sets from the wheel cache (skipped with `wheels=False`) and quieten libraries.

    Args:
        sets: `train`, `ui`, `images`, `vision`.
        wheels: install from `nbkit.wheels` (False where the environment already has everything).
        quiet: hide the libraries' routine warnings and progress noise.
    """
    if wheels:
        from nbkit.wheels import install

        install(sets=sets)
    if quiet:
        from nbkit.quiet import quiet_libraries

        quiet_libraries()
    from nbkit.env import describe_runtime

    print(describe_runtime())


@friendly
def storage(where: str = "", *, shared_drive: str = "") -> Path:
    """Choose where sessions live and return that folder.

    Args:
        where: "" for the default (Google Drive on Colab, `NBKIT_HOME` or ~/nbkit elsewhere), or a folder.
        shared_drive: the name of a Google shared drive (Colab) instead of My Drive.
    """
    from nbkit.env import storage_root

    if where:
        os.environ["NBKIT_HOME"] = str(Path(where).expanduser())
    root = storage_root(shared_drive=shared_drive or None)
    print(f"Sessions and models are kept in {root}")
    return root


@friendly
def base_model(model: str, family: str = ""):
    """Describe the base model (registry key, hub id, diffusers folder; a single file or URL with `family`).

    A private hub model needs a token: Colab's `HF_TOKEN` secret (or `HF_TOKEN`) is used by itself.

    Args:
        model: the model ("" for none: an existing session's own).
        family: the model family of a single file or URL ("" detects it from a registry key or folder).
    """
    from nbkit.families import get_family
    from nbkit.models.registry import find_model
    from nbkit.session.base_model import base_model_ref
    from nbkit.session.manifest import BaseModelRef

    if not model:
        return None
    base = (
        BaseModelRef(model, family, get_family(family).prediction_type) if family else base_model_ref(model)
    )
    print(f"Base model {base.source} ({base.family}, {base.prediction_type})")
    spec = find_model(base.source)
    if spec is not None and spec.gated:
        print(f"{spec.repo_id} is gated: accept its licence at https://huggingface.co/{spec.repo_id}, then add your "
              "token as the Colab secret HF_TOKEN")  # fmt: skip
    note = get_family(base.family).training_note
    if note:
        print(note)
    return base


def ui_model(model: str = "", *, custom: str = "") -> str:
    """The model the UI loads first: `custom` (a path, URL or hub id) when given, else `model`.

    Args:
        model: the form's model choice ("" the session's newest).
        custom: a custom path, URL or hub id; it wins over `model`.
    """
    chosen = custom.strip() or model
    print(f"First model: {chosen or 'the newest of the session (or the first listed)'}")
    return chosen


@friendly
def session(name: str, base=None, *, root: str | os.PathLike | None = None, required: bool = True):
    """Open session `name`, or create it on `base`, and say which happened.

    With no name the session picker is shown (sessions under `root`, or a new name); picking opens the
    session and binds the notebook's `session`, so the user runs the next cell. The cell does not wait.

    Args:
        name: the session name (spaces become `_`); "" shows the picker.
        base: the `BaseModelRef` from `base_model` (None: an existing session's own).
        root: the storage root (default: `nbkit.env.storage_root()`).
        required: with no name and nothing picked yet, stop "Run all" here with one line saying to pick
            (False: go on without a session, returning None).
    """
    from nbkit.session.core import Session, session_path

    if not name:
        show(SessionPicker(root, base))
        picked = picked_session(root)
        if picked is None and required:
            raise NbkitError(
                "no session is named in the form",
                fix="pick a session in the list above (or type a new name and press Create), "
                "then run the next cell; or fill in SESSION_NAME and run all again",
            )
        print(
            "No session: pick one above to use its models" if picked is None else f"Session '{picked.name}'"
        )
        return picked
    existed = session_path(name, root).exists()
    opened = (
        Session.create(name, root=root, base_model=base, exist_ok=True)
        if base
        else Session.open(name, root=root)
    )
    state = opened.manifest.state
    if existed:
        images = len(opened.manifest.images)
        print(f"Opened session '{opened.name}' ({images} images, stage {state.stage}, step {state.step})")
    else:
        print(f"Created session '{opened.name}' in {opened.path}")
    return opened


@friendly
def add_images(session, folder: str = "", *, crop: str = "smart", replace: bool = False, upload: bool = True):
    """Import photos (a folder, zip or URL; or Colab's upload button), then show the report and contact sheet.

    Args:
        session: the open session.
        folder: a folder, .zip or URL of photos; "" offers an upload (Colab's button while the session has
            no photos; elsewhere an upload box whose files are imported on arrival).
        crop: `smart`, `center` or `none`.
        replace: remove the session's current images first.
        upload: with no folder, offer an upload.
    """
    from nbkit.images import import_images, remove_images, write_contact_sheet

    _need(session)
    colab = _colab_files()
    sources: Any = [folder] if folder else None
    # Colab's upload button waits for the user, so it is offered only while the session has no photos.
    if sources is None and upload and colab is not None and not session.manifest.images:
        sources = colab.upload()
    if replace and sources:
        remove_images(session)
    if sources:
        show(import_images(session, sources, crop=crop))
    elif upload and colab is None:
        show(UploadBox(session, crop=crop, replace=replace))
    if not session.manifest.images:
        raise NbkitError(
            f"session '{session.name}' has no instance images and none were given",
            path=session.dir("instance_images"),
            fix="upload photos with the button above (they are imported at once) and run the next cell, "
            "or put a folder (or .zip) of photos in IMAGES and run this cell again",
        )
    show_image(write_contact_sheet(session))
    return session


def _colab_files():
    """Colab's `google.colab.files`, or None elsewhere."""
    try:
        from google.colab import files  # type: ignore[import-not-found]
    except ImportError:
        return None
    return files


def _need(session) -> None:
    if session is None:
        raise NbkitError(
            "no session is open",
            fix="fill in SESSION_NAME (or pick a session in the Session step) and run from that step",
        )


@friendly
def captions(session):
    """The caption editor: pick an image, edit its caption, save."""
    from nbkit.images import caption_editor

    _need(session)
    return caption_editor(session)


def _backbone(vision: str, kind: str):
    from nbkit.vision import backbones

    if vision not in VISION_MODELS:
        raise NbkitError(
            f"vision models {vision!r} is not a choice", fix=f"use one of {', '.join(VISION_MODELS)}"
        )
    if vision == "off":
        return None
    default = {
        "vit": backbones.DEFAULT_CLASSIFIER,
        "dino": backbones.DEFAULT_DINO,
        "clip": backbones.DEFAULT_CLIP,
    }
    return backbones.load_backbone(f"tiny:{kind}" if vision == "tiny" else default[kind])


@friendly
def class_images(session, *, vision: str = "default", class_prompt: str = "", num_images: int = 0) -> str:
    """Suggest the class word from the photos and set prior preservation (class images come at training).

    Args:
        session: the open session.
        vision: `default` (the real classifier), `tiny` (offline test models) or `off`.
        class_prompt: the class prompt to use; "" takes the suggestion.
        num_images: class images for prior preservation (0: off).
    """
    from nbkit.vision.classword import apply_suggestion, suggest_class_word
    from nbkit.vision.scoring import instance_photos

    _need(session)
    prompt = class_prompt
    backbone = _backbone(vision, "vit") if not class_prompt else None
    if backbone is not None:
        files, images, _ = instance_photos(session)
        suggestion = suggest_class_word(backbone, images, files)
        print(suggestion)
        prompt = apply_suggestion(session, suggestion)
    if prompt:
        training = session.manifest.training
        prior = training.prior.replace(class_prompt=prompt, num_images=num_images)
        session.manifest.training = training.replace(prior=prior.to_dict())
        session.save()
    print(f"class prompt {prompt!r}, {num_images} class images" if prompt else "no class prompt")
    return prompt


@friendly
def train(session, *, resume: bool = False, restart: bool = False, sample_prompt: str = "", **settings):
    """Train both stages, then show the sample grids and the loss plot.

    Args:
        session: the open session.
        resume: continue from the last checkpoint after a disconnect.
        restart: start over (an unfinished run's checkpoints are deleted).
        sample_prompt: the prompt sampled at each checkpoint ("" uses the first image's caption).
        settings: `TrainConfig` fields (`unet_steps`, `text_encoder_steps`, `resolution`, ...); None
            leaves a field as the session has it (new sessions: the model family's defaults).
    """
    from nbkit.train import train as run_training

    _need(session)
    settings = {name: value for name, value in settings.items() if value is not None}
    prompt = sample_prompt or next((image.caption for image in session.manifest.images if image.caption), "")
    if prompt:
        settings["sample_prompts"] = [prompt]
    result = run_training(session, settings, resume=resume, restart=restart)
    for grid in result.samples:
        show_image(grid)
    show_image(result.loss_plot)
    print(f"stage {result.stage}, step {result.step}; model: {result.single_file or result.lora_files}")
    return result


@friendly
def scores(session, *, vision: str = "default"):
    """Score every checkpoint's samples (likeness, prompt fit, copies) and suggest one."""
    from nbkit.vision.scoring import format_table, score_session, suggest_checkpoint

    _need(session)
    if vision == "off":
        print("scoring is off")
        return None
    table, paths = score_session(session, dino=_backbone(vision, "dino"), clip=_backbone(vision, "clip"))
    print(format_table(table))
    show_image(paths.get("plot"))
    print(f"suggested checkpoint: {suggest_checkpoint(table)}")
    return table


@friendly
def export(session, result, *, file_format: str = "safetensors") -> Path | None:
    """Say where the trained model is; write another single-file format on request.

    Args:
        session: the open session.
        result: what `train` returned.
        file_format: `safetensors` (already written by training) or `ckpt`.
    """
    from nbkit.convert import convert_to_single_file

    _need(session)
    for path in [result.single_file, *(result.lora_files or {}).values()]:
        if path:
            print(f"model: {path}")
    if file_format == "safetensors" or result.model_dir is None:
        return result.single_file
    out = session.dir("models") / f"{session.name}.{file_format}"
    convert_to_single_file(result.model_dir, out)
    print(f"model: {out}")
    return out


@friendly
def launch_ui(
    session=None,
    *,
    model: str = "",
    host: str = "127.0.0.1",
    tunnel: str = "auto",
    password: str = "",
    extra_models: list[str] | None = None,
):
    """Start the web UI and its A1111 API; show its link (kept current) and login.

    A password typed here is never shown; a generated one shows once, masked with a copy button.

    Args:
        session: the session (its models and outputs), or None for the storage root's.
        model: the checkpoint to load first ("" the session's newest).
        host: the address to bind (loopback unless a tunnel is used).
        tunnel: `auto` (the first provider that gives a link, in `nbkit.tunnel.AUTO_ORDER`, and the next
            one when it drops), `none`, `gradio`, `ngrok`, `localtunnel`, `cloudflared`.
        password: the UI password ("" generates one when a tunnel needs it).
        extra_models: more checkpoints (paths, URLs, hub ids, LoRA files in `<root>/loras`).
    """
    from nbkit.webui import announce, in_notebook, launch

    auth = f"nbkit:{password}" if password else None
    ui = launch(
        session=session,
        model=model or None,
        host=host,
        tunnel=tunnel,
        auth=auth,
        extra_models=[m for m in extra_models or [] if m],
        quiet=True,
    )
    if in_notebook():
        with contextlib.suppress(NbkitError):  # no ipywidgets: the text below
            show(UILinks(ui))
            return ui
    announce(ui)  # a script or a console: what `nbkit ui` prints
    return ui


@friendly
def try_ui(ui, prompt: str, *, steps: int | None = 20, size: int | None = None, session=None) -> dict | None:
    """Ask the running UI for one image through the A1111 API (a check that it answers), and show it.

    "" skips it. Returns the API's answer without the image data.

    Args:
        ui: what `launch_ui` returned.
        prompt: the prompt; a LoRA session's LoRA is added to it (`<lora:name:1>`).
        steps: sampling steps (None: what the API gives a request without them: the model's own steps
            where it has them, else A1111's 50).
        size: the square size (None: the session's training size, else 512).
        session: the session whose newest model to try.
    """
    import base64

    if not prompt:
        return None

    import requests

    if session is not None and session.manifest.models:
        prompt = f"{prompt} {session.manifest.models[-1].prompt_tag()}".rstrip()
    size = size or (session.manifest.training.resolution if session is not None else 512)
    auth = (ui.username, ui.password) if ui.password else None
    payload = {"prompt": prompt, "width": size, "height": size, "save_images": True}
    if steps is not None:
        payload["steps"] = steps
    response = requests.post(
        ui.local_url.rstrip("/") + "/sdapi/v1/txt2img", json=payload, auth=auth, timeout=600
    )
    if response.status_code != 200:
        raise NbkitError(
            f"the UI answered {response.status_code}: {response.text[:200]}",
            fix="read the UI's message above",
        )
    from IPython.display import Image, display

    answer = response.json()
    display(Image(data=base64.b64decode(answer.pop("images")[0])))
    return answer


def stop_ui(ui, stop: bool = True) -> None:
    """Close the UI (server, queue, tunnel) when `stop`; re-running the launch cell starts a new one."""
    if ui is not None and stop:
        ui.close()
        print("UI stopped")


@friendly
def controlnets(session=None, model: str = "") -> list[str]:
    """List the ControlNet models that fit the model's family (the UI downloads one when first picked)."""
    from nbkit.families import FAMILIES
    from nbkit.session.base_model import base_model_ref
    from nbkit.webui.controlnet import CONTROLNETS

    base = session.manifest.base_model if session is not None else None
    if model:
        # A single file or URL does not say its family: then every ControlNet is listed.
        with contextlib.suppress(NbkitError):
            base = base_model_ref(model)
    known = FAMILIES.get(base.family) if base is not None else None
    family = known.controlnet_group if known is not None else None
    names = [key for key, spec in CONTROLNETS.items() if family is None or spec.family == family]
    print("ControlNet models for this model:", ", ".join(names) or "none")
    return names


@friendly
def tidy(*, root: str | os.PathLike | None = None, delete_session: str = "", confirm: bool = False) -> None:
    """List sessions with their sizes; delete one when named and confirmed.

    Args:
        root: the storage root.
        delete_session: a session to delete ("" deletes nothing).
        confirm: must be ticked to delete.
    """
    from nbkit.session.store import delete_session as delete
    from nbkit.session.store import format_size, list_sessions

    if delete_session:
        delete(delete_session, root, confirm=confirm)
        print(f"deleted session '{delete_session}'")
    for info in list_sessions(root):
        print(f"{info.name:30} {format_size(info.size):>10}  {info.images} images  stage {info.stage}")


@contextlib.contextmanager
def shown_errors() -> Iterator[None]:
    """`with nb.shown_errors():` for a cell that calls nbkit directly."""
    try:
        yield
    except NbkitError as error:
        raise CellError(error) from None
