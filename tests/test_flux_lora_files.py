"""The FLUX.1 LoRA for ComfyUI/Forge (kohya keys, fused qkv/linear1) equals the diffusers-format LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.convert.flux_lora import comfy_lora_state_dict, save_comfy_lora
from nbkit.errors import NbkitError

RANK, ALPHA, WIDTH = 4, 8.0, 32
# diffusers' Flux DreamBooth LoRA targets, on the double blocks, plus the single blocks' proj_out and
# the modulations. (diffusers' own kohya reader splits `linear1` at FLUX.1's real sizes only, so the
# single blocks' q, k, v and MLP input are checked by the weight-delta test below instead.)
LOADABLE = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
)
# Every kind of module, fused ones only partly covered (no to_k, no add_v_proj, no single to_v).
PARTIAL = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_v|add_q_proj|add_k_proj|to_out\.0)|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k)|proj_mlp|proj_out)|norm_out\.linear|proj_out|x_embedder"
    r"|time_text_embed\.guidance_embedder\.linear_1"
)


def lora_transformer(flux_dir, targets: str, alpha: float = ALPHA):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    transformer = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:  # peft starts lora_B at zero: give both sides real values
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return transformer


def save_diffusers_lora(transformer, folder, *, with_metadata: bool = True):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    extra = {"transformer_lora_adapter_metadata": transformer.peft_config["default"].to_dict()}
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        **(extra if with_metadata else {}),
    )
    return folder / "pytorch_lora_weights.safetensors"


def transformer_output(pipeline):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return pipeline.transformer(
            hidden_states=torch.randn(1, 16, 64, generator=generator),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.6]),
            img_ids=torch.randint(0, 4, (16, 3), generator=generator).float(),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]


@pytest.mark.parametrize("with_metadata", [True, False])
def test_comfy_file_loads_in_diffusers_to_the_same_output(tiny_model_dir, tmp_path, with_metadata):
    from diffusers import FluxPipeline

    flux_dir = tiny_model_dir("flux")
    transformer = lora_transformer(flux_dir, LOADABLE)
    diffusers_file = save_diffusers_lora(transformer, tmp_path, with_metadata=with_metadata)
    comfy_file = save_comfy_lora(diffusers_file, tmp_path / "subject.safetensors")
    assert comfy_file == tmp_path / "subject.safetensors"

    outputs = {}
    for name, lora in (("base", None), ("diffusers", diffusers_file), ("comfy", comfy_file)):
        pipeline = FluxPipeline.from_pretrained(flux_dir)
        if lora is not None:
            pipeline.load_lora_weights(lora)
        outputs[name] = transformer_output(pipeline)
    assert not torch.allclose(outputs["base"], outputs["diffusers"], atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(outputs["comfy"], outputs["diffusers"], atol=1e-5, rtol=1e-5)

    tensors = load_file(comfy_file)
    expected_alpha = ALPHA if with_metadata else RANK  # without metadata diffusers takes alpha = rank
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * RANK, WIDTH)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * WIDTH, 3 * RANK)
    assert tensors[f"{qkv}.alpha"].item() == 3 * expected_alpha
    assert tensors["lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight"].shape == (WIDTH, RANK)
    assert tensors["lora_unet_double_blocks_1_txt_mlp_2.alpha"].item() == expected_alpha
    assert tensors["lora_unet_single_blocks_1_linear2.lora_down.weight"].shape == (RANK, 5 * WIDTH)
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert names == {
        f"lora_unet_double_blocks_{i}_{stream}_{module}"
        for i in range(2)
        for stream in ("img", "txt")
        for module in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")
    } | {
        f"lora_unet_single_blocks_{i}_{module}" for i in range(2) for module in ("linear2", "modulation_lin")
    }
    with safe_open(comfy_file, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert metadata["modelspec.title"] == "subject" and metadata["ss_network_dim"] == str(RANK)
    assert metadata["modelspec.hash_sha256"].startswith("0x")


def delta(up, down, alpha):
    return (alpha / down.shape[0]) * up @ down


def test_fused_partial_and_swapped_modules_are_exact(tiny_model_dir, tmp_path):
    transformer = lora_transformer(tiny_model_dir("flux"), PARTIAL, alpha=2.0)
    diffusers_file = save_diffusers_lora(transformer, tmp_path)
    comfy_file = save_comfy_lora(
        diffusers_file, tmp_path / "partial.safetensors", metadata={"nbkit.steps": "5"}
    )
    comfy, ours = load_file(comfy_file), load_file(diffusers_file)

    def comfy_delta(name):
        return delta(
            comfy[f"{name}.lora_up.weight"], comfy[f"{name}.lora_down.weight"], comfy[f"{name}.alpha"].item()
        )

    def our_delta(module, rows):
        if f"transformer.{module}.lora_A.weight" not in ours:
            return torch.zeros(rows, WIDTH)
        return delta(
            ours[f"transformer.{module}.lora_B.weight"], ours[f"transformer.{module}.lora_A.weight"], 2.0
        )

    for i in range(2):
        block, single = f"transformer_blocks.{i}.attn.", f"single_transformer_blocks.{i}."
        expected = torch.cat([our_delta(block + name, WIDTH) for name in ("to_q", "to_k", "to_v")])
        torch.testing.assert_close(comfy_delta(f"lora_unet_double_blocks_{i}_img_attn_qkv"), expected)
        expected = torch.cat([our_delta(block + f"add_{x}_proj", WIDTH) for x in "qkv"])
        torch.testing.assert_close(comfy_delta(f"lora_unet_double_blocks_{i}_txt_attn_qkv"), expected)
        parts = [(single + "attn.to_q", WIDTH), (single + "attn.to_k", WIDTH), (single + "attn.to_v", WIDTH)]
        expected = torch.cat(
            [our_delta(name, rows) for name, rows in [*parts, (single + "proj_mlp", 4 * WIDTH)]]
        )
        linear1 = comfy_delta(f"lora_unet_single_blocks_{i}_linear1")
        assert linear1.shape == (7 * WIDTH, WIDTH)
        torch.testing.assert_close(linear1, expected)
        assert torch.equal(linear1[2 * WIDTH : 3 * WIDTH], torch.zeros(WIDTH, WIDTH))  # to_v not targeted
    norm_out = our_delta("norm_out.linear", 2 * WIDTH)
    torch.testing.assert_close(
        comfy_delta("lora_unet_final_layer_adaLN_modulation_1"),
        torch.cat([norm_out[WIDTH:], norm_out[:WIDTH]]),
    )
    torch.testing.assert_close(comfy_delta("lora_unet_final_layer_linear"), our_delta("proj_out", 64))
    assert "lora_unet_img_in.lora_down.weight" in comfy and "lora_unet_guidance_in_in_layer.alpha" in comfy
    assert comfy["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * 2.0
    assert not any("txt_mlp" in key or "img_mlp_0" in key or "mod_lin" in key for key in comfy)
    with safe_open(comfy_file, "pt") as handle:
        assert handle.metadata()["nbkit.steps"] == "5"


def test_bad_loras_are_refused(tmp_path):
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(RANK, WIDTH)}
    with pytest.raises(NbkitError, match="no lora_B"):
        comfy_lora_state_dict(good, rank=RANK, alpha=ALPHA)
    good["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.ones(WIDTH, RANK)
    assert set(comfy_lora_state_dict(good, rank=RANK, alpha=ALPHA)) == {
        "lora_unet_double_blocks_0_img_attn_qkv." + end
        for end in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    with pytest.raises(NbkitError, match="rank 4, not 8"):
        comfy_lora_state_dict(good, rank=8, alpha=ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        comfy_lora_state_dict(good, rank=RANK, alpha=0)
    text = {"text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": torch.ones(RANK, WIDTH)}
    with pytest.raises(NbkitError, match=r"not a LoRA weight of the FLUX\.1 transformer"):
        comfy_lora_state_dict({**good, **text}, rank=RANK, alpha=ALPHA)
    odd = {key.replace("attn.to_q", "attn.odd"): value for key, value in good.items()}
    with pytest.raises(NbkitError, match="no module for"):
        comfy_lora_state_dict(odd, rank=RANK, alpha=ALPHA)
    patterned = tmp_path / "patterned.safetensors"
    adapter = {"transformer.r": RANK, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {"to_q": 8}}
    save_file(good, patterned, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(adapter)})
    with pytest.raises(NbkitError, match="alpha_pattern") as error:
        save_comfy_lora(patterned, tmp_path / "out.safetensors")
    assert str(patterned) in str(error.value)
    with pytest.raises(NbkitError, match="safetensors"):
        save_comfy_lora(patterned, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_merges_a_lora_into_the_bfl_transformer_file(tiny_model_dir, tmp_path, capsys):
    from diffusers import FluxPipeline

    from nbkit.cli import main
    from nbkit.convert.flux import load_flux_transformer

    flux_dir = tiny_model_dir("flux")
    lora_file = save_diffusers_lora(lora_transformer(flux_dir, LOADABLE), tmp_path / "lora")
    with_lora = FluxPipeline.from_pretrained(flux_dir)
    with_lora.load_lora_weights(str(lora_file))
    expected = transformer_output(with_lora)
    out = tmp_path / "merged.safetensors"
    assert main(["convert", str(flux_dir), str(out), "--dtype", "fp32", "--lora", str(lora_file)]) == 0
    merged = FluxPipeline.from_pretrained(flux_dir, transformer=load_flux_transformer(out, flux_dir))
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())
    assert torch.allclose(transformer_output(merged), expected, atol=1e-5)
    assert not torch.allclose(transformer_output(FluxPipeline.from_pretrained(flux_dir)), expected, atol=1e-3)
    with safe_open(out, "pt") as file:
        assert file.metadata()["nbkit.merged_lora"] == "pytorch_lora_weights.safetensors:1"
    sd_folder = str(tiny_model_dir("sd1"))
    assert main(["convert", sd_folder, str(tmp_path / "x.safetensors"), "--lora", str(lora_file)]) == 2
    assert "diffusers applied 0 of the LoRA's" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_merges_the_comfy_file_diffusers_cannot_read_at_the_tiny_width(tiny_model_dir, tmp_path):
    # diffusers' kohya reader cuts linear1 at FLUX.1's real widths; nbkit merges its own file itself.
    from diffusers import FluxPipeline

    from nbkit.cli import main
    from nbkit.convert.flux import load_flux_transformer

    flux_dir = tiny_model_dir("flux")
    lora_file = save_diffusers_lora(lora_transformer(flux_dir, PARTIAL), tmp_path / "lora")
    comfy = save_comfy_lora(lora_file, tmp_path / "comfy.safetensors")
    with_lora = FluxPipeline.from_pretrained(flux_dir)
    with_lora.load_lora_weights(str(lora_file))
    with_lora.fuse_lora(lora_scale=0.5)
    with_lora.unload_lora_weights()
    expected = with_lora.transformer.state_dict()
    out = tmp_path / "m.safetensors"
    args = [
        "convert",
        str(flux_dir),
        str(out),
        "--dtype",
        "fp32",
        "--lora",
        str(comfy),
        "--lora-weight",
        "0.5",
    ]
    assert main(args) == 0
    merged = load_flux_transformer(out, flux_dir).state_dict()
    assert merged.keys() == expected.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)
    base = FluxPipeline.from_pretrained(flux_dir).transformer.state_dict()
    assert not torch.equal(
        merged["single_transformer_blocks.0.attn.to_q.weight"],
        base["single_transformer_blocks.0.attn.to_q.weight"],
    )


def test_the_architecture_says_dev_or_schnell(tiny_model_dir, tmp_path):
    lora_file = save_diffusers_lora(lora_transformer(tiny_model_dir("flux"), LOADABLE), tmp_path / "lora")
    for schnell, architecture in ((False, "flux-1-dev/lora"), (True, "flux-1-schnell/lora")):
        out = save_comfy_lora(
            lora_file, tmp_path / f"{architecture.split('/')[0]}.safetensors", schnell=schnell
        )
        with safe_open(out, "pt") as file:
            assert file.metadata()["modelspec.architecture"] == architecture
