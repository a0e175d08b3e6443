"""What single files carry besides the diffusers weights: SD 2.x's whole text tower, the .yaml A1111
reads beside a 768-v file, and the SAI model spec's recommended keys (description, author, the hash)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.convert import convert_to_single_file, load_single_file
from nbkit.convert.from_single_file import shipped_config_dir
from nbkit.convert.metadata import METADATA_TEXT_EXTRAS
from nbkit.convert.text_extras import IDENTITY_ORIGIN
from nbkit.errors import NbkitError

OPEN_CLIP = "cond_stage_model.model."


@pytest.fixture(scope="module")
def sd2(tiny_model_dir, tmp_path_factory):
    """(the sd2-v folder, its fp32 single file without a base checkpoint)."""
    folder = tiny_model_dir("sd2-v")
    out = tmp_path_factory.mktemp("extras") / "sd2-v.safetensors"
    return folder, convert_to_single_file(folder, out, dtype="fp32")


def _layers(folder: Path) -> int:
    return json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]


def _assert_same_weights(expected, actual):
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert set(want) == set(got)
        assert all(torch.equal(want[key], got[key]) for key in want), name


def test_sd2_files_carry_the_last_text_block_as_an_identity_block(sd2):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    folder, report = sd2
    layers = _layers(folder)
    tensors = load_file(report.output)
    last = f"{OPEN_CLIP}transformer.resblocks.{layers}."
    block = {key: value for key, value in tensors.items() if key.startswith(last)}
    assert len(block) == 12 and all(not value.any() for value in block.values())
    assert f"{OPEN_CLIP}transformer.resblocks.{layers + 1}.ln_1.weight" not in tensors
    assert json.loads(report.metadata[METADATA_TEXT_EXTRAS]) == {IDENTITY_ORIGIN: sorted(block)}

    # A text tower that runs every block (as ComfyUI's "last layer" does) gets the penultimate block's
    # output, the one SD 2.x uses, bit for bit.
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    config.num_hidden_layers = layers + 1
    full = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(full, tensors, prefix=OPEN_CLIP)
    if not hasattr(full, "text_model"):
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    full.load_state_dict({key: converted[key] for key in full.state_dict()}, strict=True)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407]]) % config.vocab_size
    with torch.no_grad():
        hidden = full(tokens, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[-1], hidden[-2])


def test_both_readers_load_the_diffusers_weights_bit_exactly(sd2):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    folder, report = sd2
    reference = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    _assert_same_weights(reference, load_single_file(report.output))
    theirs = StableDiffusionPipeline.from_single_file(
        report.output,
        config=str(folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    _assert_same_weights(reference, theirs)


def _original_style_base(report, folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """The converted file with its own last block, text_projection and logit_scale, as Stability's files have."""
    tensors = load_file(report.output)
    generator = torch.Generator().manual_seed(3)
    last = f"{OPEN_CLIP}transformer.resblocks.{_layers(folder)}."
    for key in [key for key in tensors if key.startswith(last)]:
        tensors[key] = torch.randn(tensors[key].shape, generator=generator)
    width = tensors[f"{OPEN_CLIP}ln_final.weight"].shape[0]
    tensors[f"{OPEN_CLIP}text_projection"] = torch.randn(width, width, generator=generator)
    tensors[f"{OPEN_CLIP}logit_scale"] = torch.tensor(4.6052)
    save_file(tensors, path)
    return tensors


def test_the_base_models_own_tensors_are_carried_through(sd2, tmp_path):
    folder, report = sd2
    base = tmp_path / "v2-1_768-ema-pruned.safetensors"
    originals = _original_style_base(report, folder, base)
    out = convert_to_single_file(folder, tmp_path / "trained.safetensors", dtype="fp32", base_checkpoint=base)
    written = load_file(out.output)
    last = f"{OPEN_CLIP}transformer.resblocks.{_layers(folder)}."
    extras = sorted(key for key in originals if key not in load_file(report.output) or key.startswith(last))
    assert json.loads(out.metadata[METADATA_TEXT_EXTRAS]) == {base.name: extras}
    assert all(torch.equal(written[key], originals[key]) for key in extras)
    assert f"{OPEN_CLIP}text_projection" in extras and f"{OPEN_CLIP}logit_scale" in extras
    # The text encoder still loads as the diffusers model's, to the bit.
    loaded = load_single_file(out.output).text_encoder.state_dict()
    saved = load_file(folder / "text_encoder" / "model.safetensors")
    saved = {
        key.removeprefix("text_model."): value for key, value in saved.items() if "position_ids" not in key
    }
    loaded = {
        key.removeprefix("text_model."): value for key, value in loaded.items() if "position_ids" not in key
    }
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[key], loaded[key]) for key in saved)
    # A base of nbkit's own keeps saying where its extras came from.
    again = convert_to_single_file(folder, tmp_path / "again.safetensors", base_checkpoint=report.output)
    assert json.loads(again.metadata[METADATA_TEXT_EXTRAS]) == {
        IDENTITY_ORIGIN: json.loads(report.metadata[METADATA_TEXT_EXTRAS])[IDENTITY_ORIGIN]
    }


def test_a_base_of_another_architecture_is_refused(sd2, tiny_model_dir, tmp_path):
    folder, report = sd2
    sd1 = convert_to_single_file(tiny_model_dir("sd1"), tmp_path / "sd1.safetensors", dtype="fp32")
    with pytest.raises(NbkitError) as caught:
        convert_to_single_file(folder, tmp_path / "out.safetensors", base_checkpoint=sd1.output)
    assert "does not fit this model's text_encoder" in str(caught.value)
    assert "sd1.safetensors" in str(caught.value) and "base_checkpoint" in str(caught.value)
    with pytest.raises(NbkitError, match="diffusers folder"):
        convert_to_single_file(report.output, tmp_path / "out.safetensors", base_checkpoint=report.output)


