"""Smart crop: faces kept whole (OpenCV's bundled Haar cascade), otherwise the busiest region."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data as skdata

from nbkit.errors import NbkitError
from nbkit.images.crop import FaceDetector, check_crop_mode, choose_crop, render_crop


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def background(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, out-of-focus looking background: blurred low-frequency noise."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
    return (
        Image.fromarray(coarse)
        .resize((width, height), Image.Resampling.BICUBIC)
        .filter(ImageFilter.GaussianBlur(8))
    )


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def overlap(box, start: int, end: int) -> float:
    """Fraction of the box's width that lies within [start, end) horizontally."""
    return max(0, min(box[2], end) - max(box[0], start)) / (box[2] - box[0])


@pytest.mark.parametrize(
    ("size", "at"), [((1024, 512), (512, 0)), ((1024, 512), (0, 0)), ((512, 1024), (0, 512))]
)
def test_face_crop_contains_the_detected_face(detector, size, at):
    canvas = background(*size)
    canvas.paste(Image.fromarray(skdata.astronaut()), at)
    choice = choose_crop(canvas, "smart", detector)
    assert choice.focus == "face"
    face = choice.faces[0]
    # the astronaut's face is at about (177, 66)-(272, 161) of the 512 px photo
    assert abs(face[0] - (at[0] + 177)) < 15 and abs(face[1] - (at[1] + 66)) < 15
    assert contains(choice.box, face)
    assert choice.box[2] - choice.box[0] == choice.box[3] - choice.box[1] == 512
    assert contains((0, 0, *size), choice.box)


def test_center_crop_would_cut_that_face(detector):
    canvas = background(1024, 512)
    canvas.paste(Image.fromarray(skdata.astronaut()), (512, 0))
    face = choose_crop(canvas, "smart", detector).faces[0]
    center = choose_crop(canvas, "center")
    assert center.box == (256, 0, 768, 512) and center.focus == "center"
    assert not contains(center.box, face)


@pytest.mark.parametrize("cat_x", [0, 749])
def test_saliency_crop_finds_the_cat(detector, cat_x):
    canvas = background(1200, 300, seed=1)
    canvas.paste(Image.fromarray(skdata.chelsea()), (cat_x, 0))  # the cat photo is 451x300
    choice = choose_crop(canvas, "smart", detector)
    assert choice.focus == "saliency" and not choice.faces
    assert overlap(choice.box, cat_x, cat_x + 451) > 0.9
    assert choose_crop(canvas, "smart", detector) == choice  # deterministic


def test_flat_picture_crops_centered(detector):
    choice = choose_crop(Image.new("RGB", (400, 200), (90, 90, 90)), "smart", detector)
    assert choice.box == (100, 0, 300, 200)


def test_none_keeps_everything_and_render_scales_the_short_side():
    image = Image.fromarray(skdata.chelsea())
    choice = choose_crop(image, "none")
    assert choice.box == (0, 0, 451, 300) and choice.focus == "none"
    assert render_crop(image, choice.box, 128, square=False).size == (192, 128)
    assert render_crop(image, (0, 0, 300, 300), 64).size == (64, 64)


def test_unknown_mode_is_refused():
    with pytest.raises(NbkitError, match="crop mode 'smrt'"):
        check_crop_mode("smrt")
