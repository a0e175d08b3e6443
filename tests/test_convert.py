"""diffusers <-> single-file conversion on the tiny models of every family: exact, readable by diffusers
itself, labelled, and hashed as A1111 hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.cli import main
from nbkit.convert import (
    convert_to_single_file,
    detect_family,
    load_single_file,
    model_hashes,
    resolve_family,
)
from nbkit.convert.keymaps_text import text_encoder_to_ldm
from nbkit.errors import NbkitError

FAMILIES = ["sd1", "sd2", "sd2-v", "sdxl"]
COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2"]
TINY_SIZE = {"sd1": 64, "sd2": 64, "sd2-v": 128, "sdxl": 64}
PREDICTION = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v_prediction", "sdxl": "epsilon"}


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """`converted(family, dtype)` -> (report, source folder), converted once per module."""
    done = {}

    def get(family: str, dtype: str = "fp32"):
        if (family, dtype) not in done:
            out = tmp_path_factory.mktemp(f"single-{family}") / f"{family}-{dtype}.safetensors"
            done[family, dtype] = (
                convert_to_single_file(tiny_model_dir(family), out, dtype=dtype),
                tiny_model_dir(family),
            )
        return done[family, dtype]

    return get


def _source_pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _assert_same_weights(expected, actual):
    for name in COMPONENTS:
        if getattr(expected, name, None) is None:
            continue
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert set(want) == set(got), name
        different = [key for key in want if not torch.equal(want[key], got[key])]
        assert not different, f"{name}: {different[:3]}"


def _images(pipeline, family):
    size = TINY_SIZE[family]
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a photo of a dog",
        num_inference_steps=2,
        generator=generator,
        height=size,
        width=size,
        output_type="np",
    ).images


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(converted, family):
    report, source = converted(family)
    assert report.family == family and report.prediction_type == PREDICTION[family]
    assert report.verified
    pipeline = load_single_file(report.output)
    _assert_same_weights(_source_pipeline(source), pipeline)
    assert pipeline.scheduler.config.prediction_type == PREDICTION[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_own_reader_gives_the_same_images(converted, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    report, source = converted(family)
    if family == "sdxl":
        ours = StableDiffusionXLPipeline.from_single_file(
            report.output, config=str(source), local_files_only=True
        )
    else:
        ours = StableDiffusionPipeline.from_single_file(
            report.output,
            config=str(source),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    reference = _source_pipeline(source)
    _assert_same_weights(reference, ours)
    np.testing.assert_array_equal(_images(reference, family), _images(ours, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_original_key_layout(converted, family):
    report, _ = converted(family)
    with safe_open(report.output, "pt") as handle:
        keys = set(handle.keys())
        text_prefix = {
            "sd1": "cond_stage_model.transformer.text_model.",
            "sd2": "cond_stage_model.model.transformer.resblocks.",
            "sd2-v": "cond_stage_model.model.transformer.resblocks.",
            "sdxl": "conditioner.embedders.1.model.transformer.resblocks.",
        }[family]
        assert any(key.startswith(text_prefix) for key in keys)
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
        assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
        assert len(handle.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()) == 4
        if family != "sd1":
            prefix = "conditioner.embedders.1.model." if family == "sdxl" else "cond_stage_model.model."
            fused = handle.get_slice(f"{prefix}transformer.resblocks.0.attn.in_proj_weight").get_shape()
            width = handle.get_slice(f"{prefix}ln_final.weight").get_shape()[0]
            assert fused == [3 * width, width]
        if family == "sdxl":
            assert any(key.startswith("conditioner.embedders.0.transformer.text_model.") for key in keys)
            assert "conditioner.embedders.1.model.text_projection" in keys
        assert not any("position_ids" in key for key in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detection(converted, tiny_model_dir, family):
    report, _ = converted(family)
    guess = detect_family(report.output)
    assert (guess.family, guess.prediction_type) == (family, PREDICTION[family])
    assert detect_family(tiny_model_dir(family)).family == family


def test_metadata_in_header(converted, tiny_model_dir, tmp_path):
    report, _ = converted("sd2-v")
    with safe_open(report.output, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["modelspec.resolution"] == "128x128"
    assert metadata["modelspec.title"] == "sd2-v-fp32"
    assert (metadata["nbkit.family"], metadata["nbkit.prediction_type"]) == ("sd2-v", "v_prediction")
    assert report.metadata == metadata

    extra = {"nbkit.session.settings": {"steps": 1500, "lr": 2e-6}, "modelspec.description": "my dog"}
    out = convert_to_single_file(tiny_model_dir("sd1"), tmp_path / "dog.safetensors", metadata=extra)
    with safe_open(out.output, "pt") as handle:
        written = handle.metadata()
    assert json.loads(written["nbkit.session.settings"]) == {"steps": 1500, "lr": 2e-6}
    assert written["modelspec.description"] == "my dog"
    with pytest.raises(NbkitError, match=r"nbkit.family"):
        convert_to_single_file(
            tiny_model_dir("sd1"), tmp_path / "bad.safetensors", metadata={"nbkit.family": "sdxl"}
        )


def test_fp16_is_half_the_size_and_bf16_works(converted, tmp_path):
    full, _ = converted("sd1")
    half, _ = converted("sd1", "fp16")
    assert 0.45 < half.file_size / full.file_size < 0.55
    assert {tensor.dtype for tensor in load_file(half.output).values()} == {torch.float16}
    reference = load_file(full.output)
    assert all(
        torch.equal(value.half(), reference[key].half()) for key, value in load_file(half.output).items()
    )
    bf16 = convert_to_single_file(full.output, tmp_path / "bf16.safetensors", dtype="bf16")
    assert {tensor.dtype for tensor in load_file(bf16.output).values()} == {torch.bfloat16}


def test_hashes_are_a1111s(converted):
    report, _ = converted("sd1")
    data = Path(report.output).read_bytes()
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.short_hash == report.sha256[:10]
    assert report.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert model_hashes(report.output) == (report.sha256, report.short_hash, report.legacy_hash)


def test_ckpt_output_round_trips(converted, tmp_path):
    report, source = converted("sd1")
    ckpt = convert_to_single_file(source, tmp_path / "model.ckpt", dtype="fp32")
    assert ckpt.format == "ckpt" and ckpt.verified
    loaded = torch.load(ckpt.output, weights_only=True)
    assert set(loaded) == {"state_dict", "nbkit_metadata"}
    safetensors = load_file(report.output)
    assert set(loaded["state_dict"]) == set(safetensors)
    assert all(torch.equal(loaded["state_dict"][key], value) for key, value in safetensors.items())
    # and back: .ckpt -> .safetensors keeps every tensor and labels the file
    again = convert_to_single_file(ckpt.output, tmp_path / "again.safetensors", dtype="fp32")
    assert load_file(again.output).keys() == safetensors.keys()
    assert again.family == "sd1" and again.metadata["nbkit.family"] == "sd1"


def test_ckpt_keeps_the_metadata(converted, tmp_path):
    report, _ = converted("sd2-v")
    ckpt = convert_to_single_file(report.output, tmp_path / "v.ckpt")
    assert torch.load(ckpt.output, weights_only=True)["nbkit_metadata"]["nbkit.family"] == "sd2-v"
    assert detect_family(ckpt.output).family == "sd2-v"  # without it, an SD 2.x .ckpt is ambiguous


def test_sd2_without_metadata_needs_the_users_choice(converted, tiny_model_dir, tmp_path, capsys):
    report, _ = converted("sd2-v")
    bare = tmp_path / "foreign-sd2.safetensors"
    save_file(load_file(report.output), bare)  # the same weights, no metadata: a foreign SD 2.x file
    guess = detect_family(bare)
    assert guess.ambiguous and guess.candidates == ("sd2", "sd2-v")
    with pytest.raises(NbkitError, match="--family sd2 or --family sd2-v"):
        resolve_family(guess, None, bare)
    assert main(["convert", str(bare), str(tmp_path / "out.safetensors")]) == 2
    assert "--family sd2 or --family sd2-v" in capsys.readouterr().err
    assert main(["convert", str(bare), str(tmp_path / "out.safetensors"), "--family", "sd2-v"]) == 0
    assert detect_family(tmp_path / "out.safetensors").family == "sd2-v"
    with pytest.raises(NbkitError, match="--family"):
        load_single_file(bare, config=tiny_model_dir("sd2-v"))
    pipeline = load_single_file(bare, family="sd2-v", config=tiny_model_dir("sd2-v"))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(NbkitError, match="not sdxl"):
        resolve_family(guess, "sdxl", bare)
    # a v_pred marker key settles it
    marked = tmp_path / "marked.safetensors"
    save_file({**load_file(bare), "v_pred": torch.tensor([])}, marked)
    assert detect_family(marked).family == "sd2-v"


def test_both_clip_key_spellings_convert_alike(tiny_model_dir):
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(tiny_model_dir("sd1") / "text_encoder")
    flat = encoder.state_dict()
    prefixed = {
        key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in flat.items()
    }
    prefix = "cond_stage_model.transformer."
    ours = text_encoder_to_ldm(flat, encoder.config.to_dict(), open_clip=False, prefix=prefix)
    theirs = text_encoder_to_ldm(prefixed, encoder.config.to_dict(), open_clip=False, prefix=prefix)
    assert ours.keys() == theirs.keys() and all(key.startswith(prefix + "text_model.") for key in ours)


def test_cli_convert(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["convert", str(tiny_model_dir("sd1")), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model hash:" in printed and model_hashes(out)[1] in printed
    assert main(["convert", str(out), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["convert", str(tiny_model_dir("sd1")), str(tmp_path / "x.bin")]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_legacy_bin_folders_convert_alike(converted, tmp_path):
    from nbkit.models.tiny import save_tiny_pipeline

    report, _ = converted("sd1")
    legacy = save_tiny_pipeline("sd1", tmp_path / "legacy", safe_serialization=False)
    assert (legacy / "unet" / "diffusion_pytorch_model.bin").is_file()
    from_bin = load_file(convert_to_single_file(legacy, tmp_path / "bin.safetensors", dtype="fp32").output)
    expected = load_file(report.output)
    assert from_bin.keys() == expected.keys()
    assert all(torch.equal(from_bin[key], value) for key, value in expected.items())


def test_a_missing_tokenizer_is_an_error_not_an_empty_tokenizer(monkeypatch):
    import nbkit.convert.tokenizers as tokenizers
    from nbkit.convert.from_single_file import shipped_config_dir
    from nbkit.convert.tokenizers import load_tokenizer

    # Offline (as in every test) with nothing cached, transformers returns a 2-token tokenizer.
    monkeypatch.setattr(tokenizers, "_hub_repo", lambda family: "nbkit-tests/never-cached")
    with pytest.raises(NbkitError, match="not available"):
        load_tokenizer("tokenizer", "sd1", shipped_config_dir("sd1"), 49408)
