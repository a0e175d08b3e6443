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
