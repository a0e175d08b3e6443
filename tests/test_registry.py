"""The base-model registry, the family facts and resolution validation."""

from __future__ import annotations

import pytest

from nbkit.cli import main
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, get_family
from nbkit.models import registry
from nbkit.models.registry import MODELS, get_model, validate_resolution


def test_family_facts():
    facts = {
        name: (f.prediction_type, f.native_resolution, f.text_encoder_count) for name, f in FAMILIES.items()
    }
    assert facts == {
        "sd1": ("epsilon", 512, 1),
        "sd2": ("epsilon", 512, 1),
        "sd2-v": ("v_prediction", 768, 1),
        "sdxl": ("epsilon", 1024, 2),
        "flux": ("flow", 1024, 2),
        "zimage": ("flow", 1024, 1),
        "flux2": ("flow", 1024, 1),
    }
    assert tuple(name for name, f in FAMILIES.items() if f.denoiser == "unet") == (
        "sd1",
        "sd2",
        "sd2-v",
        "sdxl",
    )
    with pytest.raises(NbkitError, match="sd1, sd2, sd2-v, sdxl, flux"):
        get_family("sd3")


@pytest.mark.parametrize(
    ("key", "repo_id", "family", "prediction", "native"),
    [
        ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", "epsilon", 512),
        ("sd21-512", "stabilityai/stable-diffusion-2-1-base", "sd2", "epsilon", 512),
        ("sd21-768", "stabilityai/stable-diffusion-2-1", "sd2-v", "v_prediction", 768),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "epsilon", 1024),
        ("flux1-dev", "black-forest-labs/FLUX.1-dev", "flux", "flow", 1024),
        ("flux1-schnell", "black-forest-labs/FLUX.1-schnell", "flux", "flow", 1024),
        ("zimage-turbo", "Tongyi-MAI/Z-Image-Turbo", "zimage", "flow", 1024),
        ("flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", "flux2", "flow", 1024),
    ],
)
def test_hub_models(key, repo_id, family, prediction, native):
    spec = get_model(key)
    assert (spec.repo_id, spec.family, spec.prediction_type, spec.native_resolution) == (
        repo_id,
        family,
        prediction,
        native,
    )
    assert spec.source == "hub" and native in spec.allowed_resolutions
    assert get_model(repo_id) is spec
    assert get_model(repo_id.upper()) is spec


def test_renamed_repo_is_an_alias():
    assert get_model("runwayml/stable-diffusion-v1-5").key == "sd15"


def test_tiny_models_are_registered():
    for family in FAMILIES:
        spec = get_model(f"tiny-{family}")
        assert (spec.family, spec.source, spec.repo_id) == (family, "tiny", None)
        assert spec.native_resolution in spec.allowed_resolutions


def test_modelspec_names_of_each_family():
    assert {name: spec.modelspec_architecture for name, spec in FAMILIES.items()} == {
        "sd1": "stable-diffusion-v1",
        "sd2": "stable-diffusion-v2-512",
        "sd2-v": "stable-diffusion-v2-768-v",
        "sdxl": "stable-diffusion-xl-v1-base",
        "flux": "flux-1-dev",
        "zimage": "z-image",
        "flux2": "flux-2-klein",
    }
    assert FAMILIES["sdxl"].modelspec_implementation == "https://github.com/Stability-AI/generative-models"


def test_unknown_model_lists_the_keys():
    with pytest.raises(NbkitError) as caught:
        get_model("sd-9.9")
    message = str(caught.value)
    assert "'sd-9.9' is not a model nbkit knows" in message
    assert all(key in message for key in MODELS)


@pytest.mark.parametrize("spelling", ["sd15", "sd1.5", "SD 1.5", "sd-1.5", "SD_15"])
def test_common_spellings_of_a_key_find_it(spelling):
    assert get_model(spelling).key == "sd15"


@pytest.mark.parametrize(
    ("key", "px", "accepted"),
    [
        ("sd15", 512, True),
        ("sd15", 384, True),
        ("sd15", 640, True),
        ("sd15", 768, False),
        ("sd15", 256, False),
        ("sd21-512", 768, False),
        ("sd21-768", 768, True),
        ("sd21-768", 512, False),
        ("sdxl", 1024, True),
        ("sdxl", 768, True),
        ("sdxl", 512, False),
        ("sdxl", 704, False),
        ("tiny-sd1", 64, True),
        ("tiny-sd2-v", 128, True),
        ("tiny-sdxl", 512, False),
    ],
)
def test_resolution_table(key, px, accepted):
    spec = get_model(key)
    if accepted:
        assert validate_resolution(spec, px) == px
    else:
        with pytest.raises(NbkitError, match="needs force_resolution=True"):
            validate_resolution(spec, px)
        with pytest.warns(UserWarning, match=f"forcing resolution {px}"):
            assert validate_resolution(spec, px, force=True) == px


def test_768_on_sd15_says_why():
    with pytest.raises(NbkitError) as caught:
        validate_resolution(get_model("sd15"), 768)
    assert (
        "SD 1.x was trained at 512; 768 needs force_resolution=True and usually gives doubled subjects"
        in str(caught.value)
    )


def test_a_tiny_model_says_what_it_is_built_at():
    with pytest.raises(NbkitError) as caught:
        validate_resolution(get_model("tiny-sd1"), 512)
    message = str(caught.value)
    assert "the tiny test model tiny-sd1 is built at 64 px (SD 1.x itself was trained at 512)" in message
    assert "SD 1.x was trained at 64" not in message
    assert "try it anyway with force_resolution=True" in message
    assert "try it anyway with --force-resolution" in caught.value.render("cli")


def test_sdxl_below_768_says_why():
    with pytest.raises(NbkitError, match="SDXL was trained at 1024; 512 needs force_resolution=True"):
        validate_resolution(get_model("sdxl"), 512)


@pytest.mark.parametrize("px", [520, 500, 1000, 0, -512, 512.0, True, "512"])
def test_bad_sizes_are_refused_even_with_force(px):
    with pytest.raises(NbkitError, match=r"multiple of 64|positive whole number"):
        validate_resolution(get_model("sd15"), px, force=True)


def test_520_suggests_the_neighbours():
    with pytest.raises(NbkitError, match="use 512 or 576"):
        validate_resolution(get_model("sd15"), 520)


def test_specs_are_frozen():
    with pytest.raises(AttributeError):
        registry.MODELS["sd15"].family = "sdxl"


def test_cli_model_list(capsys):
    assert main(["model", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "FAMILY", "PREDICTION", "NATIVE", "RANGE", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(MODELS)
    assert rows["sd21-768"][:5] == ["sd21-768", "sd2-v", "v_prediction", "768", "640-960"]


def test_flux_sizes_step_by_16_and_dev_is_gated():
    dev, schnell = get_model("flux1-dev"), get_model("flux1-schnell")
    assert dev.gated and not schnell.gated and dev.variant is None
    assert validate_resolution(dev, 1040) == 1040  # 16 divides it, 64 does not
    assert (dev.allowed_resolutions[0], dev.allowed_resolutions[-1]) == (512, 1536)
    with pytest.raises(NbkitError, match="not a multiple of 16") as error:
        validate_resolution(dev, 1000)
    assert "use 992 or 1008" in str(error.value)
    with pytest.raises(NbkitError, match="not a multiple of 64"):
        validate_resolution(get_model("sdxl"), 1040)
