"""Instance-image import on a corpus of real photos and malformed files that the tests build.

The photos are scikit-image's public-domain `astronaut` (a portrait) and `chelsea` (a cat); the
malformed files are made byte by byte here, so every failure mode users hit is reproduced exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from nbkit.errors import NbkitError
from nbkit.images import check_image, import_images, list_images, pixel_sha256, recrop_images, remove_images
from nbkit.images.checks import BadImageError
from nbkit.session.core import Session
from nbkit.session.manifest import BaseModelRef

RESOLUTION = 128


# ---------------------------------------------------------------- corpus builders


def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def header_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG that claims `width` x `height` RGB pixels but holds a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def two_colour(width: int = 240, height: int = 120) -> Image.Image:
    """Left half red, right half blue: any rotation shows in where the colours end up."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(two_colour(), "JPEG", quality=95, exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 160).astype(np.uint16), (120, 1))
    return encode(Image.fromarray(ramp), "PNG")


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (160, 120), 0)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.paste(1, (40, 30, 120, 90))
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (160, 120), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(chelsea().convert("CMYK"), "JPEG", quality=90)


def corpus() -> dict[str, bytes]:
    """Every kind of file users upload, keyed by the name they upload it under."""
    portrait = encode(astronaut(), "JPEG", quality=92)
    portrait_pixels = Image.open(io.BytesIO(portrait)).convert("RGB")
    return {
        "zwx (1).jpg": portrait,
        "zwx (2).png": encode(chelsea(), "PNG"),
        "zwx (1) - Copy.jpg": portrait,  # the same file again
        "zwx same pixels.png": encode(portrait_pixels, "PNG"),  # same picture, other container
        "truncated.jpg": portrait[: len(portrait) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"remember to buy milk\n",
        "page.jpg": b"<!DOCTYPE html><html><body>nope</body></html>",
        "iphone.jpg": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        "bomb.png": header_bomb(20000, 20000),
        "cmyk.jpg": cmyk_jpeg(),
        "deep.png": sixteen_bit_png(),
        "palette.png": palette_png_with_transparency(),
        "animated.gif": animated_gif(),
        "rotated.jpg": exif_rotated_jpeg(),
        "small.png": encode(chelsea().resize((90, 60)), "PNG"),
        "Zoë am Strand (4).jpg": encode(chelsea().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"),
        "  lots   of  spaces (5) .png": encode(astronaut().rotate(90), "PNG"),
        "tab\tand\x07bell (6).png": encode(chelsea().rotate(180), "PNG"),
    }


BAD = {
    "truncated.jpg": "truncated or corrupt",
    "empty.jpg": "empty file",
    "notes.jpg": "not an image: the file holds text",
    "page.jpg": "web page",
    "iphone.jpg": "HEIC",
    "bomb.png": "too large",
}
DUPLICATES = {"zwx (1) - Copy.jpg", "zwx same pixels.png"}


def write_corpus(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = corpus()
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return files


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with the sha256 of its bytes ('dir' for folders)."""
    digest = {}
    for directory, folders, files in os.walk(root):
        for name in folders:
            digest[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            digest[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest


@pytest.fixture
def session(tmp_path) -> Session:
    session = Session.create("alice", root=tmp_path / "root")
    session.manifest.training = session.manifest.training.replace(resolution=RESOLUTION)
    session.save()
    return session


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The whole corpus imported once from a folder (what a Drive import does)."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "photos")
    session = Session.create("corpus", root=root / "store")
    session.manifest.training = session.manifest.training.replace(resolution=RESOLUTION)
    session.save()
    report = import_images(session, [root / "photos"])
    return session, report


# ---------------------------------------------------------------- the corpus import


def test_each_bad_file_gets_its_reason_and_good_ones_are_imported(imported):
    session, report = imported
    for name, reason in BAD.items():
        row = report.row(name)
        assert row.status == "error", (name, row)
        assert reason in row.reason, (name, row.reason)
        assert row.fix, name
    for name in DUPLICATES:
        assert report.row(name).status == "duplicate"
        assert "same picture as zwx (1).png" in report.row(name).reason
    good = set(corpus()) - set(BAD) - DUPLICATES
    imported_sources = {Path(row.file).name for row in report.imported}
    assert imported_sources == good
    assert len(session.manifest.images) == len(good)
    for record in session.manifest.images:
        processed = Image.open(session.path / record.file)
        assert processed.size == (RESOLUTION, RESOLUTION) and processed.mode == "RGB"
        assert (session.path / record.original).is_file()


def test_session_json_records_the_images(imported):
    session, _ = imported
    reopened = Session.open(session.name, root=session.path.parent.parent)
    assert [record.to_dict() for record in reopened.manifest.images] == [
        record.to_dict() for record in session.manifest.images
    ]
    files = {record.file for record in reopened.manifest.images}
    assert "instance_images/zwx (1).png" in files
    assert reopened.manifest.history[-1].kind == "images"
    assert reopened.manifest.history[-1].detail["imported"] == len(files)


def test_conversions_are_applied_and_noted(imported):
    session, report = imported
    records = {Path(record.original).name: record for record in session.manifest.images}
    assert "CMYK converted to RGB" in report.row("cmyk.jpg").reason
    assert "16-bit image reduced to 8 bits" in report.row("deep.png").reason
    assert "transparent areas filled with white" in report.row("palette.png").reason
    assert "animated (3 frames)" in report.row("animated.gif").reason
    assert "turned upright (EXIF orientation 6)" in report.row("rotated.jpg").reason

    deep = np.asarray(Image.open(session.path / records["deep.png"].file))
    # a ramp scaled to 8 bits (clipping would make it nearly all white): dark left, bright right
    assert deep[:, 0].max() < 80 and deep[:, -1].min() > 175

    palette = np.asarray(Image.open(session.path / records["palette.png"].file))
    assert palette[2, 2].tolist() == [255, 255, 255]  # transparent -> white
    assert palette[RESOLUTION // 2, RESOLUTION // 2].tolist() == [0, 200, 0]

    gif = np.asarray(Image.open(session.path / records["animated.gif"].file))
    assert gif[RESOLUTION // 2, RESOLUTION // 2].tolist() == [250, 0, 0]  # the first frame

    cmyk = np.asarray(Image.open(session.path / records["cmyk.jpg"].file)).astype(int)
    assert cmyk.std() > 20  # a real picture, not a flat inverted mess


def test_exif_rotation_is_applied(imported):
    session, _ = imported
    record = next(record for record in session.manifest.images if record.original.endswith("rotated.jpg"))
    assert (record.original_width, record.original_height) == (120, 240)  # stored 240x120, shown upright
    processed = np.asarray(Image.open(session.path / record.file)).astype(int)
    # Orientation 6 turns the stored left (red) side to the top.
    assert processed[5, RESOLUTION // 2].tolist() == pytest.approx([255, 0, 0], abs=40)
    assert processed[-5, RESOLUTION // 2].tolist() == pytest.approx([0, 0, 255], abs=40)


def test_portrait_is_face_cropped(imported):
    session, _ = imported
    record = next(
        record for record in session.manifest.images if record.file == "instance_images/zwx (1).png"
    )
    assert record.focus == "face" and record.crop == "smart"
    left, top, right, bottom = record.crop_box
    face_left, face_top, face_right, face_bottom = record.face_box
    assert left <= face_left < face_right <= right and top <= face_top < face_bottom <= bottom
    assert abs(face_left - 177) < 15 and abs(face_top - 66) < 15


def test_common_word_token_is_warned_about(session):
    report = import_images(session, {"dog (1).png": encode(chelsea(), "PNG")}, crop="center")
    assert len(report.warnings) == 1 and "'dog' is a common word" in report.warnings[0]
    assert "warning: instance token 'dog'" in str(report)


def test_small_image_is_kept_with_a_warning(imported):
    session, report = imported
    row = report.row("small.png")
    assert row.status == "warning" and "smaller than the 128 px training size" in row.reason
    record = next(record for record in session.manifest.images if record.original.endswith("small.png"))
    assert any(note.startswith("warning: ") for note in record.notes)


def test_unicode_and_space_names_survive(imported):
    session, _ = imported
    files = {Path(record.file).name: record for record in session.manifest.images}
    assert "Zoë am Strand (4).png" in files
    assert files["Zoë am Strand (4).png"].caption == "Zoë am Strand"
    assert "lots   of  spaces (5).png" in files  # leading spaces trimmed, inner ones kept
    assert files["lots   of  spaces (5).png"].token == "lots of spaces"
    assert "tabandbell (6).png" in files  # control characters removed


def test_captions_follow_the_convention(imported):
    session, _ = imported
    captions = {Path(record.file).name: record.caption for record in session.manifest.images}
    assert captions["zwx (1).png"] == "zwx"
    assert captions["zwx (2).png"] == "zwx"
    assert captions["cmyk.png"] == "cmyk"
    for record in session.manifest.images:
        mirror = session.path / "captions" / f"{Path(record.file).stem}.txt"
        assert mirror.read_text(encoding="utf-8") == record.caption + "\n"


def test_contact_sheet_is_written(imported):
    session, report = imported
    assert report.contact_sheet == session.path / "contact_sheet.png"
    sheet = Image.open(report.contact_sheet)
    assert sheet.width > 160 * 3 and sheet.height > 160 * 3


def test_report_renders_as_text_and_html(imported):
    _, report = imported
    text = str(report)
    assert "bomb.png" in text and "error" in text and "contact sheet" in text
    markup = report._repr_html_()
    assert markup.count("<tr>") == len(report.rows) + 1
    assert "Zoë am Strand (4).jpg" in markup


def test_report_html_escapes_file_names():
    from nbkit.images.report import ImageReport

    report = ImageReport(title="Import")
    report.add("<img src=x onerror=alert(1)>.jpg", "error", "not an image", fix="use <b>JPEG</b>")
    markup = report._repr_html_()
    assert "<img" not in markup and "&lt;img src=x" in markup and "&lt;b&gt;JPEG" in markup
    assert "1 error" in str(report)


# ---------------------------------------------------------------- nothing else changes


def test_failed_import_changes_nothing(session, tmp_path):
    import_images(session, [("zwx (1).jpg", encode(astronaut(), "JPEG"))])
    before = tree_digest(session.path)
    files = corpus()
    bad = [(name, files[name]) for name in BAD] + [("again.jpg", encode(astronaut(), "JPEG"))]
    report = import_images(session, bad)
    assert {row.status for row in report.rows} == {"error", "duplicate"}
    assert tree_digest(session.path) == before


def test_mixed_import_only_adds(session):
    import_images(session, [("zwx (1).jpg", encode(astronaut(), "JPEG")), ("zwx (1).txt", b"smiling")])
    before = tree_digest(session.path)
    old_records = [record.to_dict() for record in session.manifest.images]
    files = corpus()
    import_images(session, [("zwx (1).png", files["zwx (2).png"]), ("empty.jpg", b"")])
    after = tree_digest(session.path)
    rewritten = {"session.json", "session.json.bak", "contact_sheet.png"}
    assert {key: value for key, value in before.items() if key not in rewritten} == {
        key: after[key] for key in before if key not in rewritten
    }
    assert [record.to_dict() for record in session.manifest.images[:1]] == old_records
    # the clash of names got a counter, and the token is still zwx
    assert session.manifest.images[1].file == "instance_images/zwx (1) (2).png"
    assert session.manifest.images[1].caption == "zwx"
    assert session.manifest.images[0].caption == "zwx smiling"


def test_crash_mid_import_rolls_back(session, monkeypatch):
    import nbkit.images.importing as importing

    import_images(session, [("zwx (1).jpg", encode(astronaut(), "JPEG"))])
    before = tree_digest(session.path)
    calls = []
    real = importing.encode_png

    def failing(image):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(image)

    monkeypatch.setattr(importing, "encode_png", failing)
    photos = [("zwx (2).png", encode(chelsea(), "PNG")), ("zwx (3).png", encode(chelsea().rotate(90), "PNG"))]
    with pytest.raises(OSError, match="No space"):
        import_images(session, photos)
    assert tree_digest(session.path) == before
    assert len(session.manifest.images) == 1


def test_failed_save_rolls_back(session, monkeypatch):
    before = tree_digest(session.path)

    def broken_save():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(session, "save", broken_save)
    with pytest.raises(OSError):
        import_images(session, [("zwx (1).jpg", encode(astronaut(), "JPEG"))])
    assert tree_digest(session.path) == before
    assert session.manifest.images == [] and session.manifest.history == []


# ---------------------------------------------------------------- other sources


def test_zip_import_with_captions_and_junk(session, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("trip/zwx (1).jpg", encode(astronaut(), "JPEG"))
        zipped.writestr("trip/zwx (1).txt", "on the moon")
        zipped.writestr("trip/Zoë (2).png", encode(chelsea(), "PNG"))
        zipped.writestr("__MACOSX/trip/._zwx (1).jpg", b"\x00\x05\x16\x07junk")
        zipped.writestr("trip/.DS_Store", b"junk")
    report = import_images(session, [archive], captions="override")
    assert [Path(row.file).name for row in report.imported] == ["Zoë (2).png", "zwx (1).jpg"]
    assert not report.failed
    captions = {Path(record.file).name: record.caption for record in session.manifest.images}
    assert captions == {"zwx (1).png": "on the moon", "Zoë (2).png": "Zoë"}


def test_uploads_mapping_and_late_caption(session):
    uploads = {"zwx (1).jpg": encode(astronaut(), "JPEG")}  # what Colab's files.upload() returns
    import_images(session, uploads)
    report = import_images(session, {"zwx (1).txt": b", in a spacesuit"})
    assert report.rows[0].status == "ok" and "caption for zwx (1).png" in report.rows[0].reason
    assert session.manifest.images[0].caption == "zwx, in a spacesuit"
    assert session.manifest.images[0].caption_source == "txt"
    report = import_images(session, {"nobody.txt": b"hello"})
    assert report.rows[0].status == "warning" and "matches no image" in report.rows[0].reason


def test_missing_path_and_unsupported_link(session, tmp_path):
    report = import_images(session, [tmp_path / "nowhere", "ftp://example.invalid/a.jpg"])
    assert [row.status for row in report.rows] == ["error", "error"]
    assert "no such file or folder" in report.rows[0].reason
    assert "ftp:// links are not supported" in report.rows[1].reason


def test_oversized_file_is_refused(session):
    report = import_images(session, [("zwx (1).png", encode(chelsea(), "PNG"))], max_bytes=1000)
    assert report.rows[0].status == "error" and "larger than" in report.rows[0].reason


# ---------------------------------------------------------------- checks on their own


def test_header_bombs_are_refused_without_allocating():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImageError, match="too large"):
        check_image(header_bomb(20000, 20000), name="pillow-limit.png")  # beyond Pillow's own guard
    with pytest.raises(BadImageError, match="over the 120-megapixel limit"):
        check_image(header_bomb(11000, 11000), name="our-limit.png")  # between Pillow's warning and error
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 100 * 1024  # decoding either would take 360 MB or more


def test_pixel_hash_ignores_container_and_rotation_tag():
    upright = two_colour().transpose(Image.Transpose.ROTATE_270)
    stored_upright = check_image(encode(upright, "PNG"), name="a.png").image
    assert pixel_sha256(stored_upright) == pixel_sha256(
        check_image(encode(upright, "TIFF"), name="a.tif").image
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = check_image(encode(two_colour(), "PNG", exif=exif.tobytes()), name="b.png").image
    assert pixel_sha256(tagged) == pixel_sha256(stored_upright)


def test_tiny_and_grayscale_images():
    with pytest.raises(BadImageError, match="too small"):
        check_image(encode(Image.new("RGB", (20, 400)), "PNG"), name="sliver.png")
    checked = check_image(encode(Image.new("LA", (64, 64), (90, 255)), "PNG"), name="gray.png")
    assert checked.image.mode == "RGB" and checked.image.getpixel((1, 1)) == (90, 90, 90)


# ---------------------------------------------------------------- list, re-crop, remove


def test_list_recrop_and_remove(session):
    import_images(
        session, [("zwx (1).jpg", encode(astronaut(), "JPEG")), ("zwx (2).png", encode(chelsea(), "PNG"))]
    )
    listing = list_images(session)
    assert [row.file for row in listing.rows] == ["zwx (1).png", "zwx (2).png"]
    assert 'caption "zwx"' in listing.rows[0].reason

    report = recrop_images(session, crop="center", resolution=64)
    assert not report.failed
    assert all(record.width == 64 and record.crop == "center" for record in session.manifest.images)
    assert Image.open(session.path / "instance_images/zwx (2).png").size == (64, 64)

    report = recrop_images(session, ["zwx (2)"], crop="smart", box=(0, 0, 300, 300), resolution=64)
    assert (
        session.manifest.images[1].crop_box == [0, 0, 300, 300]
        and session.manifest.images[1].focus == "manual"
    )
    before = tree_digest(session.path)
    report = recrop_images(session, ["zwx (2)"], box=(0, 0, 300, 200), resolution=64)
    assert report.failed and "not square" in report.rows[0].reason
    assert tree_digest(session.path) == before

    report = recrop_images(session, ["zwx (2).png"], crop="none", resolution=64)
    assert Image.open(session.path / "instance_images/zwx (2).png").size == (96, 64)

    report = remove_images(session, ["zwx (1).jpg"])
    assert [row.file for row in report.rows] == ["zwx (1).png"]
    assert [
        record.file for record in Session.open("alice", root=session.path.parent.parent).manifest.images
    ] == ["instance_images/zwx (2).png"]
    assert not (session.path / "instance_images/zwx (1).png").exists()
    assert not (session.path / "instance_images/originals/zwx (1).jpg").exists()
    assert not (session.path / "captions/zwx (1).txt").exists()


@pytest.mark.parametrize(
    ("given", "safe"),
    [
        ("zwx (1).JPG", "zwx (1).jpg"),
        ("trip/zwx (1).jpg", "zwx (1).jpg"),
        ("C:\\Users\\me\\zwx (1).jpg", "zwx (1).jpg"),
        ("Zoe\u0308 (1).jpg", "Zoë (1).jpg"),  # macOS zips store names decomposed
        ("bad\x00na\x1bme\u202e.jpg", "badname.jpg"),
        ("what?.jpg", "what_.jpg"),
        (".hidden.png", "hidden.png"),
        ("", "image"),
        ("a" * 300 + ".jpg", "a" * 150 + ".jpg"),
    ],
)
def test_safe_filename(given, safe):
    from nbkit.images import safe_filename

    assert safe_filename(given) == safe


SECRET_TEXT = "root:x:0:0:root:/root:/bin/bash\n"


def test_zip_entries_that_climb_out_or_are_links_are_refused_by_name(session, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("trip/zwx (1).jpg", encode(astronaut(), "JPEG"))
        zipped.writestr("../zwx (2).jpg", encode(chelsea(), "JPEG"))
        zipped.writestr("/abs/zwx (3).jpg", encode(chelsea(), "JPEG"))
        zipped.writestr("trip/../../zwx (4).jpg", encode(chelsea(), "JPEG"))
        link = zipfile.ZipInfo("trip/zwx (5).jpg")
        link.external_attr = (0o120777 << 16) | 0
        zipped.writestr(link, "/etc/passwd")
    report = import_images(session, [archive])
    assert [Path(row.file).name for row in report.imported] == ["zwx (1).jpg"]
    for member in ("../zwx (2).jpg", "/abs/zwx (3).jpg", "trip/../../zwx (4).jpg"):
        row = report.row(f"photos.zip:{member}")
        assert row.status == "error" and "points outside the zip's folder" in row.reason
    row = report.row("photos.zip:trip/zwx (5).jpg")
    assert row.status == "error" and "symbolic link" in row.reason
    assert "/etc/passwd" not in str(report)
    assert len(session.manifest.images) == 1


def test_links_out_of_an_imported_folder_are_refused_and_nothing_is_echoed(session, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(SECRET_TEXT)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "zwx (1).jpg").write_bytes(encode(astronaut(), "JPEG"))
    (folder / "zwx (2).jpg").symlink_to(secret)  # points outside: refused
    (folder / "zwx (3).jpg").symlink_to(folder / "zwx (1).jpg")  # inside: followed (a duplicate)
    (folder / "zwx (4).txt").symlink_to(secret)  # a caption link outside: refused too
    (folder / "notes.jpg").write_text(SECRET_TEXT)  # a text file named .jpg, inside
    report = import_images(session, [folder])
    refused = report.row("photos/zwx (2).jpg")
    assert (
        refused.status == "error" and "symbolic link to a file outside the imported folder" in refused.reason
    )
    assert report.row("photos/zwx (4).txt").status == "error"
    assert report.row("photos/zwx (3).jpg").status == "duplicate"
    text = report.row("photos/notes.jpg")
    assert text.status == "error" and text.reason.endswith("the file holds text")
    for rendered in (str(report), report._repr_html_(), json.dumps([vars(row) for row in report.rows])):
        assert "root:" not in rendered and "/bin/bash" not in rendered
    assert [record.caption for record in session.manifest.images] == ["zwx"]


def test_a_flux_session_crops_at_multiples_of_16(tmp_path):
    flux = BaseModelRef(source="tiny-flux", family="flux", prediction_type="flow")
    session = Session.create("fx", root=tmp_path, base_model=flux, resolution=80)  # 80: a FLUX.1 step
    import_images(session, {"zwx (1).png": encode(chelsea(), "PNG")}, crop="center")
    (record,) = session.manifest.images
    # FLUX.1 trains in buckets: the 3:2 cat gets the 3:2 bucket of 16-px steps within 80x80's area.
    assert Image.open(session.path / record.file).size == (96, 64)
    session.manifest.training = session.manifest.training.replace(buckets=False)
    recrop_images(session, crop="center")
    assert Image.open(session.path / record.file).size == (80, 80)
    sd = Session.create(
        "sd",
        root=tmp_path,
        base_model=BaseModelRef(source="tiny-sd1", family="sd1", prediction_type="epsilon"),
    )
    with pytest.raises(NbkitError, match="not a multiple of 64"):
        import_images(sd, {"zwx (1).png": encode(chelsea(), "PNG")}, resolution=80)


def test_an_empty_folder_is_reported_as_empty_not_as_nothing_to_do(session, tmp_path):
    (tmp_path / "empty").mkdir()
    report = import_images(session, [tmp_path / "empty"])
    (row,) = report.rows
    assert (row.file, row.status) == ("empty/", "error") and "the folder is empty" in row.reason
    assert report.failed


def test_photos_without_a_caption_are_named_and_a_token_given_later_captions_them(session, tmp_path):
    from nbkit.images import check_captions

    folder = tmp_path / "numbered"
    folder.mkdir()
    for n in (1, 2):
        two_colour(200 + 40 * n).save(folder / f"{n}.png")
    import_images(session, [folder], crop="center")
    with pytest.raises(NbkitError, match=r"2 photo\(s\) have no caption: 1\.png, 2\.png") as caught:
        check_captions(session)
    assert "token='zwx'" in str(caught.value) and "--token zwx" in caught.value.render("cli")
    # Importing again with a token (no new photos) captions the ones already there.
    report = import_images(session, [], token="zwx")
    assert [row.reason for row in report.rows] == ["captioned with the token 'zwx'"] * 2
    check_captions(session)
    reopened = Session.open(session.name, root=session.path.parent.parent)
    assert [(image.token, image.caption) for image in reopened.manifest.images] == [("zwx", "zwx")] * 2
