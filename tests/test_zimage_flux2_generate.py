"""Z-Image and FLUX.2 [klein] through nbkit's generation loop on their tiny models (CPU, 64 px, 2 steps)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.families import get_family
from nbkit.generation.generate import GenerationSettings, check_inputs, generate, generate_images
from nbkit.generation.hires import HiresFix
from nbkit.generation.infotext import parse_infotext
from nbkit.generation.placement import pipeline_family, plan_generation_memory
from nbkit.models.memory import DeviceFacts

FAMILIES = ("zimage", "flux2")
FAST = {"seeds": 1234, "steps": 2, "width": 64, "height": 64, "guidance_scale": None, "sampler": "Euler"}
_built: dict[str, object] = {}


def _pipeline(name: str):
    if name not in _built:
        pipeline = get_family(name).build_tiny_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        _built[name] = pipeline
    return _built[name]


@pytest.fixture(params=FAMILIES)
def pipeline(request):
    return _pipeline(request.param)


def _pixels(result):
    return [np.asarray(image).astype(np.int16) for image in result.images]


def _flux2_base():
    """The tiny FLUX.2 [klein] as a base (not distilled) model: it takes CFG."""
    from diffusers import Flux2KleinPipeline

    base = Flux2KleinPipeline.from_pipe(_pipeline("flux2"), is_distilled=False)
    base.set_progress_bar_config(disable=True)
    return base


def test_tiny_pipeline_renders_two_steps_in_diffusers(pipeline):
    image = pipeline(
        prompt="a dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_same_seed_same_image_infotext_and_preview(pipeline):
    family = get_family(pipeline_family(pipeline))
    latents = []
    first = generate(pipeline, ["a dog", "a cat"], **FAST, on_step=lambda step: latents.append(step.latents))
    again = generate(pipeline, ["a dog", "a cat"], **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again), strict=True))
    alone = generate(pipeline, ["a cat"], **{**FAST, "seeds": 1235})
    assert np.array_equal(_pixels(first)[1], _pixels(alone)[0])  # image i depends on its own seed only
    info = parse_infotext(first.infotexts[0])
    assert info.sampler == "Euler" and info.schedule == "Simple" and info.steps == 2
    assert info.cfg_scale == 1.0 and "Distilled CFG Scale" not in info.parameters
    assert len(latents) == 4  # two batches of one image, two steps each
    if family.preview_coefficients:  # Z-Image: FLUX.1's 16-channel latent, 1/8 size
        assert latents[0].shape == (1, 16, 8, 8)
    else:  # FLUX.2: packed, normalised tokens, no cheap preview
        assert latents == [None] * 4


def test_generation_defaults_tell_the_model_variant():
    zimage, flux2 = _pipeline("zimage"), _pipeline("flux2")
    assert tuple(get_family("zimage").generation_defaults(zimage)) == (8, 1.0, "Euler", "Automatic", True)
    assert tuple(get_family("flux2").generation_defaults(flux2)) == (4, 1.0, "Euler", "Automatic", True)
    assert get_family("flux2").generation_defaults(_flux2_base())[:2] == (50, 4.0)
    from diffusers import FlowMatchEulerDiscreteScheduler

    base_scheduler = FlowMatchEulerDiscreteScheduler.from_config(zimage.scheduler.config, shift=6.0)
    base = type(zimage).from_pipe(zimage, scheduler=base_scheduler)
    assert get_family("zimage").generation_defaults(base)[:2] == (50, 5.0)  # guidance 4 is A1111's CFG 5
    # A1111's for the SD families, Euler at CFG 1 for FLUX.1, as before: none of them their own.
    assert tuple(get_family("sd1").generation_defaults(None)) == (20, 7.0, "Euler a", "Automatic", False)
    assert tuple(get_family("flux").generation_defaults(None)) == (20, 1.0, "Euler", "Automatic", False)


def test_zimage_cfg_is_a1111s_scale_and_guides_with_the_negative():
    zimage = _pipeline("zimage")
    plain = generate(zimage, ["a dog"], **FAST)
    guided = generate(zimage, ["a dog"], **{**FAST, "guidance_scale": 4.0}, negative_prompt="a cat")
    assert "CFG scale: 4," in guided.infotexts[0]
    assert not np.array_equal(_pixels(plain)[0], _pixels(guided)[0])
    kwargs, _ = get_family("zimage").call_arguments(
        zimage, guidance_scale=4.0, distilled_guidance=None, negative=True
    )
    assert kwargs == {"guidance_scale": 3.0}


def test_flux2_distilled_ignores_cfg_and_base_takes_the_negative_encoded():
    flux2 = _pipeline("flux2")
    plain = generate(flux2, ["a dog"], **FAST)
    ignored = generate(flux2, ["a dog"], **{**FAST, "guidance_scale": 4.0}, negative_prompt="a cat")
    assert "CFG scale: 1," in ignored.infotexts[0]
    assert np.array_equal(_pixels(plain)[0], _pixels(ignored)[0])
    base = _flux2_base()
    guided = {
        negative: _pixels(
            generate(base, ["a dog"], **{**FAST, "guidance_scale": 4.0}, negative_prompt=negative)
        )[0]
        for negative in ("", "a cat", "a red car")
    }
    assert not np.array_equal(guided["a cat"], guided["a red car"])
    assert not np.array_equal(guided[""], guided["a cat"])
    result = generate(base, ["a dog"], **{**FAST, "guidance_scale": 4.0}, negative_prompt="a cat")
    assert "CFG scale: 4," in result.infotexts[0] and "Negative prompt: a cat" in result.infotexts[0]


def test_img2img_follows_the_denoising_strength(pipeline):
    """A1111's img2img: the strength is the share of the steps that run, from the picture noised that far."""
    family = get_family(pipeline_family(pipeline))
    img2img = family.image_pipeline_class(pipeline, "img2img").from_pipe(pipeline)
    img2img.set_progress_bar_config(disable=True)
    assert family.owns_pipeline(img2img)
    outputs, steps = {}, {}
    for colour, strength in (("red", 0.25), ("red", 1.0), ("blue", 0.25)):
        settings = GenerationSettings(
            **{**FAST, "prompts": ["a dog"], "steps": 4},
            inputs={"image": Image.new("RGB", (64, 64), colour), "strength": strength},
        )
        ran = []
        result = generate_images(img2img, settings, on_step=lambda step, ran=ran: ran.append(step.step))
        assert result.images[0].size == (64, 64)
        outputs[colour, strength], steps[colour, strength] = _pixels(result)[0], len(ran)
    assert steps == {("red", 0.25): 1, ("red", 1.0): 4, ("blue", 0.25): 1}
    again = generate_images(img2img, settings)
    assert np.array_equal(outputs["blue", 0.25], _pixels(again)[0])
    assert not np.array_equal(outputs["red", 0.25], outputs["blue", 0.25])  # it starts from the picture


