"""Crops at the training size that keep the subject: faces first, then what stands out.

A plain center crop cuts the head off a portrait taken in landscape, or the dog off the edge of a
beach photo. `choose_crop` keeps the largest box of the wanted aspect the picture allows (a square,
or an aspect-ratio bucket's shape: the most context and pixels) and only decides where it sits along
the axis with room to spare:

- faces, found with the frontal-face Haar cascade that ships inside OpenCV (nothing downloaded), are
  kept whole, with a little more room below the face than above it for the neck and shoulders;
- otherwise the square goes where the picture is busiest: spectral-residual saliency (what is unusual
  in the picture) plus edge density (subjects are in focus, backgrounds are often blurred), with a
  mild pull towards the center that photographers give their subjects.

Everything is deterministic: the same picture always gives the same box.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from nbkit.errors import NbkitError

CropMode = Literal["smart", "center", "none"]
CROP_MODES: tuple[str, ...] = ("smart", "center", "none")
Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels of the upright picture

# alt2 finds the same faces as the default cascade with fewer false hits on clothes and backgrounds.
FACE_CASCADE = "haarcascade_frontalface_alt2.xml"
# Detection runs on a copy this size: a subject's face stays far above the cascade's 20 px window,
# and a 50-megapixel photo takes a tenth of a second instead of many seconds.
DETECT_MAX_SIDE = 640
# Faces smaller than this fraction of the short side are background people, not the subject.
MIN_FACE_FRACTION = 0.08
SALIENCY_MAX_SIDE = 256
# Where the face center sits inside a tall square crop, as a fraction from the top.
FACE_HEIGHT_FRACTION = 0.42
CENTER_PULL = 0.25


@dataclasses.dataclass
class CropChoice:
    """Where to crop one picture and why.

    Args:
        box: the crop in pixels of the upright original.
        focus: what placed it: `face`, `saliency`, `center` or `none`.
        faces: the faces found (largest first), in pixels of the upright original.
    """

    box: Box
    focus: str
    faces: list[Box] = dataclasses.field(default_factory=list)


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade. Create one per import and reuse it.

    Args:
        cascade: the cascade file name inside `cv2.data.haarcascades`.
    """

    def __init__(self, cascade: str = FACE_CASCADE):
        cv2 = _import_cv2()
        path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / cascade
        if not hasattr(cv2, "CascadeClassifier") or not path.is_file():
            raise NbkitError(
                f"this OpenCV ({cv2.__version__}) has no bundled Haar cascade {cascade}",
                fix="pip install 'opencv-python-headless>=4.9,<5' (OpenCV 5 moved the cascades out), "
                "or crop with crop='center'",
            )
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise NbkitError(
                f"OpenCV could not load its face cascade {path}", fix="reinstall opencv-python-headless"
            )

    def detect(self, image: Image.Image) -> list[Box]:
        """Return the faces in `image`, largest first; small ones beside a big one are dropped.

        Args:
            image: an RGB picture.
        """
        scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
        small = image.convert("L")
        if scale < 1.0:
            small = small.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.BOX,
            )
        gray = np.asarray(small)
        min_face = max(24, round(MIN_FACE_FRACTION * min(gray.shape)))
        found = ()
        # Equalising helps dim, flat photos but also turns smooth backgrounds into face-like noise,
        # so it is only the second try.
        for attempt in (gray, self._cv2.equalizeHist(gray)):
            found = self._cascade.detectMultiScale(
                attempt, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face)
            )
            if len(found):
                break
        faces = [
            (
                max(0, round(x / scale)),
                max(0, round(y / scale)),
                min(image.width, round((x + w) / scale)),
                min(image.height, round((y + h) / scale)),
            )
            for x, y, w, h in (tuple(int(value) for value in face) for face in found)
        ]
        faces.sort(key=lambda box: (-_area(box), box))
        # Background faces and false hits are small next to the subject's face.
        return [box for box in faces if _area(box) >= 0.25 * _area(faces[0])]


def check_crop_mode(mode: str) -> str:
    if mode not in CROP_MODES:
        raise NbkitError(
            f"crop mode {mode!r} is not one nbkit knows", fix=f"use one of: {', '.join(CROP_MODES)}"
        )
    return mode


