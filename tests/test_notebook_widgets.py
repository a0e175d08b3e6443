"""The notebooks' session picker and upload box, driven in a plain Python process (no kernel needed).

Setting a widget's value (or clicking its button) runs the same callback the browser triggers.
"""

from __future__ import annotations

import datetime
import io
import types

import IPython
import pytest
from PIL import Image

import nbkit.notebook.cells as nb
import nbkit.notebook.widgets as nw
from nbkit.session.core import Session


@pytest.fixture(autouse=True)
def _no_picks():
    nw._picked.clear()
    yield
    nw._picked.clear()


@pytest.fixture
def shown(monkeypatch):
    """What the notebook functions display, instead of printing it."""
    objects: list = []
    monkeypatch.setattr(nb, "show", objects.append)
    return objects


@pytest.fixture
def user_ns(monkeypatch):
    """The notebook namespace of a stand-in IPython shell (what `get_ipython()` returns in a kernel)."""
    shell = types.SimpleNamespace(user_ns={})
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    return shell.user_ns


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


def test_picking_a_session_in_the_dropdown_opens_it_and_binds_the_notebook_variable(tmp_path, user_ns):
    root = tmp_path / "root"
    Session.create("alice", root=root)
    Session.create("bob", root=root)
    picker = nw.SessionPicker(root)
    assert list(picker.dropdown.options) == ["", "alice", "bob"]
    assert picker.session is None

    picker.dropdown.value = "bob"  # what choosing "bob" in the browser does

    assert picker.session.name == "bob" and picker.session.path == root / "Sessions" / "bob"
    assert user_ns["session"] is picker.session
    assert nw.picked_session(root) is picker.session
    # The next picker for this root starts on the pick.
    assert nw.SessionPicker(root).dropdown.value == "bob"


def test_a_new_name_and_create_makes_the_session_on_the_base_model(tmp_path, user_ns):
    root = tmp_path / "root"
    base = nb.base_model("tiny-sd1")
    picker = nw.SessionPicker(root, base)
    picker.new_name.value = "new subject"
    picker.create.click()
    session = Session.open("new_subject", root=root)
    assert session.manifest.base_model == base
    assert user_ns["session"].path == session.path


def test_a_bad_pick_shows_nbkits_paragraph_and_binds_nothing(tmp_path, user_ns, capsys):
    picker = nw.SessionPicker(tmp_path / "root")
    picker.new_name.value = "../escape"
    picker.create.click()
    out = capsys.readouterr().out
    # nbkit's paragraph (what is wrong, how to fix it), no traceback
    assert out.startswith("nbkit: invalid session name '../escape'") and "How to fix" in out
    assert "Traceback" not in out
    assert picker.session is None and "session" not in user_ns
    assert picker.pick("") is None


def test_the_session_cell_shows_the_picker_and_stops_in_one_line_when_nothing_is_named(tmp_path, shown):
    root = tmp_path / "root"
    Session.create("alice", root=root)
    with pytest.raises(nb.CellError) as raised:
        nb.session("", root=root)
    assert "pick a session in the list above" in str(raised.value)
    assert len(raised.value._render_traceback_()) == 1
    (picker,) = shown
    assert isinstance(picker, nw.SessionPicker)

    # Optional (fast-UI): the cell goes on without a session.
    assert nb.session("", root=root, required=False) is None

    picker.dropdown.value = "alice"
    # Run again, the cell keeps the pick; a named session is opened without showing the picker.
    assert nb.session("", root=root).name == "alice"
    shown.clear()
    assert nb.session("alice", root=root).name == "alice"
    assert shown == []


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
    with pytest.raises(nb.CellError) as raised:
        nb.add_images(session, "", crop="center")
    assert "upload photos with the button above" in str(raised.value)
    (box,) = shown
    assert isinstance(box, nw.UploadBox)

    box.upload.value = _upload_value({"zwx.png": _png((10, 200, 10))})
    shown.clear()
    # Run again (or "Run all" after a disconnect): the photos are there, the box is only an option.
    nb.add_images(session, "", crop="center")
    assert len(session.manifest.images) == 1
    assert any(isinstance(obj, nw.UploadBox) for obj in shown)


def test_the_cells_after_the_session_step_stop_in_one_line_without_a_session():
    for call in (lambda: nb.add_images(None, "x"), lambda: nb.train(None), lambda: nb.captions(None)):
        with pytest.raises(nb.CellError, match="no session is open"):
            call()


def test_the_custom_model_wins_over_the_model_choice():
    assert nb.ui_model("sd15") == "sd15"
    assert nb.ui_model("sd15", custom=" /models/x.safetensors ") == "/models/x.safetensors"
    assert nb.ui_model("", custom="") == ""
