"""Automatic captions: tiny offline captioners, the subject's words in every caption, hand-written
captions kept, the CLI in a real process, bad input, and the notebook cell."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

import nbkit.notebook as nb
from nbkit.errors import NbkitError
from nbkit.images import auto_caption, import_images, insert_subject, load_captioner, set_caption
from nbkit.images._tiny_captioners import save_tiny_captioner
from nbkit.images.autocaption import class_nouns, clean_caption, resolve_captioner, subject_phrase
from nbkit.notebook.cells import captioner
from nbkit.session.core import Session


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def session(tmp_path, one_thread_local_scratch) -> Session:
    """Three photos of a cat, `zwx (2)` with a caption file; class prompt "photo of a cat"."""
    session = Session.create("bob", root=tmp_path / "root")
    training = session.manifest.training
    session.manifest.training = training.replace(
        resolution=64, prior=training.prior.replace(class_prompt="photo of a cat").to_dict()
    )
    session.save()
    cat = Image.fromarray(skdata.chelsea()).resize((96, 64))
    files = {
        "zwx (1).png": png(cat),
        "zwx (2).png": png(cat.rotate(180)),
        "zwx (2).txt": b"upside down",
        "zwx (3).png": png(cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    }
    assert len(import_images(session, files, crop="center").imported) == 3
    return session


def reopen(session: Session) -> Session:
    return Session.open(session.name, root=session.path.parent.parent)


def captions(session: Session) -> dict[str, str]:
    return {record.file.split("/")[-1]: record.caption for record in reopen(session).manifest.images}


def names(caption: str, subject: str = "zwx cat") -> bool:
    """The caption holds `subject` once, and the token nowhere else."""
    token = subject.split()[0]
    return bool(re.search(rf"(?<!\w){subject}(?!\w)", caption)) and caption.count(token) == 1


@pytest.mark.parametrize("kind", ["florence2", "blip"])
def test_tiny_captioners_put_the_token_and_class_word_in_every_caption(session, kind):
    report = auto_caption(session, f"tiny:{kind}")
    written = captions(session)
    assert written["zwx (2).png"] == "zwx upside down"  # from its .txt file: kept
    for name in ("zwx (1).png", "zwx (3).png"):
        assert names(written[name]) and len(written[name].split()) > 2
        mirror = (session.path / "captions" / name.replace(".png", ".txt")).read_text(encoding="utf-8")
        assert mirror == written[name] + "\n"
    assert "written by hand" in report.row("zwx (2).png").reason
    reopened = reopen(session)
    run = reopened.manifest.history[-1]
    assert run.kind == "captions" and run.detail["model"] == f"tiny:{kind}" and run.detail["captioned"] == 2
    sources = {
        record.file: (record.caption_source, record.caption_model) for record in reopened.manifest.images
    }
    assert sources == {
        "instance_images/zwx (1).png": ("auto", f"tiny:{kind}"),
        "instance_images/zwx (2).png": ("txt", ""),
        "instance_images/zwx (3).png": ("auto", f"tiny:{kind}"),
    }


def test_tiny_captioners_are_deterministic_and_batch_independent(one_thread_local_scratch):
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut())]
    one = load_captioner("tiny:florence2", device="cpu", batch_size=1).caption(images)
    two = load_captioner("tiny:florence2", device="cpu", batch_size=2).caption(images)
    assert one == two and all(text.strip() for text in one)


def test_hand_written_captions_are_kept_unless_overwrite(session, monkeypatch):
    set_caption(session, "zwx (3)", "zwx on a rug")  # the editor's caption
    auto_caption(session, "tiny:blip")
    first = captions(session)
    assert first["zwx (2).png"] == "zwx upside down" and first["zwx (3).png"] == "zwx on a rug"
    assert names(first["zwx (1).png"])

    # Nothing left to caption by the same model: it is not even loaded.
    monkeypatch.setattr("nbkit.images.autocaption.load_captioner", _never_loaded)
    report = auto_caption(reopen(session), "tiny:blip")
    assert "captioned by tiny:blip already" in report.row("zwx (1).png").reason
    monkeypatch.undo()

    # Another model replaces the automatic caption; an edited automatic caption is hand-written.
    edited = reopen(session)
    set_caption(edited, "zwx (1)", first["zwx (1).png"] + ", sleeping")
    auto_caption(edited, "tiny:florence2")
    assert captions(session)["zwx (1).png"] == first["zwx (1).png"] + ", sleeping"

    auto_caption(reopen(session), "tiny:florence2", overwrite=True)
    replaced = captions(session)
    assert all(names(caption) for caption in replaced.values())
    assert not set(replaced.values()) & set(first.values())


def _never_loaded(*args, **kwargs):
    raise AssertionError("the captioner was loaded with nothing to caption")


def test_a_token_only_caption_is_not_hand_written_and_a_class_word_comes_later(session):
    set_caption(session, "zwx (2)", "zwx")  # the editor, but only the file-name token
    report = auto_caption(session, "tiny:blip", class_word="")
    assert all(caption.startswith("zwx, ") for caption in captions(session).values())
    assert "no class word yet" in report.warnings[0]
    # With a class word, the same model captions again: its captions lack the subject's class.
    auto_caption(reopen(session), "tiny:blip")
    assert all(names(caption) for caption in captions(session).values())


@pytest.mark.parametrize("kind", ["florence2", "blip"])
def test_a_saved_tiny_captioner_loads_from_its_folder(tmp_path, one_thread_local_scratch, kind):
    folder = save_tiny_captioner(kind, tmp_path / kind)
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut())]
    loaded = load_captioner(str(folder), device="cpu")
    assert loaded.name == str(folder) and loaded.kind == kind
    built = load_captioner(f"tiny:{kind}", device="cpu")
    # To nbkit a folder is no tiny model, so it gets a real model's caption length.
    loaded.max_new_tokens = built.max_new_tokens
    assert loaded.caption(images) == built.caption(images)

    (folder / "model.safetensors").unlink()
    with pytest.raises(NbkitError, match="incomplete") as error:
        load_captioner(str(folder), device="cpu")
    assert "save_pretrained" in error.value.fix


def test_cli_captions_a_session_in_a_real_process(session):
    root = session.path.parents[1]
    command = [sys.executable, "-m", "nbkit", "images", "caption", "bob", "--root", str(root)]
    done = subprocess.run(
        [*command, "--model", "tiny:blip", "--class-word", "dog", "--overwrite", "--batch-size", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Automatic captions (tiny:blip)" in done.stdout and "3 ok" in done.stdout
    assert all(names(caption, "zwx dog") for caption in captions(session).values())


def test_cli_refuses_an_unknown_model_name(session, capsys):
    from nbkit.cli import main

    code = main(["images", "caption", "bob", "--root", str(session.path.parents[1]), "--model", "florence"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown captioning model 'florence'" in err and "did you mean florence2?" in err


def test_bad_input_is_named_with_its_fix(tmp_path):
    with pytest.raises(NbkitError, match="did you mean tiny:blip"):
        resolve_captioner("tiny:blib")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NbkitError, match=r"no config\.json") as error:
        resolve_captioner(str(tmp_path / "empty"))
    assert "save_pretrained" in error.value.fix
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}', encoding="utf-8")
    with pytest.raises(NbkitError, match="is a vit model, not a captioner"):
        load_captioner(str(tmp_path / "vit"), device="cpu")
    with pytest.raises(NbkitError, match="no such folder"):
        resolve_captioner(str(tmp_path / "missing" / "model"))
    with pytest.raises(NbkitError, match="HF_HUB_OFFLINE is set") as error:
        load_captioner("nobody/no-such-captioner", device="cpu")
    assert "local folder" in error.value.fix and "connect" in error.value.fix
    assert resolve_captioner("Florence-2") == "florence-community/Florence-2-base"
    assert resolve_captioner("blip") == "Salesforce/blip-image-captioning-large"

    empty = Session.create("empty", root=tmp_path / "root")
    with pytest.raises(NbkitError, match="no instance images") as error:
        auto_caption(empty, "tiny:blip")
    assert "nbkit images add" in error.value.fix


def test_notebook_cell_honours_nbkit_vision_models(session, monkeypatch, capsys):
    monkeypatch.setenv("NBKIT_VISION_MODELS", "tiny")
    assert captioner("florence2") == "tiny:florence2" and captioner("blip") == "tiny:blip"
    assert captioner("someone/captioner") == "tiny:florence2" and captioner("off") is None
    monkeypatch.setenv("NBKIT_VISION_MODELS", "default")
    assert captioner("florence2") == "florence2" and captioner("") is None
    monkeypatch.setenv("NBKIT_VISION_MODELS", "off")
    assert captioner("florence2") is None

    for field in dataclasses.fields(nb.state):
        monkeypatch.setattr(nb.state, field.name, field.default)
    with pytest.raises(nb.CellError, match="run the Session cell first"):
        nb.auto_captions("florence2")
    nb.state.session = session
    nb.auto_captions("florence2")
    assert "Automatic captions are off" in capsys.readouterr().out
    monkeypatch.setenv("NBKIT_VISION_MODELS", "tiny")
    nb.auto_captions("blip")
    assert "Automatic captions (tiny:blip)" in capsys.readouterr().out
    assert names(captions(session)["zwx (1).png"])


# ---------------------------------------------------------------- the insertion rule


@pytest.mark.parametrize(
    ("text", "class_word", "caption"),
    [
        ("a dog on a beach", "dog", "a zwx dog on a beach"),
        ("two dogs and a Dog", "dog", "two zwx dog and a Dog"),
        ("a puppy in the snow", "dog", "a zwx dog in the snow"),
        ("a man in a suit", "person", "a zwx person in a suit"),
        ("two women, smiling", "woman", "two zwx woman, smiling"),
        ("a woman in a suit", "man", "zwx man, a woman in a suit"),  # "man" inside "woman" is no mention
        ("a hotdog stand", "dog", "zwx dog, a hotdog stand"),
        ("a dog-friendly cafe", "dog", "zwx dog, a dog-friendly cafe"),
        ("zwx on a beach with a dog", "dog", "zwx dog on a beach with a dog"),  # the token goes first
        ("a zwx dog on a beach", "dog", "a zwx dog on a beach"),
        ("a dog on a beach", "", "zwx, a dog on a beach"),
        ("", "dog", "zwx dog"),
    ],
)
def test_insert_subject(text, class_word, caption):
    assert insert_subject(text, "zwx", class_word) == caption


def test_insert_subject_edge_cases():
    assert insert_subject("a dog", "", "dog") == "a dog"  # no token: nothing to insert
    assert insert_subject("a dog on a rug", "my dog", "dog") == "a my dog on a rug"
    assert subject_phrase("zwx", "teddy bear") == "zwx teddy bear"
    assert insert_subject("two teddy bears", "zwx", "teddy bear") == "two zwx teddy bear"
    assert {"people", "men", "women", "human"} <= set(class_nouns("person"))
    assert class_nouns("person")[0] in ("gentleman", "gentlemen")  # longest first


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("The image shows a dog sitting on a beach.", "a dog sitting on a beach"),
        ("In this image we can see a cat.", "a cat"),
        ("arafed man in a suit  , smiling", "man in a suit, smiling"),
        ("a dog. It is sleeping...", "a dog. It is sleeping..."),
    ],
)
def test_clean_caption(text, clean):
    assert clean_caption(text) == clean


_WORDS = ["a", "the", "on", "beach", "Dog", "dogs", "puppy,", "cat.", "kittens", "man", "men", "woman",
          "women", "human", "person", "people", "hotdog", "dog-friendly", "(dog)", "manta", ",", "sunny"]  # fmt: skip


@given(
    words=st.lists(st.sampled_from(_WORDS), max_size=12),
    token=st.from_regex(r"[qxz]{2,5}", fullmatch=True),
    class_word=st.sampled_from(["dog", "cat", "person", "man", "woman", ""]),
)
def test_insert_subject_puts_the_subject_in_once_and_changes_nothing_else(words, token, class_word):
    text = " ".join(words)
    caption = insert_subject(text, token, class_word)
    subject = subject_phrase(token, class_word)
    assert len(re.findall(rf"(?<![\w-]){token}(?![\w-])", caption)) == 1
    if class_word:
        assert re.search(rf"(?<![\w-]){token} {class_word}(?![\w-])", caption)
    if not any(_mentions(word, class_word) for word in words):
        assert caption == (f"{subject}, {text}" if text else subject)
    else:  # the first mention of the class became the subject
        before, _, after = caption.partition(subject)
        assert text.startswith(before) and text.endswith(after)
        replaced = text[len(before) : len(text) - len(after)]
        assert replaced.casefold() in class_nouns(class_word)
        assert not any(_mentions(word, class_word) for word in before.split())
    assert insert_subject(caption, token, class_word) == caption


def _mentions(word: str, class_word: str) -> bool:
    return bool(class_word) and word.strip(",.()").casefold() in class_nouns(class_word)


def test_the_caption_editors_button_writes_a_caption_to_edit_and_saves_nothing_itself(session, monkeypatch):
    from nbkit.images import caption_editor

    assert len(caption_editor(session).widget.children[4].children) == 1  # no model: no button
    editor = caption_editor(session, captioner="tiny:florence2")
    editor.next.click()  # zwx (2), captioned "zwx upside down" from its .txt file
    before = captions(session)
    editor.write_button.click()
    written = editor.text.value
    assert written.startswith("zwx cat") and written != "zwx upside down", editor.status.value
    assert "then Save caption" in editor.status.value
    assert captions(session) == before  # only in the text box until saved
    loads = []
    monkeypatch.setattr("nbkit.images.autocaption.load_captioner", lambda *a, **k: loads.append(a))
    editor.next.click()
    editor.write_button.click()  # the model loaded on the first click is kept
    assert loads == [] and editor.text.value.startswith("zwx cat")
    editor.previous.click()
    editor.text.value = written
    editor.save_button.click()
    record = reopen(session).manifest.images[1]
    assert (record.caption, record.caption_source) == (written, "editor")
