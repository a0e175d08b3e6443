"""Sample grids: fixed seeds, labelled tiles, and A1111 infotext in the PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nbkit.generation.generate import VERSION
from nbkit.generation.infotext import format_infotext, parse_infotext
from nbkit.train.samples import render_samples


@pytest.fixture(scope="module")
def sd1_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_grid_has_one_labelled_tile_per_prompt_and_a1111_infotext(sd1_pipeline, tmp_path):
    prompts = ["a photo of sks dog", "sks dog on the beach, sunset", "a painting of sks dog"]
    out = render_samples(
        sd1_pipeline,
        prompts,
        seed=42,
        steps=2,
        resolution=64,
        out_path=tmp_path / "samples" / "step-00010.png",
        negative_prompt="blurry",
    )
    with Image.open(out) as grid:
        infotext = grid.text["parameters"]
        per_image = json.loads(grid.text["nbkit-samples"])
        assert grid.width == 3 * 64 and grid.height > 64  # label strip under the tiles
        label_strip = np.asarray(grid.convert("L"))[64:, :64]
    assert (label_strip < 128).any(), "the label under the first tile is empty"
    assert infotext.splitlines() == [
        "a photo of sks dog",
        "Negative prompt: blurry",
        f"Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 42, Size: 64x64, Version: {VERSION}",
    ]
    assert parse_infotext(infotext).seed == 42
    assert per_image[1].splitlines()[0] == prompts[1] and "Seed: 43," in per_image[1]
    assert [p.name for p in out.parent.iterdir()] == ["step-00010.png"]  # no temporaries left


def test_tiles_come_from_fixed_per_prompt_seeds(sd1_pipeline, tmp_path):
    prompts = ["a photo of sks dog", "a painting of sks dog"]
    first = render_samples(sd1_pipeline, prompts, seed=7, steps=2, resolution=64, out_path=tmp_path / "a.png")
    again = render_samples(sd1_pipeline, prompts, seed=7, steps=2, resolution=64, out_path=tmp_path / "b.png")
    alone = render_samples(
        sd1_pipeline, prompts[1:], seed=8, steps=2, resolution=64, out_path=tmp_path / "c.png"
    )
    other = render_samples(sd1_pipeline, prompts, seed=9, steps=2, resolution=64, out_path=tmp_path / "d.png")
    tiles = {
        path.stem: np.asarray(Image.open(path).convert("RGB"))[:64] for path in (first, again, alone, other)
    }
    assert np.array_equal(tiles["a"], tiles["b"])
    # Image i is seed + i, whatever else is in the grid.
    assert np.array_equal(tiles["a"][:, 64:128], tiles["c"][:, :64])
    assert not np.array_equal(tiles["a"], tiles["d"])


def test_infotext_quotes_values_that_would_break_parsing():
    text = format_infotext("p", "", {"Steps": 20, "CFG scale": 7.0, "Model": "a, b", "VAE": None})
    assert text == 'p\nSteps: 20, CFG scale: 7, Model: "a, b"'


def test_bad_inputs_name_the_value(sd1_pipeline, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8, got 60"):
        render_samples(sd1_pipeline, ["x"], seed=0, steps=2, resolution=60, out_path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty list"):
        render_samples(sd1_pipeline, [], seed=0, steps=2, resolution=64, out_path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        render_samples(sd1_pipeline, ["x"], seed=-1, steps=2, resolution=64, out_path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sdxl_grid_names_its_sampler(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir("sdxl"))
    pipeline.set_progress_bar_config(disable=True)
    out = render_samples(
        pipeline, ["zwx, a dog: portrait"], seed=3, steps=2, resolution=64, out_path=tmp_path / "x.png"
    )
    with Image.open(out) as grid:
        assert grid.text["parameters"] == (
            f"zwx, a dog: portrait\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 3, Size: 64x64, Version: {VERSION}"
        )
