"""Subject masks: paired with their photos at import, cut like them, and weighing the loss."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_support import make_session

from nbkit.errors import NbkitError
from nbkit.images import import_images, recrop_images, remove_images
from nbkit.images.contact_sheet import _with_crop
from nbkit.session.core import Session
from nbkit.train import loss as loss_module
from nbkit.train.data import latent_mask
from nbkit.train.loss import dreambooth_loss
from nbkit.train.trainer import train


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _photo_and_mask(width: int = 120, height: int = 90) -> tuple[Image.Image, Image.Image]:
    """A red square (the subject) on a noisy blue ground, and its mask."""
    pixels = np.random.default_rng(0).integers(0, 120, (height, width, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    mask = np.zeros((height, width), np.uint8)
    mask[20:70, 40:90] = 255
    pixels[mask > 0] = (230, 20, 20)
    return Image.fromarray(pixels), Image.fromarray(mask)


def test_with_background_weight_zero_only_the_subject_counts(tmp_path):
    _, mask = _photo_and_mask(64, 64)
    mask.save(tmp_path / "mask.png")
    subject = latent_mask(tmp_path / "mask.png", (64, 64), (8, 8))[None]  # (1, 1, 8, 8)
    weights = 0.0 + (1.0 - 0.0) * subject
    prediction = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def total(target):
        return dreambooth_loss(
            prediction, target, weights=None, num_class=0, prior_loss_weight=1.0, pixel_weights=weights
        )[0]

    background = target.clone()
    background[..., subject[0, 0] == 0] += 5.0  # only the background of the target changes
    assert torch.equal(total(background), total(target))
    changed = target.clone()
    changed[..., subject[0, 0] == 1] += 5.0  # the subject changes
    assert not torch.allclose(total(changed), total(target))
    # Weight 1 is the plain loss.
    plain = dreambooth_loss(prediction, target, weights=None, num_class=0, prior_loss_weight=1.0)[0]
    ones = dreambooth_loss(
        prediction,
        target,
        weights=None,
        num_class=0,
        prior_loss_weight=1.0,
        pixel_weights=torch.ones(1, 1, 8, 8),
    )[0]
    torch.testing.assert_close(ones, plain)


def test_a_mask_beside_its_photo_is_cut_like_it_and_follows_a_recrop(tmp_path):
    session = Session.create("masks", root=tmp_path, resolution=64)
    photo, mask = _photo_and_mask()
    report = import_images(
        session,
        {"zwx (1).png": _png(photo), "zwx (1).mask.png": _png(mask), "stray.mask.png": _png(mask)},
        crop="center",
    )
    (record,) = session.manifest.images
    assert record.mask == "instance_images/masks/zwx (1).png"
    processed = Image.open(session.path / record.mask)
    assert processed.size == (record.width, record.height) == (64, 64)
    # The center crop of 120x90 is x 15..105: the subject's 40..90 lands at 25..75 of 90 px, scaled.
    column = np.asarray(processed)[32]
    assert column[10] == 0 and column[32] == 255 and column[60] == 0
    (stray,) = [row for row in report.rows if row.file == "stray.mask.png"]
    assert stray.status == "error" and ".mask" in stray.fix
    # The contact sheet's cell: the original, its background dimmed outside the mask, the subject not.
    cell = np.asarray(_with_crop(session, record)).astype(int)
    original = np.asarray(photo).astype(int)
    assert (cell[45, 65] == original[45, 65]).all()  # on the subject (away from the crop outline)
    assert cell[45, 25].sum() < 0.5 * original[45, 25].sum()  # the background

    recrop_images(session, crop="center", resolution=128)
    record = Session.open("masks", root=tmp_path).manifest.images[0]
    assert Image.open(session.path / record.mask).size == (128, 128)
    remove_images(session)
    assert not (session.path / record.mask).exists()
    assert not (session.path / record.mask_original).exists()


def test_a_mask_of_another_shape_is_refused_naming_it(tmp_path):
    session = Session.create("shape", root=tmp_path, resolution=64)
    photo, _ = _photo_and_mask()
    report = import_images(
        session, {"zwx.png": _png(photo), "zwx.mask.png": _png(Image.new("L", (50, 100)))}, crop="center"
    )
    (row,) = [row for row in report.rows if row.file == "zwx.mask.png"]
    assert row.status == "error" and "50x100" in row.reason and "photo's size" in row.fix
    assert session.manifest.images[0].mask == ""


@pytest.mark.usefixtures("one_thread_local_scratch")
def test_a_masked_run_weighs_the_background_as_set(tiny_model_dir, monkeypatch):
    session = make_session("masked", tiny_model_dir("sd1"), "sd1", images=0, mask_background=0.0)
    photo, mask = _photo_and_mask()
    import_images(session, {"zwx (1).png": _png(photo), "zwx (1).mask.png": _png(mask)}, crop="center")
    seen = []
    original = loss_module.per_sample_mse

    def recording(prediction, target, pixel_weights=None):
        seen.append(pixel_weights)
        return original(prediction, target, pixel_weights)

    monkeypatch.setattr(loss_module, "per_sample_mse", recording)
    result = train("masked")
    assert result.finished and all(np.isfinite(loss) for _, _, loss in result.losses)
    weights = seen[0]
    assert weights.shape == (2, 1, 8, 8)  # a batch of two, at the latents' 8x8
    assert weights.min() == 0.0 and weights.max() == 1.0  # background out, subject in

    with pytest.raises(NbkitError, match="no photo has a subject mask"):
        bare = make_session("bare", tiny_model_dir("sd1"), "sd1", mask_background=0.5)
        train(bare)
    with pytest.raises(NbkitError, match=r"mask_background is 1\.5"):
        train("masked", {"mask_background": 1.5}, restart=True)
