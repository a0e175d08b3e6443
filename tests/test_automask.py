"""Automatic subject masks: the tiny offline CLIPSeg masks a session, masks from files are kept, the
rule that turns CLIPSeg's map into a mask, the CLI in a real process, bad input, and the notebook cell."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import nbkit.notebook as nb
from nbkit.errors import NbkitError
from nbkit.images import auto_mask, import_images, load_masker
from nbkit.images._tiny_segmenters import save_tiny_segmenter
from nbkit.images.automask import DILATION, SubjectMasker, resolve_segmenter, soft_mask
from nbkit.session.core import Session


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def cat() -> Image.Image:
    return Image.fromarray(skdata.chelsea()).resize((96, 64))


def given_mask() -> Image.Image:
    mask = Image.new("L", (96, 64))
    mask.paste(255, (30, 10, 70, 60))
    return mask


@pytest.fixture
def session(tmp_path, one_thread_local_scratch) -> Session:
    """Three photos of a cat, `zwx (2)` with a mask file and `zwx (3)` a JPEG turned upright by EXIF;
    class prompt "photo of a cat"."""
    session = Session.create("bob", root=tmp_path / "root")
    training = session.manifest.training
    session.manifest.training = training.replace(
        resolution=64, prior=training.prior.replace(class_prompt="photo of a cat").to_dict()
    )
    session.save()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: upright it is 64x96
    files = {
        "zwx (1).png": encode(cat()),
        "zwx (2).png": encode(cat().rotate(180)),
        "zwx (2).mask.png": encode(given_mask()),
        "zwx (3).jpg": encode(cat(), "JPEG", exif=exif),
    }
    assert len(import_images(session, files, crop="center").imported) == 3
    return session


def reopen(session: Session) -> Session:
    return Session.open(session.name, root=session.path.parents[1])


def records(session: Session) -> dict[str, object]:
    return {record.file.split("/")[-1]: record for record in reopen(session).manifest.images}


def test_tiny_clipseg_masks_each_photo_without_a_mask(session):
    given = (session.path / records(session)["zwx (2).png"].mask_original).read_bytes()
    report = auto_mask(session, "tiny:clipseg")
    assert report.title.startswith('Automatic masks (tiny:clipseg, "cat")') and not report.failed
    assert "from a file" in report.row("zwx (2).png").reason
    assert "mask covers" in report.row("zwx (1).png").reason
    assert report.contact_sheet is not None and report.contact_sheet.is_file()
    assert "masked loss is off" in report.warnings[0]
    found = records(session)
    for name, upright in (("zwx (1).png", (96, 64)), ("zwx (2).png", (96, 64)), ("zwx (3).png", (64, 96))):
        record = found[name]
        assert record.mask_source == ("file" if name == "zwx (2).png" else "auto")
        processed = Image.open(session.path / record.mask)
        original = Image.open(session.path / record.mask_original)
        assert processed.mode == original.mode == "L"
        assert processed.size == (record.width, record.height) == Image.open(session.path / record.file).size
        assert original.size == upright  # the mask of the upright original
        assert 0 <= np.asarray(original).min() <= np.asarray(original).max() <= 255
    assert (session.path / found["zwx (2).png"].mask_original).read_bytes() == given
    run = reopen(session).manifest.history[-1]
    assert run.kind == "masks" and run.detail["model"] == "tiny:clipseg" and run.detail["prompt"] == "cat"
    assert run.detail["masked"] == 2


def test_masks_from_files_are_kept_unless_overwrite(session, monkeypatch):
    auto_mask(session, "tiny:clipseg")
    first = {
        name: (session.path / record.mask_original).read_bytes() for name, record in records(session).items()
    }

    # Every photo has a mask now: the model is not even loaded.
    monkeypatch.setattr("nbkit.images.automask.load_masker", _never_loaded)
    report = auto_mask(reopen(session), "tiny:clipseg")
    assert "masked automatically already" in report.row("zwx (1).png").reason
    assert "from a file" in report.row("zwx (2).png").reason
    monkeypatch.undo()

    auto_mask(reopen(session), "tiny:clipseg", prompt="kitten", overwrite=True)
    found = records(session)
    assert {record.mask_source for record in found.values()} == {"auto"}
    assert (session.path / found["zwx (2).png"].mask_original).read_bytes() != first["zwx (2).png"]
    assert reopen(session).manifest.history[-1].detail == {
        "model": "tiny:clipseg",
        "prompt": "kitten",
        "threshold": 0.3,
        "masked": 3,
    }


def _never_loaded(*args, **kwargs):
    raise AssertionError("the segmenter was loaded with nothing to mask")


def test_a_failed_save_leaves_files_and_manifest_as_they_were(session, monkeypatch):
    before = records(session)
    given = (session.path / before["zwx (2).png"].mask_original).read_bytes()

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        auto_mask(session, "tiny:clipseg", overwrite=True)
    assert [dataclasses.asdict(record) for record in session.manifest.images] == [
        dataclasses.asdict(record) for record in before.values()
    ]
    assert (session.path / before["zwx (2).png"].mask_original).read_bytes() == given
    assert sorted(path.name for path in (session.path / "instance_images" / "masks").iterdir()) == [
        "zwx (2).png"
    ]


def test_a_photo_where_clipseg_finds_nothing_gets_no_mask(session, monkeypatch):
    monkeypatch.setattr(
        SubjectMasker, "probabilities", lambda self, images, prompt: [np.zeros((64, 64))] * len(images)
    )
    report = auto_mask(session, "tiny:clipseg")
    row = report.row("zwx (1).png")
    assert row.status == "warning" and 'found no "cat"' in row.reason and "counts whole" in row.reason
    assert "zwx (1).mask.png" in row.fix
    assert records(session)["zwx (1).png"].mask == "" and report.contact_sheet is None


def test_soft_mask_rule():
    # A disc CLIPSeg is sure of on a background it is sure is none, with an unsure rim.
    yy, xx = np.mgrid[:100, :100]
    distance = np.hypot(yy - 50, xx - 50)
    probabilities = np.where(distance < 20, 0.9, np.where(distance < 25, 0.4, 0.05))
    mask = np.asarray(soft_mask(probabilities, (400, 200)))
    assert mask.shape == (200, 400) and mask.dtype == np.uint8
    assert mask[100, 200] == 255 and mask[5, 5] == 0 and mask[100, 5] == 0
    # The subject grows by DILATION of the short side: past the sure disc (80 px across at 4x, 40 down
    # at 2x), the unsure rim counts in part.
    grow = round(DILATION * 200)
    row = mask[100]
    assert row[200 + 80 + grow - 2] > 0 and 0 < row[200 + 90] < 255
    # Below the threshold is background; a higher threshold makes the unsure rim background too.
    tight = np.asarray(soft_mask(probabilities, (400, 200), threshold=0.45))
    assert (tight <= mask).all() and tight[100, 200 + 90] == 0
    assert np.asarray(soft_mask(np.full((8, 8), 0.3), (10, 10))).max() == 0
    assert np.asarray(soft_mask(np.full((8, 8), 0.5), (10, 10))).min() == 255


def test_a_saved_tiny_clipseg_loads_from_its_folder(tmp_path, one_thread_local_scratch):
    folder = save_tiny_segmenter("clipseg", tmp_path / "clipseg")
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut())]
    loaded = load_masker(str(folder), device="cpu", batch_size=1)
    built = load_masker("tiny:clipseg", device="cpu", batch_size=2)
    assert loaded.name == str(folder) and built.name == "tiny:clipseg"
    # The same weights: the maps agree but for float rounding (a batch of one sums in another order).
    for one, two in zip(loaded.probabilities(images, "cat"), built.probabilities(images, "cat"), strict=True):
        np.testing.assert_allclose(one, two, atol=1e-4)
    assert [mask.size for mask in loaded.masks(images, "cat")] == [image.size for image in images]
    (folder / "model.safetensors").unlink()
    with pytest.raises(NbkitError, match="masking model in this folder is incomplete"):
        load_masker(str(folder), device="cpu")


def test_no_class_word_and_no_prompt_is_named_with_its_fix(tmp_path, one_thread_local_scratch):
    session = Session.create("nameless", root=tmp_path / "root", resolution=64)
    import_images(session, {"zwx.png": encode(cat())}, crop="center")
    with pytest.raises(NbkitError, match="no class word") as error:
        auto_mask(session, "tiny:clipseg")
    assert "CLASS_WORD" in error.value.fix and "--prompt" in error.value.fix
    report = auto_mask(session, "tiny:clipseg", prompt="cat")
    assert report.title.startswith('Automatic masks (tiny:clipseg, "cat")')
    assert session.manifest.images[0].mask_source == "auto"


def test_bad_input_is_named_with_its_fix(tmp_path, session):
    with pytest.raises(NbkitError, match="unknown masking model 'clipsag'") as error:
        resolve_segmenter("clipsag")
    assert "did you mean clipseg?" in error.value.fix
    with pytest.raises(NbkitError, match="did you mean tiny:clipseg"):
        resolve_segmenter("tiny:clipsag")
    assert resolve_segmenter("CLIPSeg") == "CIDAS/clipseg-rd64-refined"
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}', encoding="utf-8")
    with pytest.raises(NbkitError, match="is a vit model, not a CLIPSeg model"):
        load_masker(str(tmp_path / "vit"), device="cpu")
    with pytest.raises(NbkitError, match="HF_HUB_OFFLINE is set"):
        load_masker("nobody/no-such-segmenter", device="cpu")
    with pytest.raises(NbkitError, match="threshold"):
        auto_mask(session, "tiny:clipseg", threshold=1.5)
    with pytest.raises(NbkitError, match="no instance images to mask"):
        auto_mask(Session.create("empty", root=tmp_path / "root"), "tiny:clipseg")


def test_cli_masks_a_session_in_a_real_process(session):
    root = session.path.parents[1]
    command = [sys.executable, "-m", "nbkit", "images", "mask", "bob", "--root", str(root)]
    done = subprocess.run(
        [*command, "--model", "tiny:clipseg", "--prompt", "dog", "--overwrite", "--batch-size", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert 'Automatic masks (tiny:clipseg, "dog")' in done.stdout
    assert {record.mask_source for record in records(session).values()} == {"auto"}


def test_cli_refuses_an_unknown_model_name(session, capsys):
    from nbkit.cli import main

    code = main(["images", "mask", "bob", "--root", str(session.path.parents[1]), "--model", "clipsag"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown masking model 'clipsag'" in err and "did you mean clipseg?" in err


def test_notebook_cell_honours_nbkit_vision_models(session, monkeypatch, capsys):
    for field in dataclasses.fields(nb.state):
        monkeypatch.setattr(nb.state, field.name, field.default)
    with pytest.raises(nb.CellError, match="run the Session cell first"):
        nb.auto_masks("clipseg")
    nb.state.session = session
    nb.auto_masks()
    assert "Automatic masks are off" in capsys.readouterr().out
    monkeypatch.setenv("NBKIT_VISION_MODELS", "off")
    nb.auto_masks("clipseg")
    assert "Automatic masks are off" in capsys.readouterr().out
    monkeypatch.setenv("NBKIT_VISION_MODELS", "tiny")
    nb.auto_masks("clipseg")
    assert 'Automatic masks (tiny:clipseg, "cat")' in capsys.readouterr().out
    assert records(session)["zwx (1).png"].mask_source == "auto"
