"""FLUX.1 transformer <-> the BFL single file (ComfyUI, Forge), round-tripped through diffusers' own loader."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from nbkit.cli import main
from nbkit.convert import convert_to_single_file, detect_family, load_single_file
from nbkit.convert.flux import diffusers_to_bfl, load_flux_transformer, save_flux_transformer
from nbkit.errors import NbkitError

WIDTH = 32  # the tiny model: 2 heads x 16
MLP = 4 * WIDTH


@pytest.fixture(scope="module")
def flux_dir(tiny_model_dir):
    return tiny_model_dir("flux")


@pytest.fixture(scope="module")
def original(flux_dir):
    from diffusers import FluxTransformer2DModel

    return aligned(FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer").eval())


@pytest.fixture(scope="module")
def bfl_file(flux_dir, tmp_path_factory):
    return save_flux_transformer(flux_dir, tmp_path_factory.mktemp("bfl") / "flux-tiny.safetensors")


def aligned(model):
    """The model with its weights in fresh memory. CPU kernels round differently for weights mapped
    from a file at unaligned addresses, so two models compared to the bit must both own theirs."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    return model


def read(path):
    with safe_open(path, "pt") as handle:
        keys = handle.keys()  # safe_open is not iterable
        return {key: handle.get_tensor(key) for key in keys}, handle.metadata()


def forward(transformer, guidance: bool = True):
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_ids": torch.randint(0, 4, (16, 3), generator=generator).float(),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]) if guidance else None,
    }
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def assert_same_weights(expected, loaded):
    a, b = expected.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    different = [key for key in a if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key])]
    assert not different, different[:5]


def test_round_trip_is_bit_exact_through_diffusers_loader(original, bfl_file, flux_dir):
    for config in (flux_dir, flux_dir / "transformer", None):  # pipeline, transformer folder, stored config
        loaded = load_flux_transformer(bfl_file, config)
        assert type(loaded).__name__ == "FluxTransformer2DModel"
        assert_same_weights(original, loaded)
    assert torch.equal(forward(original), forward(aligned(loaded)))


