"""The notebooks' web UI cells: the model to show, ControlNets, launch, a test image, stop, tidy."""

from __future__ import annotations

import contextlib

from nbkit.errors import NbkitError
from nbkit.notebook.state import WORDS, friendly, need_root, need_trained, run_first, state
from nbkit.notebook.widgets import UILinks, show


@friendly()
def ui_model(model: str = "", *, custom: str = "") -> None:
    """Choose the model the UI loads first (fast-UI): `custom` (a path, URL or hub id) when given,
    else `model`, else the session's newest; with neither a session nor a model, stop here.

    Args:
        model: the form's model choice ("" the session's newest).
        custom: a custom path, URL or hub id; it wins over `model`.
    """
    from nbkit.models.sources import check_source

    need_root()
    chosen = custom.strip() or model.strip()
    check_source(chosen)
    if not chosen and (state.session is None or not state.session.manifest.models):
        what = "the session has no trained model" if state.session is not None else "no session is named"
        raise NbkitError(
            f"there is no model to show: {what} and MODEL is empty",
            fix="fill in SESSION_NAME with a trained session, or MODEL with a model (sd15, sdxl, flux-dev, "
            "a hub id), or CUSTOM_MODEL with a file, folder or URL; then run all again",
        )
    state.model = chosen
    print(f"First model: {chosen or state.session.manifest.models[-1].name}")


@friendly("the UI was not started: run the cell again")
def launch_ui(*, tunnel: str = "auto", password: str = "", trained: bool = False) -> None:
    """Start the web UI and its A1111 API; show its link (kept current) and login.

    A password typed here is never shown; a generated one shows once, masked with a copy button.

    Args:
        tunnel: `auto` (the first provider that gives a link, and the next one when it drops), `none`,
            `gradio`, `ngrok`, `localtunnel`, `cloudflared`.
        password: the UI password ("" generates one when a tunnel needs it).
        trained: the UI is for the session's trained model (fast-DreamBooth): refuse to start without it.
    """
    from nbkit.webui import announce, in_notebook, launch

    root = need_root()
    if trained:
        need_trained()
    if state.ui is not None:
        state.ui.close()  # a second run of the cell replaces the UI instead of starting another
    state.ui = None
    auth = f"nbkit:{password}" if password else None
    ui = launch(
        session=state.session, model=state.model or None, tunnel=tunnel, auth=auth, root=root, quiet=True
    )
    state.ui = ui
    if in_notebook():
        with contextlib.suppress(NbkitError):  # no ipywidgets: the text below
            show(UILinks(ui, words=WORDS))
            return
    announce(ui, interface="notebook", words=WORDS)


def _message(response) -> str:
    """The UI's error message from its JSON answer (`detail`, `error`), else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # a 422: one line per bad field
        return "; ".join(
            f"{'.'.join(map(str, item.get('loc', [])[1:]))}: {item.get('msg')}" for item in detail
        )
    return str(detail or (body.get("error") if isinstance(body, dict) else body))


@friendly("the test image was not finished; the UI is still running")
def try_ui(prompt: str, *, steps: int | None = 20, size: int | None = None) -> None:
    """Ask the running UI for one image through the A1111 API (a check that it answers), and show it.

    "" skips it.

    Args:
        prompt: the prompt; a LoRA session's LoRA is added to it (`<lora:name:1>`).
        steps: sampling steps (None: the model's own where it has them, else A1111's 50).
        size: the square size (None: the session's training size, else 512).
    """
    import base64

    import requests

    if not prompt:
        return
    ui, opened = state.ui, state.session
    if ui is None or not ui.running:
        raise run_first("the web UI is not running", "Web UI")
    if opened is not None and opened.manifest.models and not state.model:
        prompt = f"{prompt} {opened.manifest.models[-1].prompt_tag()}".rstrip()
    size = size or (opened.manifest.training.resolution if opened is not None else 512)
    auth = (ui.username, ui.password) if ui.password else None
    payload = {"prompt": prompt, "width": size, "height": size, "save_images": True}
    if steps is not None:
        payload["steps"] = steps
    response = requests.post(
        ui.local_url.rstrip("/") + "/sdapi/v1/txt2img", json=payload, auth=auth, timeout=600
    )
    if response.status_code != 200:
        raise NbkitError(
            f"the UI could not make the test image: {_message(response)}",
            fix="change UI_TEST_PROMPT or the model in Settings, or leave UI_TEST_PROMPT empty to skip the test",
        )
    from IPython.display import Image, display

    display(Image(data=base64.b64decode(response.json()["images"][0])))


def stop_ui(stop: bool = True) -> None:
    """Close the UI (server, queue, tunnel) when `stop`; re-running the launch cell starts a new one."""
    if state.ui is not None and state.ui.running and stop:
        state.ui.close()
        print("UI stopped")


@friendly()
def controlnets(model: str = "") -> None:
    """List the ControlNet models that fit the model's family (the UI downloads one when first picked)."""
    from nbkit.families import FAMILIES
    from nbkit.session.base_model import base_model_ref
    from nbkit.webui.controlnet import CONTROLNETS

    base = state.session.manifest.base_model if state.session is not None else None
    if model:
        # A single file or URL does not say its family: then every ControlNet is listed.
        with contextlib.suppress(NbkitError):
            base = base_model_ref(model)
    known = FAMILIES.get(base.family) if base is not None else None
    family = known.controlnet_group if known is not None else None
    names = [key for key, spec in CONTROLNETS.items() if family is None or spec.family == family]
    print("ControlNet models for this model:", ", ".join(names) or "none")


@friendly()
def tidy(*, delete_session: str = "", confirm: bool = False) -> None:
    """List sessions with their sizes; delete one when named and confirmed.

    Args:
        delete_session: a session to delete ("" deletes nothing).
        confirm: must be ticked to delete.
    """
    from nbkit.session.store import delete_session as delete
    from nbkit.session.store import format_size, list_sessions

    root = need_root()
    if delete_session:
        delete(delete_session, root, confirm=confirm)
        print(f"deleted session '{delete_session}'")
    for info in list_sessions(root):
        print(f"{info.name:30} {format_size(info.size):>10}  {info.images} images  stage {info.stage}")


__all__ = ["controlnets", "launch_ui", "stop_ui", "tidy", "try_ui", "ui_model"]