def test_hires_fix_upscales_pixels_and_refuses_latents(pipeline):
    result = generate_images(
        pipeline,
        GenerationSettings(
            prompts=["a dog"], seeds=3, steps=2, width=64, height=64, guidance_scale=None, sampler="Euler",
            hires=HiresFix(scale=1.5, upscaler="Lanczos", denoising_strength=0.6),
        ),
    )  # fmt: skip
    assert result.images[0].size == (96, 96)
    assert "Hires upscaler: Lanczos" in result.infotexts[0] and "Size: 64x64" in result.infotexts[0]
    with pytest.raises(ValueError, match=r"works on latents.*pick a pixel upscaler"):
        generate_images(
            pipeline,
            GenerationSettings(**{**FAST, "prompts": ["a dog"]}, hires=HiresFix(upscaler="Latent")),
        )


def test_flux2_refuses_pictures_its_img2img_would_shrink():
    """Its img2img (the inpainting pipeline) shrinks a picture above 1 megapixel: refused up front."""
    big = dict(prompts=["a dog"], steps=2, width=1024, height=1024, sampler="Euler", family="flux2")
    check_inputs(GenerationSettings(**big, inputs={"image": Image.new("RGB", (8, 8))}))
    with pytest.raises(ValueError, match=r"the hires fix's size is 2048x2048, more pixels than FLUX\.2"):
        check_inputs(GenerationSettings(**big, hires=HiresFix(upscaler="Lanczos")))
    with pytest.raises(ValueError, match=r"the image is 1088x1088.*1024x1024 at most"):
        check_inputs(
            GenerationSettings(
                **{**big, "width": 1088, "height": 1088}, inputs={"image": Image.new("RGB", (8, 8))}
            )
        )
    check_inputs(GenerationSettings(**{**big, "family": "zimage"}, hires=HiresFix(upscaler="Lanczos")))


T4 = DeviceFacts("Tesla T4", 15.0, bf16=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_faked_t4_is_refused(name, monkeypatch):
    import nbkit.models.memory as memory

    monkeypatch.setattr(memory, "device_facts", lambda index=0: T4)
    title = re.escape(get_family(name).title)
    with pytest.raises(NbkitError, match=rf"Tesla T4 cannot run {title}: it has no bfloat16") as caught:
        plan_generation_memory(name, "cuda")
    assert "L4 or A100" in str(caught.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_faked_small_gpu_is_refused(name, monkeypatch):
    import nbkit.models.memory as memory

    monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("Tiny GPU", 2.0, bf16=True))
    with pytest.raises(
        NbkitError, match=rf"Tiny GPU has 2 GiB, too little to run {get_family(name).title[:6]}"
    ):
        plan_generation_memory(name, "cuda")