def choose_crop(
    image: Image.Image,
    mode: CropMode,
    detector: FaceDetector | None = None,
    aspect: tuple[int, int] = (1, 1),
) -> CropChoice:
    """Decide the crop of `image` for `mode`.

    Args:
        image: the upright RGB picture.
        mode: `smart` (faces, then saliency), `center`, or `none` (the whole picture, not squared).
        detector: required for `smart`.
        aspect: the crop's (width, height) ratio: a square, or an aspect-ratio bucket's size.
    """
    check_crop_mode(mode)
    width, height = image.size
    if mode == "none":
        return CropChoice(box=(0, 0, width, height), focus="none")
    size = fit_box(image.size, aspect)
    center = CropChoice(box=_box_at(size, (width - size[0]) // 2, (height - size[1]) // 2), focus="center")
    if mode == "center":
        return center
    if detector is None:
        raise NbkitError("smart crop needs a FaceDetector", fix="pass detector=FaceDetector()")
    faces = detector.detect(image)
    if faces:
        return CropChoice(box=_box_around_faces(image.size, size, faces), focus="face", faces=faces)
    if size == image.size:
        return center
    return CropChoice(box=_box_at_busiest(image, size), focus="saliency")


def fit_box(size: tuple[int, int], aspect: tuple[int, int]) -> tuple[int, int]:
    """The largest (width, height) of `aspect` inside a picture of `size`: it spans one axis whole.

    Args:
        size: the picture's (width, height).
        aspect: the wanted (width, height) ratio.
    """
    width, height = size
    if width * aspect[1] >= height * aspect[0]:  # wider than wanted: full height, room left and right
        return min(width, max(1, round(height * aspect[0] / aspect[1]))), height
    return width, min(height, max(1, round(width * aspect[1] / aspect[0])))


def render_crop(
    image: Image.Image,
    box: Box,
    resolution: int,
    *,
    square: bool = True,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Cut `box` out of `image` and resize it: to `size`, to `resolution` square, or short side
    `resolution`.

    Args:
        image: the upright RGB picture.
        box: the crop in its pixels.
        resolution: the training size.
        square: False for crop mode `none`: keep the aspect ratio, scale the short side.
        size: the exact (width, height) to render at (an aspect-ratio bucket); overrides the others.
    """
    left, top, right, bottom = box
    if size is None and square:
        size = (resolution, resolution)
    elif size is None:
        scale = resolution / min(right - left, bottom - top)
        size = (
            max(resolution, round((right - left) * scale)),
            max(resolution, round((bottom - top) * scale)),
        )
    return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def _box_at(size: tuple[int, int], left: int, top: int) -> Box:
    return (left, top, left + size[0], top + size[1])


def _box_around_faces(image_size: tuple[int, int], size: tuple[int, int], faces: list[Box]) -> Box:
    width, height = image_size
    union = (
        min(b[0] for b in faces),
        min(b[1] for b in faces),
        max(b[2] for b in faces),
        max(b[3] for b in faces),
    )
    target = union if union[2] - union[0] <= size[0] and union[3] - union[1] <= size[1] else faces[0]
    face_x = (target[0] + target[2]) / 2
    face_y = (target[1] + target[3]) / 2
    left = _place(face_x - size[0] / 2, target[0], target[2], size[0], width)
    top = _place(face_y - FACE_HEIGHT_FRACTION * size[1], target[1], target[3], size[1], height)
    return _box_at(size, left, top)


def _place(wanted: float, low: int, high: int, side: int, limit: int) -> int:
    """Clamp a crop start so the crop keeps [low, high] inside it and stays inside [0, limit]."""
    start = min(max(wanted, high - side), low)
    return int(min(max(round(start), 0), limit - side))


def _box_at_busiest(image: Image.Image, size: tuple[int, int]) -> Box:
    """The box of `size` placed where the picture is busiest along the axis it does not span."""
    width, height = image.size
    horizontal = size[0] < width
    long, side = (width, size[0]) if horizontal else (height, size[1])
    energy = _interest_map(image)
    profile = energy.sum(axis=0 if horizontal else 1)
    positions = np.linspace(-1.0, 1.0, profile.size)
    profile = profile * (1.0 - CENTER_PULL * positions**2)
    window = max(1, round(profile.size * side / long))
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    scores = cumulative[window:] - cumulative[:-window]
    # Among equally good windows take the one nearest the middle, so flat pictures crop centered.
    best = scores.max()
    candidates = np.flatnonzero(scores >= best - 1e-9 * max(best, 1.0))
    middle = (scores.size - 1) / 2
    offset = int(candidates[np.argmin(np.abs(candidates - middle))])
    start = round(offset * long / profile.size)
    start = min(max(start, 0), long - side)
    return _box_at(size, start, 0) if horizontal else _box_at(size, 0, start)


def _interest_map(image: Image.Image) -> np.ndarray:
    """Spectral-residual saliency plus edge density, each scaled to [0, 1], on a small gray copy."""
    cv2 = _import_cv2()
    scale = SALIENCY_MAX_SIDE / max(image.size)
    small = image.convert("L").resize(
        (max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.Resampling.BOX
    )
    gray = np.asarray(small, dtype=np.float32) / 255.0
    blur_sigma = max(1.0, 0.02 * max(gray.shape))

    # Spectral residual (Hou & Zhang 2007): the log-amplitude spectrum minus its local average keeps
    # what is not "typical image statistics"; transformed back it lights up the unusual regions.
    spectrum = np.fft.fft2(gray)
    log_amplitude = np.log(np.abs(spectrum) + 1e-8).astype(np.float32)
    residual = log_amplitude - cv2.blur(log_amplitude, (3, 3))
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = cv2.GaussianBlur(saliency.astype(np.float32), (0, 0), blur_sigma)

    smooth = cv2.GaussianBlur(gray, (0, 0), 1.0)  # sensor noise in flat areas is not detail
    edges = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    edges = cv2.GaussianBlur(edges, (0, 0), blur_sigma)
    return _unit(saliency) + _unit(edges)


def _unit(values: np.ndarray) -> np.ndarray:
    peak = float(values.max())
    return values / peak if peak > 0 else values


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise NbkitError(
            "smart crop needs OpenCV, which is not installed",
            fix="pip install 'nbkit[images]' (or opencv-python-headless), or crop with crop='center'",
        ) from None
    return cv2
