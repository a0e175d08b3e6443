"""A notebook caption editor: pick an image, see its crop, edit its caption (or have a captioning
model write one to start from), save.

Saving goes through `set_caption`: session.json is saved atomically and `captions/<stem>.txt` is
rewritten atomically, so a runtime reset mid-save never leaves half a caption. ipywidgets is imported
only when an editor is made; nothing else in nbkit.images needs it.
"""

from __future__ import annotations

import html
import io
from pathlib import PurePath
from typing import TYPE_CHECKING

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.images.captions import caption_warnings, find_record, set_caption

if TYPE_CHECKING:
    from nbkit.session.core import Session


class CaptionEditor:
    """The editor's widgets; display the object (or `.widget`) in a notebook cell.

    Args:
        session: the session whose captions to edit.
        tokenizer: a CLIP tokenizer, for the exact caption-length warning.
        thumb: the preview size in pixels.
        captioner: a captioning model (`florence2`, `blip`, a hub id, a folder, `tiny:florence2`); with
            one, a button writes the picked photo's caption with it into the text box, to edit and
            save. It is loaded on the first click and kept for the next.
    """

    def __init__(self, session: Session, *, tokenizer=None, thumb: int = 320, captioner: str | None = None):
        try:
            import ipywidgets as widgets
        except ImportError:
            raise NbkitError("the caption editor needs ipywidgets", fix="pip install ipywidgets") from None
        if not session.manifest.images:
            raise NbkitError(f"session {session.name} has no images yet", fix="import some photos first")
        self.session, self.tokenizer, self.thumb = session, tokenizer, thumb
        options = [(PurePath(record.file).name, record.file) for record in session.manifest.images]
        self.picker = widgets.Dropdown(options=options, description="Image")
        self.previous = widgets.Button(
            description="◀", layout=widgets.Layout(width="3em"), tooltip="previous image"
        )
        self.next = widgets.Button(description="▶", layout=widgets.Layout(width="3em"), tooltip="next image")
        self.picture = widgets.Image(format="png", width=thumb)
        self.token = widgets.HTML()
        self.text = widgets.Textarea(placeholder="caption", layout=widgets.Layout(width="100%", height="5em"))
        self.save_button = widgets.Button(description="Save caption", button_style="primary", icon="save")
        self.captioner_name, self._captioner = captioner, None
        self.write_button = widgets.Button(
            description=f"Write with {captioner}"[:40],
            icon="magic",
            tooltip="caption this photo with the model",
        )
        self.status = widgets.HTML()
        self.picker.observe(lambda change: self.show(), names="value")
        self.previous.on_click(lambda button: self._step(-1))
        self.next.on_click(lambda button: self._step(1))
        self.save_button.on_click(lambda button: self.save())
        self.write_button.on_click(lambda button: self.write())
        buttons = [self.save_button, self.write_button] if captioner else [self.save_button]
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.picker, self.previous, self.next]),
                self.picture,
                self.token,
                self.text,
                widgets.HBox(buttons),
                self.status,
            ]
        )
        self.show()

    def show(self) -> None:
        """Load the picked image's crop and caption into the widgets."""
        record = find_record(self.session, self.picker.value)
        self.picture.value = _preview_png(self.session.path / record.file, self.thumb)
        self.token.value = f"instance token: <b>{html.escape(record.token) or '(none)'}</b>"
        self.text.value = record.caption
        self.status.value = ""

    def save(self) -> None:
        """Save the caption in the text box for the picked image; the outcome shows below the button."""
        try:
            record = set_caption(self.session, self.picker.value, self.text.value)
        except NbkitError as error:
            self.status.value = f"<span style='color:#cf222e'>Not saved: {html.escape(str(error))}</span>"
            return
        self.text.value = record.caption
        warnings = caption_warnings(record.caption, record.token, self.tokenizer)
        notes = "".join(
            f"<br><span style='color:#9a6700'>⚠ {html.escape(warning)}</span>" for warning in warnings
        )
        self.status.value = f"<span style='color:#1a7f37'>Saved.</span>{notes}"

    def write(self) -> None:
        """Put the captioning model's caption of the picked photo (its token and class word in it) into
        the text box; nothing is saved until Save."""
        from nbkit.images.autocaption import load_captioner, suggest_caption

        if not self.captioner_name:
            return
        self.status.value = "Writing a caption..."
        try:
            if self._captioner is None:
                self._captioner = load_captioner(self.captioner_name)
            record = find_record(self.session, self.picker.value)
            self.text.value = suggest_caption(self.session, record, self._captioner)
        except NbkitError as error:
            self.status.value = f"<span style='color:#cf222e'>No caption: {html.escape(str(error))}</span>"
            return
        self.status.value = "Written by the model: edit it if you like, then Save caption."

    def _step(self, offset: int) -> None:
        values = [value for _, value in self.picker.options]
        self.picker.value = values[(values.index(self.picker.value) + offset) % len(values)]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def caption_editor(session: Session, *, tokenizer=None, captioner: str | None = None) -> CaptionEditor:
    """Make a caption editor for `session` (display the result in a notebook cell).

    Args:
        session: the session whose captions to edit.
        tokenizer: a CLIP tokenizer, for the exact caption-length warning.
        captioner: a captioning model for the editor's "Write with" button (None: no button).
    """
    return CaptionEditor(session, tokenizer=tokenizer, captioner=captioner)


def _preview_png(path, size: int) -> bytes:
    try:
        with Image.open(path) as image:
            preview = image.convert("RGB")
    except OSError:
        preview = Image.new("RGB", (size, size), (200, 200, 200))
    preview.thumbnail((size, size))
    buffer = io.BytesIO()
    preview.save(buffer, format="PNG")
    return buffer.getvalue()
