"""The notebook cells' own rules, without a kernel: form numbers, the UI's error messages, disconnecting."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

import nbkit.notebook as nb
from nbkit.notebook.training import form_settings
from nbkit.notebook.ui_cells import _message
from nbkit.session.core import Session


@pytest.fixture(autouse=True)
def _fresh_state():
    for field in dataclasses.fields(nb.state):
        setattr(nb.state, field.name, field.default)
    yield
    for field in dataclasses.fields(nb.state):
        setattr(nb.state, field.name, field.default)


def test_form_numbers_auto_is_left_out_and_text_is_read():
    values = {
        "resolution": "auto",
        "unet_steps": "1500",
        "unet_lr": "2e-6",
        "lora_rank": None,
        "text_encoder_steps": 0,
    }
    assert form_settings(values) == {"unet_steps": 1500, "unet_lr": 2e-6, "text_encoder_steps": 0}
    assert form_settings({"resolution": " AUTO ", "checkpoint_every": ""}) == {}


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({"unet_lr": "fast"}, "UNET_LR = 'fast' is not a number"),
        ({"unet_steps": "1e3.5"}, "UNET_STEPS = '1e3.5' is not a number"),
        ({"resolution": "512.5"}, "RESOLUTION = '512.5' is not a whole number"),
    ],
)
def test_a_bad_form_number_names_its_field(values, said):
    with pytest.raises(nb.CellError, match=said):
        try:
            form_settings(values)
        except Exception as error:  # form_settings raises NbkitError; a cell shows it as CellError
            raise nb.CellError(error) from None


class _Response:
    def __init__(self, body=None, text=""):
        self.body, self.text = body, text

    def json(self):
        if self.body is None:
            raise ValueError("not JSON")
        return self.body


def test_the_uis_errors_are_shown_as_their_message_not_as_json():
    nbkit_error = {"error": "NbkitError", "detail": "sampler 'Foo' is not one nbkit knows", "errors": ""}
    assert _message(_Response(nbkit_error)) == "sampler 'Foo' is not one nbkit knows"
    field = {"detail": [{"loc": ["body", "steps"], "msg": "Input should be a valid integer", "type": "int"}]}
    assert _message(_Response(field)) == "steps: Input should be a valid integer"
    assert _message(_Response(text="Internal Server Error")) == "Internal Server Error"


def _colab(monkeypatch, calls):
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(flush_and_unmount=lambda: calls.append("flush"))
    colab.runtime = types.SimpleNamespace(unassign=lambda: calls.append("unassign"))
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_disconnect_needs_a_trained_model_and_gives_the_runtime_back_last(monkeypatch, tmp_path, capsys):
    calls: list[str] = []
    _colab(monkeypatch, calls)
    nb.disconnect(False)  # not ticked: nothing happens, not even a check
    with pytest.raises(nb.CellError, match="run the Session cell first"):
        nb.disconnect(True)
    nb.state.session = Session.create("subject", root=tmp_path)
    with pytest.raises(nb.CellError, match="has no trained model yet"):
        nb.disconnect(True)
    assert calls == []  # the runtime is never given back before the model exists
    trained = {"manifest": types.SimpleNamespace(models=["subject"]), "name": "subject"}
    nb.state.session = types.SimpleNamespace(**trained, path=tmp_path / "Sessions" / "subject")
    nb.disconnect(True)
    assert calls == ["unassign"]  # a session off Drive needs no flush
    nb.state.session = types.SimpleNamespace(**trained, path=Path("/content/drive/MyDrive/nbkit/Sessions/s"))
    nb.disconnect(True)
    assert calls == ["unassign", "flush", "unassign"]  # Drive's writes are flushed before the runtime goes
    assert "disconnecting the runtime" in capsys.readouterr().out


def test_a_second_concept_comes_from_the_photos_and_class_word_cells_run_again(monkeypatch, tmp_path, capsys):
    import io

    from PIL import Image

    from nbkit.session.concepts import concept_prompts, concepts

    monkeypatch.setenv("NBKIT_VISION_MODELS", "off")
    nb.state.session = Session.create("duo", root=tmp_path / "home")
    for folder, colour in (("zwx", (220, 30, 30)), ("qrt", (30, 200, 30))):
        (tmp_path / folder).mkdir()
        for index in range(2):
            buffer = io.BytesIO()
            Image.new("RGB", (80 + 8 * index, 80), colour).save(buffer, format="PNG")
            (tmp_path / folder / f"{folder} ({index}).png").write_bytes(buffer.getvalue())
    nb.add_images(str(tmp_path / "zwx"), crop="center")
    nb.class_images("person", 0)
    # The class word cell for a concept with no photos yet names the field that adds them.
    with pytest.raises(nb.CellError) as caught:
        nb.class_images("dog", 2, concept="dog", repeats=3)
    assert 'CONCEPT = "dog" in Settings' in str(caught.value)
    nb.add_images(str(tmp_path / "qrt"), crop="center", concept="dog")
    nb.class_images("dog", 2, concept="dog", repeats=3)
    assert "Concept 'dog': class prompt 'dog', 2 class images" in capsys.readouterr().out
    manifest = Session.open("duo", root=tmp_path / "home").manifest
    views = [
        (view.label, view.token, view.class_prompt, view.class_images, view.repeats)
        for view in concepts(manifest)
    ]
    assert views == [("first", "zwx", "person", 0, 1), ("dog", "qrt", "dog", 2, 3)]
    assert concept_prompts(manifest) == ["zwx", "qrt"]  # the training cell samples each concept
    # REMOVE_EXISTING_PHOTOS with CONCEPT set replaces that concept's photos only.
    nb.add_images(str(tmp_path / "qrt"), crop="center", concept="dog", replace=True)
    manifest = Session.open("duo", root=tmp_path / "home").manifest
    assert [(view.label, len(view.images)) for view in concepts(manifest)] == [("first", 2), ("dog", 2)]