def test_sdxl_and_sd1_files_get_no_extra_blocks(tiny_model_dir, tmp_path):
    for family in ("sd1", "sdxl"):
        report = convert_to_single_file(tiny_model_dir(family), tmp_path / f"{family}.safetensors")
        assert METADATA_TEXT_EXTRAS not in report.metadata
        assert report.config_file is None and not (tmp_path / f"{family}.yaml").exists()


def test_a_768_v_file_gets_the_yaml_a1111_reads(sd2, tmp_path):
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    folder, _ = sd2
    for name in ("model.safetensors", "model.ckpt"):
        out = convert_to_single_file(folder, tmp_path / name)
        yaml_path = tmp_path / "model.yaml"
        assert out.config_file == str(yaml_path) and "config:" in str(out)
        original = yaml.safe_load(yaml_path.read_text())
        assert original["model"]["params"]["parameterization"] == "v"
        assert original["model"]["params"]["cond_stage_config"]["params"]["layer"] == "penultimate"
        yaml_path.unlink()
    # The yaml is the real SD 2.x 768-v architecture: diffusers reads it as nbkit's shipped configs.
    shipped = shipped_config_dir("sd2-v")
    unet = create_unet_diffusers_config_from_ldm(original, {}, image_size=768)
    expected = json.loads((shipped / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "cross_attention_dim", "use_linear_projection", "layers_per_block"):
        assert (
            list(unet[key]) == list(expected[key])
            if isinstance(unet[key], list)
            else unet[key] == expected[key]
        )
    assert list(unet["attention_head_dim"]) == list(expected["attention_head_dim"])
    vae = create_vae_diffusers_config_from_ldm(original, {}, image_size=768)
    assert (
        list(vae["block_out_channels"])
        == json.loads((shipped / "vae" / "config.json").read_text())["block_out_channels"]
    )


def test_a_stale_yaml_of_ours_goes_a_users_own_stays(sd2, tiny_model_dir, tmp_path):
    folder, _ = sd2
    convert_to_single_file(folder, tmp_path / "model.safetensors")
    assert (tmp_path / "model.yaml").is_file()
    # Same name, now an epsilon model: a v-prediction yaml beside it would mislead A1111.
    convert_to_single_file(tiny_model_dir("sd1"), tmp_path / "model.safetensors")
    assert not (tmp_path / "model.yaml").exists()
    (tmp_path / "model.yaml").write_text("model: {params: {}}  # the user's own\n")
    convert_to_single_file(tiny_model_dir("sd1"), tmp_path / "model.safetensors")
    assert (tmp_path / "model.yaml").read_text().endswith("# the user's own\n")


def _tensor_data_sha256(path: Path) -> str:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return "0x" + hashlib.sha256(data[8 + length :]).hexdigest()


def test_modelspec_hash_is_of_the_tensor_data_and_the_a1111_hash_of_the_final_file(sd2, tmp_path):
    folder, report = sd2
    path = Path(report.output)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert (
        metadata["modelspec.hash_sha256"]
        == _tensor_data_sha256(path)
        == report.metadata["modelspec.hash_sha256"]
    )
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the header as finally written
    # Without verification the hashes are the same.
    quick = convert_to_single_file(folder, tmp_path / "quick.safetensors", dtype="fp32", verify=False)
    assert quick.metadata["modelspec.hash_sha256"] == _tensor_data_sha256(Path(quick.output))
    assert quick.sha256 == hashlib.sha256(Path(quick.output).read_bytes()).hexdigest()
    # A .ckpt of the same tensors records the same value; re-encoding computes it afresh.
    ckpt = convert_to_single_file(folder, tmp_path / "model.ckpt", dtype="fp32")
    assert ckpt.metadata["modelspec.hash_sha256"] == metadata["modelspec.hash_sha256"]
    half = convert_to_single_file(path, tmp_path / "half.safetensors", dtype="fp16")
    assert half.metadata["modelspec.hash_sha256"] == _tensor_data_sha256(Path(half.output))
    assert half.metadata["modelspec.hash_sha256"] != metadata["modelspec.hash_sha256"]
    with pytest.raises(NbkitError, match=r"modelspec\.hash_sha256"):
        convert_to_single_file(folder, tmp_path / "x.safetensors", metadata={"modelspec.hash_sha256": "0x1"})


def test_description_and_author(sd2, tmp_path):
    folder, report = sd2
    assert report.metadata["modelspec.description"].startswith("SD 2.x (768, v-prediction) model")
    assert "modelspec.author" not in report.metadata  # nbkit does not invent one
    mine = convert_to_single_file(folder, tmp_path / "mine.safetensors", description="My dog", author="Ann")
    assert (mine.metadata["modelspec.description"], mine.metadata["modelspec.author"]) == ("My dog", "Ann")
    # Re-encoding keeps them (the SAI spec: copy the source's keys).
    again = convert_to_single_file(mine.output, tmp_path / "again.safetensors")
    assert (again.metadata["modelspec.description"], again.metadata["modelspec.author"]) == ("My dog", "Ann")


@pytest.mark.parametrize("first", ["nbkit.models.loading", "nbkit.convert", "nbkit.convert.detect"])
def test_loading_and_convert_import_each_other_plainly(first):
    """No import cycle between model loading and conversion, whichever is imported first."""
    code = f"import {first}; import nbkit.models.loading, nbkit.convert; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
