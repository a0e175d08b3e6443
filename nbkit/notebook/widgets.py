"""The notebooks' interactive parts: a session picker and an upload box for photos (ipywidgets).

Neither waits for the user: a cell shows the widget and goes on, or stops with nbkit's one line saying
what to do, and the widget's own callback does the work when the user acts on it. So "Run all" never
hangs, and after picking or uploading the user runs the next cell.

    picker = SessionPicker(root, base)   # picking opens the session for the cells below
    box = UploadBox(session)             # uploaded photos are imported at once
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError

# The sessions picked in a picker, by storage root, so that re-running the session cell keeps the pick.
_picked: dict[str, Any] = {}


def show(obj: Any) -> None:
    """Display `obj` in the notebook (print it outside IPython)."""
    try:
        from IPython.display import display
    except ImportError:
        print(obj)
        return
    display(obj)


def show_image(path: str | os.PathLike | None) -> None:
    """Display the picture at `path`, if there is one."""
    if path is None or not Path(path).is_file():
        return
    try:
        from IPython.display import Image
    except ImportError:
        print(path)
        return
    show(Image(filename=str(path)))


def _widgets():
    try:
        import ipywidgets
    except ImportError:
        raise NbkitError(
            "the notebook's session picker and upload box need ipywidgets",
            fix="pip install ipywidgets (it comes with nbkit[images])",
        ) from None
    return ipywidgets


def picked_session(root: str | os.PathLike | None):
    """The session last picked in a `SessionPicker` for `root`, or None."""
    return _picked.get(str(root))


class SessionPicker:
    """A dropdown of the sessions under the storage root and a box to name a new one.

    Picking (or pressing Create) opens the session, makes it `self.session` and hands it to `on_pick`,
    so the cells below use it. Problems show as nbkit's one line under the widget.

    Args:
        root: the storage root (None: `nbkit.env.storage_root()`).
        base: the `BaseModelRef` a new session is created on (None: the template's).
        on_pick: called with each session picked.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        base=None,
        *,
        on_pick: Callable[[Any], None] | None = None,
    ):
        from nbkit.session.store import list_sessions

        widgets = _widgets()
        self.root, self.base, self.on_pick = root, base, on_pick
        self.session = picked_session(root)
        names = [info.name for info in list_sessions(root) if not info.problem]
        current = self.session.name if self.session is not None and self.session.name in names else ""
        self.dropdown = widgets.Dropdown(options=["", *names], value=current, description="Session")
        self.new_name = widgets.Text(placeholder="a new session's name", description="or new")
        self.create = widgets.Button(description="Create", icon="plus")
        self.output = widgets.Output()
        self.dropdown.observe(lambda change: self.pick(change["new"]), names="value")
        self.create.on_click(lambda button: self.pick(self.new_name.value, new=True))
        self.widget = widgets.VBox([self.dropdown, widgets.HBox([self.new_name, self.create]), self.output])

    def pick(self, name: str, *, new: bool = False):
        """Open session `name` (create it on `base` when `new`) and bind it; "" does nothing.

        Args:
            name: the session's name.
            new: create it when it does not exist (an existing one is opened).
        """
        from nbkit.session.core import Session, session_path

        if not name.strip():
            return None
        with self.output:
            try:
                existed = session_path(name, self.root).exists()
                opened = (
                    Session.create(name, root=self.root, base_model=self.base, exist_ok=True)
                    if new
                    else Session.open(name, root=self.root)
                )
            except NbkitError as error:
                print(f"nbkit: {error}")
                return None
            self.session = _picked[str(self.root)] = opened
            if self.on_pick is not None:
                self.on_pick(opened)
            images = len(opened.manifest.images)
            done = "Opened" if existed else "Created"
            print(f"{done} session '{opened.name}' ({images} images): run the next cell")
        return opened

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def uploaded_files(value: Sequence[Mapping] | Mapping[str, Mapping]) -> dict[str, bytes]:
    """`{name: bytes}` from a `FileUpload` value (ipywidgets 8: a tuple of dicts; 7: a dict by name)."""
    if isinstance(value, Mapping):
        return {name: bytes(item["content"]) for name, item in value.items()}
    return {item["name"]: bytes(item["content"]) for item in value}


