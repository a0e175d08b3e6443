"""`nbkit images add|list|crop|captions|remove` end to end through the CLI entry point."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as skdata

from nbkit.cli import main
from nbkit.session.core import Session


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()).save(folder / "zwx (1).jpg", quality=90)
    Image.fromarray(skdata.chelsea()).save(folder / "zwx (2).png")
    (folder / "zwx (2).txt").write_text("a cat", encoding="utf-8")
    (folder / "broken.jpg").write_bytes(b"not really")
    return folder


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["images", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_round_trip(tmp_path, photos, capsys):
    root = tmp_path / "root"
    Session.create("carol", root=root)
    code, out = run(capsys, "add", "carol", photos, "--root", root, "--resolution", 64)
    assert code == 1  # one file was refused
    assert "broken.jpg" in out and "not an image" in out and "3 ok, 1 error" in out  # 2 photos, 1 caption

    code, out = run(capsys, "list", "carol", "--root", root)
    assert code == 0 and 'caption "zwx a cat"' in out and "face crop" in out

    code, out = run(capsys, "captions", "carol", "--root", root, "--set", "zwx (1)", "zwx in a spacesuit")
    assert code == 0 and '"zwx in a spacesuit"' in out
    (root / "Sessions/carol/captions/zwx (2).txt").write_text("a tabby cat", encoding="utf-8")
    code, out = run(capsys, "captions", "carol", "--root", root, "--apply")
    assert code == 0 and '"zwx a tabby cat"' in out

    code, out = run(
        capsys, "crop", "carol", "zwx (2)", "--root", root, "--crop", "center", "--resolution", 64
    )
    assert code == 0 and "center crop" in out
    code, out = run(
        capsys, "crop", "carol", "zwx (2)", "--root", root, "--box", "0,0,300,300", "--resolution", 64
    )
    assert code == 0

    code, out = run(capsys, "remove", "carol", "--root", root)
    assert code == 2 and "--all" in out
    code, out = run(capsys, "remove", "carol", "zwx (1).png", "--root", root)
    assert code == 0 and "removed" in out

    captions = [record.caption for record in Session.open("carol", root=root).manifest.images]
    assert captions == ["zwx a tabby cat"]


def test_cli_errors_are_one_paragraph(tmp_path, capsys):
    code, out = run(capsys, "list", "nobody", "--root", tmp_path)
    assert code == 2 and "there is no session named 'nobody'" in out and "Traceback" not in out
    Session.create("dave", root=tmp_path)
    code, out = run(capsys, "add", "dave", tmp_path / "x.jpg", "--root", tmp_path, "--resolution", 100)
    assert code == 2 and "not a multiple of 64" in out
