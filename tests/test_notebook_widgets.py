"""The notebooks' session picker and upload box, driven in a plain Python process (no kernel needed).

Setting a widget's value (or clicking its button) runs the same callback the browser triggers.
"""

from __future__ import annotations

import dataclasses
import datetime
import io

import pytest
from PIL import Image

import nbkit.notebook as notebook
import nbkit.notebook.cells as nb
import nbkit.notebook.widgets as nw
from nbkit.session.base_model import base_model_ref
from nbkit.session.core import Session


def _forget():
    nw._picked.clear()
    for field in dataclasses.fields(notebook.state):
        setattr(notebook.state, field.name, field.default)


@pytest.fixture(autouse=True)
def _no_picks():
    _forget()
    yield
    _forget()


@pytest.fixture
def shown(monkeypatch):
    """What the notebook functions display, instead of printing it."""
    objects: list = []
    monkeypatch.setattr(nb, "show", objects.append)
    return objects


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 96), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload_value(files: dict[str, bytes]) -> tuple[dict, ...]:
    """A FileUpload value as ipywidgets 8 sets it after an upload in the browser."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return tuple(
        {
            "name": name,
            "type": "image/png",
            "size": len(data),
            "content": memoryview(data),
            "last_modified": now,
        }
        for name, data in files.items()
    )


def test_picking_a_session_in_the_dropdown_opens_it_for_the_cells_below(tmp_path):
    root = tmp_path / "root"
    Session.create("alice", root=root)
    Session.create("bob", root=root)
    picks = []
    picker = nw.SessionPicker(root, on_pick=picks.append)
    assert list(picker.dropdown.options) == ["", "alice", "bob"]
    assert picker.session is None

    picker.dropdown.value = "bob"  # what choosing "bob" in the browser does

    assert picker.session.name == "bob" and picker.session.path == root / "Sessions" / "bob"
    assert picks == [picker.session]
    assert nw.picked_session(root) is picker.session
    # The next picker for this root starts on the pick.
    assert nw.SessionPicker(root).dropdown.value == "bob"


def test_a_new_name_and_create_makes_the_session_on_the_base_model(tmp_path):
    root = tmp_path / "root"
    base = base_model_ref("tiny-sd1")
    picks = []
    picker = nw.SessionPicker(root, base, on_pick=picks.append)
    picker.new_name.value = "new subject"
    picker.create.click()
    session = Session.open("new_subject", root=root)
    assert session.manifest.base_model == base
    assert [pick.path for pick in picks] == [session.path]


def test_a_bad_pick_shows_nbkits_paragraph_and_opens_nothing(tmp_path, capsys):
    picks = []
    picker = nw.SessionPicker(tmp_path / "root", on_pick=picks.append)
    picker.new_name.value = "../escape"
    picker.create.click()
    out = capsys.readouterr().out
    # nbkit's paragraph (what is wrong, how to fix it), no traceback
    assert out.startswith("nbkit: invalid session name '../escape'") and "How to fix" in out
    assert "Traceback" not in out
    assert picker.session is None and picks == []
    assert picker.pick("") is None


def test_the_session_cell_shows_the_picker_and_stops_in_one_line_when_nothing_is_named(tmp_path, shown):
    root = tmp_path / "root"
    Session.create("alice", root=root)
    notebook.state.root, notebook.state.base_asked = root, True
    with pytest.raises(notebook.CellError) as raised:
        nb.session("")
    assert "pick a session in the list above" in str(raised.value)
    assert len(raised.value._render_traceback_()) == 1
    (picker,) = shown
    assert isinstance(picker, nw.SessionPicker)

    # Optional (fast-UI): the cell goes on without a session.
    nb.session("", required=False)
    assert notebook.state.session is None

    picker.dropdown.value = "alice"
    assert notebook.state.session.name == "alice"  # the cells below use the pick at once
    # Run again, the cell keeps the pick; a named session is opened without showing the picker.
    nb.session("")
    assert notebook.state.session.name == "alice"
    shown.clear()
    nb.session("alice")
    assert notebook.state.session.name == "alice" and shown == []


def test_uploaded_bytes_are_imported_into_the_session(tmp_path):
    session = Session.create("carol", root=tmp_path / "root")
    box = nw.UploadBox(session, crop="center")
    box.upload.value = _upload_value({"zwx (1).png": _png((200, 40, 40)), "zwx (2).png": _png((40, 40, 200))})

    session = Session.open("carol", root=tmp_path / "root")
    assert len(session.manifest.images) == 2
    assert all((session.path / image.file).is_file() for image in session.manifest.images)
    assert {image.token for image in session.manifest.images} == {"zwx"}
    assert box.upload.value == ()  # emptied, ready for more


def test_uploaded_files_reads_both_ipywidgets_value_shapes():
    data = _png((1, 2, 3))
    assert nw.uploaded_files(_upload_value({"a.png": data})) == {"a.png": data}
    # ipywidgets 7 (Colab's default): a dict by file name
    assert nw.uploaded_files({"a.png": {"metadata": {}, "content": data}}) == {"a.png": data}
    assert nw.uploaded_files(()) == {}


def test_the_images_cell_without_a_folder_offers_the_upload_box_and_says_what_to_do(tmp_path, shown):
    session = Session.create("dave", root=tmp_path / "root")
    notebook.state.session = session
    with pytest.raises(notebook.CellError) as raised:
        nb.add_images("", crop="center")
    assert "upload photos with the button above" in str(raised.value)
    (box,) = shown
    assert isinstance(box, nw.UploadBox)

    box.upload.value = _upload_value({"zwx.png": _png((10, 200, 10))})
    shown.clear()
    # Run again (or "Run all" after a disconnect): the photos are there, the box is only an option.
    nb.add_images("", crop="center")
    assert len(session.manifest.images) == 1
    assert any(isinstance(obj, nw.UploadBox) for obj in shown)


def test_the_cells_after_the_session_step_name_the_session_cell_without_a_session():
    for call in (lambda: nb.add_images("x"), notebook.train, notebook.captions, notebook.export):
        with pytest.raises(notebook.CellError, match="no session is open yet") as raised:
            call()
        assert "run the Session cell first" in str(raised.value)


def test_the_custom_model_wins_over_the_model_choice_and_both_are_checked(tmp_path):
    notebook.state.root = tmp_path
    notebook.ui_model("SD 1.5")
    assert notebook.state.model == "SD 1.5"
    single = tmp_path / "x.safetensors"
    single.write_bytes(b"")
    notebook.ui_model("sd15", custom=f" {single} ")
    assert notebook.state.model == str(single)
    with pytest.raises(notebook.CellError, match="did you mean 'sdxl'"):
        notebook.ui_model("sdxll")
    with pytest.raises(notebook.CellError, match="there is no model to show: no session is named"):
        notebook.ui_model("", custom="")