class UploadBox:
    """An upload button for photos (and `.txt` captions, or a .zip): imported into the session on arrival.

    The import report and the contact sheet show under the button; problems as nbkit's one line.

    Args:
        session: the open session.
        crop: `smart`, `center` or `none`.
        replace: remove the concept's current photos before the first upload is imported.
        concept: the concept the photos show ("": the session's first).
    """

    def __init__(self, session, *, crop: str = "smart", replace: bool = False, concept: str = ""):
        widgets = _widgets()
        self.session, self.crop, self.replace, self.concept = session, crop, replace, concept
        self.upload = widgets.FileUpload(accept="image/*,.zip,.txt", multiple=True, description="Photos")
        self.output = widgets.Output()
        self.upload.observe(lambda change: self.receive(change["new"]), names="value")
        self.widget = widgets.VBox([self.upload, self.output])

    def receive(self, value: Sequence[Mapping] | Mapping[str, Mapping]):
        """Import the uploaded files (the upload button's callback); returns the import report."""
        from nbkit.images import import_images, remove_images, write_contact_sheet

        files = uploaded_files(value)
        if not files:
            return None
        with self.output:
            try:
                mine = [r.file for r in self.session.manifest.images if r.concept == self.concept]
                if self.replace and mine:
                    remove_images(self.session, mine)
                self.replace = False
                report = import_images(self.session, files, crop=self.crop, concept=self.concept)
            except NbkitError as error:
                print(f"nbkit: {error}")
                return None
            show(report)
            show_image(write_contact_sheet(self.session))
            print(f"{len(self.session.manifest.images)} images in the session: run the next cell")
        # Emptied so the same files can be uploaded again (their bytes are in the session now).
        self.upload.value = {} if isinstance(value, Mapping) else ()
        return report

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# A copy button for the password field: the browser reads the field it sits next to (found by a class
# unique to that row), so the password is in no HTML the notebook saves, only in the field's widget.
_COPY_BUTTON = """<button class="jupyter-button" title="Copy the password to the clipboard" onclick="(function(b){
var i=document.querySelector('.{row} input');if(!i)return;
var ok=function(){b.textContent='Copied';};
var old=function(){var t=i.type;i.type='text';i.select();document.execCommand('copy');i.type=t;ok();};
if(navigator.clipboard){navigator.clipboard.writeText(i.value).then(ok,old);}else{old();}})(this)">Copy</button>"""


class UILinks:
    """The running UI's links, kept current, and its login, for the launch cell's output.

    The links update in place when the watchdog reopens the tunnel or moves it to another provider. A
    generated password shows once, as a masked field with a copy button (and a Show toggle where the
    browser blocks the copy): it lives in the field's widget state, never in the cell's saved HTML or
    text. A password the user chose is never shown.

    Args:
        ui: the `WebUI` that `nbkit.webui.launch` returned.
        words: the notebook's words for the settings the tunnel's advice names (`nbkit.errors.render`).
    """

    def __init__(self, ui, *, words: Mapping[str, str] | None = None):
        import secrets

        from nbkit.webui import links_html

        widgets = _widgets()
        self.ui, self.words = ui, words
        self.links = widgets.HTML(value=links_html(ui, "notebook", words))
        rows: list[Any] = [self.links]
        password = ui.reveal_password()
        self.password = self.login = None
        if password is not None:
            row = f"nbkit-password-{secrets.token_hex(4)}"
            self.password = widgets.Password(value=password, description="Password")
            self.show = widgets.ToggleButton(description="Show", icon="eye", value=False)
            self.show.observe(lambda change: self._reveal(change["new"]), names="value")
            copy = widgets.HTML(value=_COPY_BUTTON.replace("{row}", row))
            self.row = widgets.HBox([self.password, copy, self.show])
            self.row.add_class(row)
            self.login = widgets.HTML(
                value=f"Login: user <code>{_escape(ui.username)}</code> with this generated password "
                "(shown once, stored nowhere: copy it now)"
            )
            rows += [self.login, self.row]
        elif ui.password is not None:
            who = (
                "generated password shown when it started" if ui.password_generated else "password you chose"
            )
            self.login = widgets.HTML(value=f"Login: user <code>{_escape(ui.username)}</code> with the {who}")
            rows.append(self.login)
        self.widget = widgets.VBox(rows)
        ui.on_link_change(lambda url: self.refresh())

    def refresh(self) -> None:
        """Show the UI's current links (called when they change)."""
        from nbkit.webui import links_html

        self.links.value = links_html(self.ui, "notebook", self.words)

    def __repr__(self) -> str:  # the text a notebook saves beside the widget: links only
        public = f", public_url={self.ui.public_url!r}" if self.ui.public_url else ""
        return f"UILinks(local_url={self.ui.local_url!r}{public})"

    def _reveal(self, visible: bool) -> None:
        # a Text field in place of the Password one (same value) so it can be selected and copied
        widgets = _widgets()
        value = self.row.children[0].value
        field = widgets.Text(value=value) if visible else widgets.Password(value=value)
        field.description = "Password"
        self.row.children = (field, *self.row.children[1:])

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # a widget's text form can list its fields' values
            bundle = {**bundle, "text/plain": repr(self)}
        return bundle


def _escape(text: str | None) -> str:
    import html

    return html.escape(text or "")
