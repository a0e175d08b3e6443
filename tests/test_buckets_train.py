"""Training in aspect-ratio buckets: mixed-aspect photos are imported into their buckets, every batch
comes from one bucket, a run resumes bit-exact after SIGKILL, and the setting is kept across resumes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from child_process import paused_training
from PIL import Image
from test_train_support import assert_same_tensors, load_tensors, make_session

from nbkit.errors import NbkitError
from nbkit.images import import_images, list_images
from nbkit.images.contact_sheet import CROP_COLOUR
from nbkit.session.core import Session
from nbkit.train import stages
from nbkit.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")

# Tiny SD 1.x at 128 px has three buckets: 64x256, 128x128 and 256x64.
RESOLUTION = 128
PHOTOS = {
    "zwx (1).png": (90, 300),
    "zwx (2).png": (100, 320),
    "zwx (3).png": (300, 100),
    "zwx (4).png": (200, 200),
}
SETTINGS = {
    "resolution": RESOLUTION,
    "buckets": True,
    "text_encoder_steps": 2,
    "unet_steps": 4,
    "checkpoint_every": 2,
    "lora_rank": 4,
    "random_flip": True,
}


def _photo(size: tuple[int, int], index: int) -> Image.Image:
    """A red disc (the subject) on a blue ground, off-centre so the crop has to find it."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    cx, cy = width * (0.3 + 0.1 * index), height * 0.35
    radius = 0.3 * min(width, height)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 2] = 170
    pixels[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = (220, 30, 30)
    return Image.fromarray(pixels)


def _bucketed_session(name: str, model_dir, **training) -> Session:
    session = make_session(name, model_dir, "sd1", images=0, **{**SETTINGS, **training})
    photos = {file: _png(_photo(size, index)) for index, (file, size) in enumerate(PHOTOS.items())}
    import_images(session, photos, crop="smart")
    return Session.open(name)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_photos_are_cropped_into_their_buckets_and_the_sheet_shows_them(tiny_model_dir):
    session = _bucketed_session("sizes", tiny_model_dir("sd1"))
    sizes = [(record.width, record.height) for record in session.manifest.images]
    assert sizes == [(64, 256), (64, 256), (256, 64), (128, 128)]
    for record in session.manifest.images:
        assert Image.open(session.path / record.file).size == (record.width, record.height)
        left, top, right, bottom = record.crop_box
        assert 0 <= left < right <= record.original_width and 0 <= top < bottom <= record.original_height
    listed = list_images(session)
    for row, (width, height) in zip(listed.rows, sizes, strict=True):
        assert f"{width}x{height}" in row.reason
    # The sheet draws each crop on its original (in blue); the processed crops alone have no blue lines.
    sheet = np.asarray(Image.open(listed.contact_sheet).convert("RGB")).astype(int)
    outline = np.abs(sheet - np.array(CROP_COLOUR)).sum(axis=-1) < 60
    assert outline.sum() > 100
    # Without buckets the next run crops them square again, from the originals.
    result = train(
        "sizes", {"buckets": False, "unet_steps": 1, "text_encoder_steps": 0, "checkpoint_every": 0}
    )
    assert result.finished
    assert {(r.width, r.height) for r in Session.open("sizes").manifest.images} == {(128, 128)}


def test_every_batch_comes_from_one_bucket_and_a_killed_run_resumes_bit_exact(
    tiny_model_dir, tmp_path, monkeypatch
):
    model_dir = tiny_model_dir("sd1")
    _bucketed_session("reference", model_dir)
    _bucketed_session("killed", model_dir)
    shapes = []
    denoise = stages._denoise

    def recording(context, unet, part, generator):
        shapes.append(tuple(part[0].shape))
        return denoise(context, unet, part, generator)

    monkeypatch.setattr(stages, "_denoise", recording)
    reference = train("reference")
    assert reference.finished
    # Batches of two latents of one bucket (1/8 of the pixels); all three buckets were drawn.
    assert {shape[0] for shape in shapes} == {2}
    assert {shape[2:] for shape in shapes} == {(32, 8), (8, 32), (16, 16)}

    with paused_training(["killed"], "unet-000002", tmp_path / "stderr.txt", os.environ):
        pass
    with pytest.warns(UserWarning, match="stale lock"):
        resumed = train("killed", resume=True)
    assert resumed.finished
    for kind in ("diffusers", "kohya"):
        assert_same_tensors(load_tensors(resumed.lora_files[kind]), load_tensors(reference.lora_files[kind]))


def test_a_resume_keeps_the_bucket_setting_its_checkpoint_trained_with(tiny_model_dir):
    # With class images (square) beside bucketed photos: a forward pass for each.
    prior = {"class_prompt": "photo of a toy", "num_images": 2, "generation_steps": 2}
    _bucketed_session("switch", tiny_model_dir("sd1"), prior=prior)
    first = train("switch", max_steps_this_run=1)
    assert first.losses and all(np.isfinite(loss) for _, _, loss in first.losses)
    saved = json.loads((first.last_checkpoint / "trainer_state.json").read_text())
    assert saved["config"]["buckets"] is True
    with pytest.raises(NbkitError, match="buckets was True in the checkpoint") as caught:
        train("switch", {"buckets": False}, resume=True)
    assert "restart" in caught.value.fix