def test_keys_follow_the_bfl_layout(original, bfl_file):
    tensors, metadata = read(bfl_file)
    ours = original.state_dict()
    assert tensors["double_blocks.0.img_attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
    assert torch.equal(
        tensors["double_blocks.1.txt_attn.qkv.bias"],
        torch.cat([ours[f"transformer_blocks.1.attn.add_{x}_proj.bias"] for x in "qkv"]),
    )
    assert tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (WIDTH // 2,)
    assert tensors["double_blocks.0.img_mlp.0.weight"].shape == (MLP, WIDTH)
    assert tensors["double_blocks.0.img_mlp.2.weight"].shape == (WIDTH, MLP)
    assert tensors["double_blocks.0.txt_mod.lin.weight"].shape == (6 * WIDTH, WIDTH)
    linear1 = tensors["single_blocks.1.linear1.weight"]
    assert linear1.shape == (3 * WIDTH + MLP, WIDTH)
    assert torch.equal(linear1[WIDTH : 2 * WIDTH], ours["single_transformer_blocks.1.attn.to_k.weight"])
    assert torch.equal(linear1[3 * WIDTH :], ours["single_transformer_blocks.1.proj_mlp.weight"])
    assert tensors["single_blocks.0.linear2.weight"].shape == (WIDTH, WIDTH + MLP)
    assert tensors["single_blocks.0.modulation.lin.weight"].shape == (3 * WIDTH, WIDTH)
    assert tensors["single_blocks.0.norm.key_norm.scale"].shape == (WIDTH // 2,)
    for key in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer"):
        assert f"{key}.weight" in tensors and f"{key}.bias" in tensors
    assert "guidance_in.out_layer.weight" in tensors
    assert torch.equal(tensors["final_layer.linear.weight"], ours["proj_out.weight"])
    # BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
    adaln = tensors["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(adaln[:WIDTH], ours["norm_out.linear.weight"][WIDTH:])
    assert torch.equal(adaln[WIDTH:], ours["norm_out.linear.weight"][:WIDTH])
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in ours.values())
    assert not any(key.startswith(("transformer_blocks", "model.")) for key in tensors)
    assert metadata["modelspec.architecture"] == "flux-1-dev"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert metadata["modelspec.title"] == "flux-tiny" and metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.hash_sha256"].startswith("0x")
    assert diffusers_to_bfl(ours, original.config).keys() == tensors.keys()


def test_schnell_like_model(tmp_path):
    from nbkit.families.flux1 import FAMILY

    torch.manual_seed(0)
    transformer = FAMILY.make_tiny_pipeline(guidance=False).transformer.eval()
    out = save_flux_transformer(
        transformer, tmp_path / "schnell.safetensors", metadata={"nbkit.run": {"steps": 4}}
    )
    tensors, metadata = read(out)
    assert metadata["modelspec.architecture"] == "flux-1-schnell"
    assert metadata["nbkit.run"] == '{"steps": 4}'
    assert not any("guidance" in key for key in tensors)
    loaded = load_flux_transformer(out)
    assert loaded.config.guidance_embeds is False
    assert_same_weights(transformer, loaded)
    assert torch.equal(forward(transformer, guidance=False), forward(aligned(loaded), guidance=False))
    with pytest.raises(NbkitError, match=r"modelspec\.architecture"):
        save_flux_transformer(
            transformer, tmp_path / "x.safetensors", metadata={"modelspec.architecture": "sdxl"}
        )


def test_dtype_and_bad_inputs(original, flux_dir, tiny_model_dir, tmp_path):
    out = save_flux_transformer(original, tmp_path / "bf16.safetensors", dtype="bf16")
    tensors, _ = read(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["img_in.weight"], original.x_embedder.weight.detach().to(torch.bfloat16))
    with pytest.raises(NbkitError, match="safetensors"):
        save_flux_transformer(flux_dir, tmp_path / "x.ckpt")
    with pytest.raises(NbkitError, match=r"not a FLUX\.1 diffusers folder"):
        save_flux_transformer(flux_dir.parent / "nope", tmp_path / "y.safetensors")
    with pytest.raises(NbkitError, match=r"is sd1, not FLUX\.1"):
        save_flux_transformer(tiny_model_dir("sd1"), tmp_path / "y.safetensors")
    state = original.state_dict()
    state["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(NbkitError, match="no place for"):
        diffusers_to_bfl(state, original.config)
    del state["transformer_blocks.0.attn.extra.weight"], state["single_transformer_blocks.1.proj_mlp.weight"]
    with pytest.raises(NbkitError, match="proj_mlp"):
        diffusers_to_bfl(state, original.config)
    assert not list(tmp_path.glob(".nbkit-tmp-*"))


def test_sd_paths_point_flux_to_the_right_function(flux_dir, bfl_file, tmp_path, capsys):
    with pytest.raises(NbkitError, match="save_flux_transformer"):
        convert_to_single_file(flux_dir, tmp_path / "full.safetensors")
    for call in (lambda: detect_family(bfl_file), lambda: load_single_file(bfl_file)):
        with pytest.raises(NbkitError, match="base pipeline folder") as error:
            call()
        assert "load_flux_transformer" in str(error.value) and str(bfl_file) in str(error.value)
    assert main(["convert", str(bfl_file), str(tmp_path / "folder")]) == 2
    assert "load_flux_transformer" in capsys.readouterr().err
    assert main(["convert", str(flux_dir), str(tmp_path / "x.ckpt")]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_cli_converts_a_flux_folder(flux_dir, original, tmp_path):
    out = tmp_path / "cli-flux.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "nbkit", "convert", str(flux_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "FLUX.1 transformer" in done.stdout and "bf16" in done.stdout
    loaded = load_flux_transformer(out, flux_dir)
    assert_same_weights(original.to(torch.bfloat16), loaded)
    original.to(torch.float32)


def test_model_info_says_what_a_single_file_is(tiny_model_dir, tmp_path, capsys):
    from nbkit.cli import main
    from nbkit.convert import convert_to_single_file
    from nbkit.convert.flux import save_flux_transformer

    flux = save_flux_transformer(tiny_model_dir("flux"), tmp_path / "flux.safetensors")
    assert main(["model", "info", str(flux)]) == 0
    assert (
        "contents:   this is a FLUX.1 transformer in the Black Forest Labs layout" in capsys.readouterr().out
    )
    convert_to_single_file(tiny_model_dir("sdxl"), tmp_path / "sdxl.safetensors")
    assert main(["model", "info", str(tmp_path / "sdxl.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "family:     sdxl" in out and "prediction: epsilon" in out and "resolution: 64" in out
