"""Captions: tokens from file names (fast-DreamBooth convention, digits kept), .txt files, warnings, editor."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from skimage import data as skdata

from nbkit.errors import NbkitError
from nbkit.images import (
    apply_caption_files,
    caption_editor,
    check_token,
    compose_caption,
    import_images,
    set_caption,
    token_from_filename,
    token_warnings,
)
from nbkit.images.captions import caption_warnings, decode_caption_file
from nbkit.session.core import Session


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("zwx (3).jpg", "zwx"),
        ("phtmejhn (1).jpg", "phtmejhn"),
        ("r2d2 (4).jpg", "r2d2"),
        ("c3po.png", "c3po"),
        ("zwx3.jpg", "zwx3"),  # digits glued to a word are part of it
        ("zwx_12.jpg", "zwx"),
        ("zwx-3.jpg", "zwx"),
        ("zwx 3.jpg", "zwx"),
        ("zwx (1) (2).jpg", "zwx"),
        ("zwx (1) - Copy.jpg", "zwx"),
        ("zwx copy.jpg", "zwx"),
        ("my_dog (2).png", "my dog"),
        ("zwx-man (2).jpg", "zwxman"),  # fast-DreamBooth drops '-' inside names
        ("Zoë am Strand (4).jpg", "Zoë am Strand"),
        ("IMG_20230101_123456.jpg", "IMG"),
        ("12.jpg", ""),
        ("(1).jpg", ""),
        ("folder/zwx (5).jpg", "zwx"),
        ("C:\\Users\\me\\zwx (6).jpg", "zwx"),
    ],
)
def test_token_from_filename(name, token):
    assert token_from_filename(name) == token


@pytest.mark.parametrize(
    ("text", "mode", "caption"),
    [
        ("a man on a beach", "extend", "zwx a man on a beach"),
        (", smiling\n", "extend", "zwx, smiling"),
        ("zwx, smiling", "extend", "zwx, smiling"),  # already starts with the token
        ("zwxy is here", "extend", "zwx zwxy is here"),  # a longer word is not the token
        ("", "extend", "zwx"),
        ("a man on a beach", "override", "a man on a beach"),
        ("  ", "override", "zwx"),
    ],
)
def test_compose_caption(text, mode, caption):
    assert compose_caption("zwx", text, mode) == caption


def test_caption_files_decode_bom_and_notepad_encoding():
    assert decode_caption_file("\ufeffZoë lacht".encode(), "a.txt") == "Zoë lacht"
    assert decode_caption_file("Zoë lacht".encode("cp1252"), "a.txt") == "Zoë lacht"
    with pytest.raises(NbkitError, match="caption file is"):
        decode_caption_file(b"x" * 70_000, "huge.txt")


def test_token_warnings_without_a_tokenizer():
    assert check_token("zwx") == []
    assert check_token("zwx man") == []  # a class word beside a rare one is fine
    assert "'dog' is a common word" in check_token("dog")[0]
    assert "no instance token" in check_token("")[0]
    glued = token_warnings(["zwx1", "zwx2", "zwx3"])
    assert len(glued) == 1 and "differ only by a number" in glued[0]
    assert token_warnings(["r2d2", "zwx"]) == []  # two subjects with two tokens are allowed


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from nbkit.tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_token_warnings_with_a_tokenizer(tokenizer):
    assert check_token("castle") == []  # not in the built-in list
    warning = check_token("castle", tokenizer)
    assert len(warning) == 1 and "single token in the model's vocabulary" in warning[0]
    assert check_token("zwx", tokenizer) == [] and check_token("phtmejhn", tokenizer) == []
    long = "zwx " + "a castle in the mountains " * 16
    assert "caption is long" in caption_warnings(long, "zwx", tokenizer)[0]
    assert caption_warnings("zwx, smiling", "zwx", tokenizer) == []
    assert "does not contain the instance token" in caption_warnings("a man", "zwx")[0]


# ---------------------------------------------------------------- captions in a session


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def session(tmp_path) -> Session:
    session = Session.create("bob", root=tmp_path / "root")
    session.manifest.training = session.manifest.training.replace(resolution=64)
    session.save()
    cat = Image.fromarray(skdata.chelsea()).resize((96, 64))
    report = import_images(
        session,
        {"zwx (1).png": png(cat), "zwx (2).png": png(cat.rotate(180)), "zwx (2).txt": b"upside down"},
        crop="center",
    )
    assert len(report.imported) == 2
    return session


def reopen(session: Session) -> Session:
    return Session.open(session.name, root=session.path.parent.parent)


def test_set_caption_saves_session_json_and_the_txt(session):
    set_caption(session, "zwx (1)", "  zwx ,  a cat\n on a rug ")
    record = reopen(session).manifest.images[0]
    assert record.caption == "zwx, a cat on a rug" and record.caption_source == "editor"
    assert (session.path / "captions/zwx (1).txt").read_text(encoding="utf-8") == "zwx, a cat on a rug\n"
    with pytest.raises(NbkitError, match="no image named"):
        set_caption(session, "zwx (9)", "nope")
    with pytest.raises(NbkitError, match="empty caption"):
        set_caption(session, "zwx (1)", "   ")


def test_apply_caption_files_from_the_session_folder(session):
    assert [record.caption for record in session.manifest.images] == ["zwx", "zwx upside down"]
    (session.path / "captions/zwx (1).txt").write_text("sitting on a rug", encoding="utf-8")
    (session.path / "captions/stray.txt").write_text("nobody", encoding="utf-8")
    report = apply_caption_files(session)
    assert reopen(session).manifest.images[0].caption == "zwx sitting on a rug"
    assert report.row("stray.txt").status == "warning"
    again = apply_caption_files(session)  # the mirrors already hold the captions: nothing changes
    assert [record.caption for record in reopen(session).manifest.images] == [
        "zwx sitting on a rug",
        "zwx upside down",
    ]
    assert again.row("zwx (2).txt").status == "ok"
    apply_caption_files(session, mode="override")
    assert reopen(session).manifest.images[0].caption == "zwx sitting on a rug"


def test_caption_editor_saves_atomically(session):
    editor = caption_editor(session)
    assert editor.text.value == "zwx"
    assert editor.picture.value[:8] == b"\x89PNG\r\n\x1a\n"
    editor.next.click()
    assert editor.picker.value == "instance_images/zwx (2).png" and editor.text.value == "zwx upside down"
    editor.text.value = "zwx, upside down on a rug"
    editor.save_button.click()
    assert "Saved." in editor.status.value
    assert reopen(session).manifest.images[1].caption == "zwx, upside down on a rug"
    assert (session.path / "captions/zwx (2).txt").read_text(
        encoding="utf-8"
    ) == "zwx, upside down on a rug\n"
    editor.text.value = "a rug"
    editor.save_button.click()
    assert "does not contain the instance token" in editor.status.value
    editor.text.value = ""
    editor.save_button.click()
    assert "Not saved" in editor.status.value
    assert reopen(session).manifest.images[1].caption == "a rug"
    assert not list((session.path / "captions").glob(".nbkit-tmp-*"))
