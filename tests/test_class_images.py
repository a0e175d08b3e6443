"""Prior-preservation class images: fixed seeds, generated once, resumable, regenerated when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.train.class_images import ensure_class_images

SETTINGS = {"seed": 11, "steps": 2, "resolution": 64}


class CountingPipeline:
    """Wraps a pipeline and counts the images it was asked for."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.images = 0

    def __call__(self, **kwargs):
        self.images += len(kwargs["prompt"])
        return self.pipeline(**kwargs)

    def __getattr__(self, name):  # scheduler, guidance_scale, ...: the wrapped pipeline's
        return getattr(self.pipeline, name)


@pytest.fixture(scope="module")
def sd1_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pixels(paths):
    return [np.asarray(Image.open(path)) for path in paths]


def test_generated_once_then_reused(sd1_pipeline, tmp_path):
    pipeline = CountingPipeline(sd1_pipeline)
    paths = ensure_class_images(pipeline, "a photo of a dog", 3, tmp_path, **SETTINGS)
    assert [path.name for path in paths] == ["class-0000.png", "class-0001.png", "class-0002.png"]
    assert pipeline.images == 3
    assert all(Image.open(path).size == (64, 64) for path in paths)
    assert json.loads((tmp_path / "manifest.json").read_text())["prompt"] == "a photo of a dog"
    # Each image says how it was made, as A1111's own images do.
    made = [parse_infotext(read_infotext(path)) for path in paths]
    assert [(info.prompt, info.seed, info.steps, info.size) for info in made] == [
        ("a photo of a dog", 11 + index, 2, (64, 64)) for index in range(3)
    ]
    assert made[0].sampler == "PLMS" and made[0].cfg_scale == 7.5  # the pipeline's own, as before
    before = [path.read_bytes() for path in paths]
    assert ensure_class_images(pipeline, "a photo of a dog", 3, tmp_path, **SETTINGS) == paths
    assert pipeline.images == 3  # nothing generated the second time
    assert [path.read_bytes() for path in paths] == before


def test_cut_off_generation_resumes_with_the_same_images(sd1_pipeline, tmp_path):
    reference = _pixels(
        ensure_class_images(sd1_pipeline, "a photo of a dog", 4, tmp_path / "full", **SETTINGS)
    )
    pipeline = CountingPipeline(sd1_pipeline)
    ensure_class_images(pipeline, "a photo of a dog", 2, tmp_path / "cut", **SETTINGS)
    # The kill came while image 2 was being written: only a temporary file of it exists.
    (tmp_path / "cut" / ".nbkit-tmp-1234abcd-class-0002.png").write_bytes(b"\x89PNG half")
    (tmp_path / "cut" / "class-0001.png").write_bytes(b"not a png")  # damaged some other way
    paths = ensure_class_images(pipeline, "a photo of a dog", 4, tmp_path / "cut", batch_size=2, **SETTINGS)
    assert pipeline.images == 2 + 3  # images 1, 2 and 3, not 0
    assert sorted(path.name for path in (tmp_path / "cut").iterdir()) == [
        "class-0000.png",
        "class-0001.png",
        "class-0002.png",
        "class-0003.png",
        "manifest.json",
    ]
    for resumed, full in zip(_pixels(paths), reference, strict=True):
        # Batched generation may differ from single images in the last float bits, not visibly.
        assert np.abs(resumed.astype(int) - full.astype(int)).max() <= 2


def test_changed_prompt_or_resolution_regenerates_the_set(sd1_pipeline, tmp_path):
    pipeline = CountingPipeline(sd1_pipeline)
    dog = _pixels(ensure_class_images(pipeline, "a photo of a dog", 2, tmp_path, **SETTINGS))
    cat = _pixels(ensure_class_images(pipeline, "a photo of a cat", 2, tmp_path, **SETTINGS))
    assert pipeline.images == 4
    assert not np.array_equal(dog[0], cat[0])
    assert json.loads((tmp_path / "manifest.json").read_text())["prompt"] == "a photo of a cat"
    bigger = ensure_class_images(pipeline, "a photo of a cat", 1, tmp_path, **{**SETTINGS, "resolution": 128})
    assert pipeline.images == 5
    assert Image.open(bigger[0]).size == (128, 128)
    assert not (tmp_path / "class-0001.png").exists()  # stale images of the old set are gone


def test_images_nbkit_did_not_make_are_not_overwritten(sd1_pipeline, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "my_dog.jpg")
    with pytest.raises(NbkitError, match="did not generate") as caught:
        ensure_class_images(sd1_pipeline, "a photo of a dog", 2, tmp_path, **SETTINGS)
    assert str(tmp_path) in str(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my_dog.jpg"]


def test_empty_class_prompt_is_a_user_error(sd1_pipeline, tmp_path):
    with pytest.raises(NbkitError, match="class prompt is empty"):
        ensure_class_images(sd1_pipeline, "  ", 2, tmp_path, **SETTINGS)
