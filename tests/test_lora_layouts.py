"""Every LoRA file nbkit writes, in every family, is read by the tools it names, nbkit included.

- The A1111/ComfyUI file maps every key through ComfyUI's own LoRA key mapping (reimplemented below),
  none left over.
- `nbkit convert SRC OUT --lora FILE` merges each file nbkit writes to what diffusers' load + fuse of the
  diffusers file gives.
- The new families' transformer files round-trip bit-exactly through diffusers' `from_single_file`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from nbkit.convert.transformer_file import load_transformer_file, save_transformer_file
from nbkit.families import get_family
from nbkit.train.lora_export import save_lora

RANK, ALPHA = 4, 8.0
TRANSFORMER_FAMILIES = ("flux", "zimage", "flux2")
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]

# -- ComfyUI's LoRA key mapping ---------------------------------------------------------------------
# From comfyanonymous/ComfyUI comfy/lora.py (as in 0.3.64 and later):
# - `model_lora_keys_unet`: for every `diffusion_model.<key>.weight` of the loaded model's own
#   (original-layout) state dict, `lora_unet_<key, dots as underscores>` maps to it; for the UNet
#   families, `comfy.utils.unet_to_diffusers` also maps `lora_unet_<diffusers key, dots as underscores>`
#   for every diffusers UNet weight (that table covers the whole diffusers UNet).
# - `model_lora_keys_clip`: `lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}` (and `lora_te1_`)
#   for CLIP-L's layers; with a CLIP-G as well (SDXL), `lora_te1_` for CLIP-L and `lora_te2_` for CLIP-G.
# - `load_lora`: each mapped name takes `<name>.lora_up.weight`, `<name>.lora_down.weight` and
#   `<name>.alpha`; any other key is "lora key not loaded".
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfy_unet_keys(weights: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`lora_unet_<key>` -> the weight's shape, for every `<key>.weight` of `weights`."""
    return {
        "lora_unet_" + key.removesuffix(".weight").replace(".", "_"): shape
        for key, shape in weights.items()
        if key.endswith(".weight")
    }


def comfy_clip_keys(layers: list[int]) -> set[str]:
    """ComfyUI's text-encoder LoRA names for text encoders of `layers` layers (one: SD 1.x; two: SDXL)."""
    names = set()
    for index, count in enumerate(layers):
        prefixes = ("lora_te_", "lora_te1_") if len(layers) == 1 else (f"lora_te{index + 1}_",)
        for b in range(count):
            names.update(
                f"{p}text_model_encoder_layers_{b}_{c}" for p in prefixes for c in LORA_CLIP_MAP.values()
            )
    return names


def comfy_load(
    lora: dict[str, torch.Tensor], key_map: dict[str, tuple[int, ...] | None]
) -> tuple[int, list[str]]:
    """(modules patched, keys not loaded) as ComfyUI's `load_lora` would find them; shapes checked."""
    loaded, patched = set(), 0
    for name, shape in key_map.items():
        up, down = f"{name}.lora_up.weight", f"{name}.lora_down.weight"
        if up not in lora:
            continue
        patched += 1
        loaded.update({up, down} | ({f"{name}.alpha"} & lora.keys()))
        if shape is not None:
            assert (lora[up].shape[0], lora[down].shape[1]) == shape[:2], name
    return patched, sorted(set(lora) - loaded)


# -- LoRAs as nbkit training writes them -----------------------------------------------------------


def _randomise(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # peft starts lora_B at zero: give both sides real values
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def trained_lora(folder, family_name: str, out_dir):
    """nbkit's two LoRA files of a LoRA on the family's training targets, alpha != rank."""
    from diffusers import DiffusionPipeline

    family = get_family(family_name)
    pipeline = DiffusionPipeline.from_pretrained(folder)
    denoiser = getattr(pipeline, family.denoiser)
    targets = (
        family.lora_target_modules(family.denoiser) if family.denoiser == "transformer" else UNET_TARGETS
    )
    denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    _randomise(denoiser)
    encoders = []
    if family.trains_text_encoders:
        for role in family.text_encoder_roles:
            encoder = getattr(pipeline, role)
            encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=2.0, target_modules=TEXT_TARGETS))
            _randomise(encoder)
            encoders.append(encoder)
    return save_lora(denoiser, encoders, out_dir, family=family_name, metadata={}), pipeline


@pytest.mark.parametrize("family_name", ["sd1", "sdxl", *TRANSFORMER_FAMILIES])
def test_comfyui_file_maps_every_key_through_comfyuis_mapping(tiny_model_dir, tmp_path, family_name):
    family = get_family(family_name)
    folder = tiny_model_dir(family_name)
    files, pipeline = trained_lora(folder, family_name, tmp_path / "lora")
    lora = load_file(files["kohya"])
    if family.denoiser == "transformer":
        # The loaded model's own keys: those of the original-layout file, which diffusers' from_single_file
        # reads back bit-exactly (test below), so they are the original layout's.
        original = load_file(save_transformer_file(folder, tmp_path / "t.safetensors", dtype="fp32"))
        key_map = comfy_unet_keys({key: tuple(value.shape) for key, value in original.items()})
    else:
        weights = {key: None for key in pipeline.unet.state_dict() if "lora_" not in key}
        key_map = comfy_unet_keys({key.replace(".base_layer", ""): None for key in weights})
        layers = [getattr(pipeline, role).config.num_hidden_layers for role in family.text_encoder_roles]
        key_map.update(dict.fromkeys(comfy_clip_keys(layers)))
    patched, left_over = comfy_load(lora, key_map)
    assert left_over == []
    assert patched == sum(1 for key in lora if key.endswith(".lora_up.weight")) > 0
    print(f"{family_name}: {len(lora)} keys, {patched} modules mapped by ComfyUI")  # the report's count
    # The diffusers file loads with diffusers' own load_lora_weights, every module of it.
    from diffusers import DiffusionPipeline

    fresh = DiffusionPipeline.from_pretrained(folder)
    fresh.load_lora_weights(str(files["diffusers"]), adapter_name="check")
    adapted = sum(
        1
        for value in vars(fresh).values()
        if isinstance(value, torch.nn.Module)
        for module in value.modules()
        if "check" in (getattr(module, "lora_A", None) or {})
    )
    assert adapted == sum(1 for key in load_file(files["diffusers"]) if key.endswith("lora_A.weight"))


# -- convert --lora: every format nbkit writes merges to what diffusers does with the diffusers file --


def _expected_merge(folder, diffusers_file, weight: float) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.load_lora_weights(str(diffusers_file))
    components = [
        name for name in pipeline._lora_loadable_modules if getattr(pipeline, name, None) is not None
    ]
    pipeline.fuse_lora(lora_scale=weight, components=components)
    pipeline.unload_lora_weights()
    return {name: getattr(pipeline, name).state_dict() for name in components}


def _assert_close(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert merged.keys() == expected.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("family_name", ["sd1", "sdxl", *TRANSFORMER_FAMILIES])
def test_convert_lora_merges_every_file_nbkit_writes(tiny_model_dir, tmp_path, family_name):
    from nbkit.cli import main

    family = get_family(family_name)
    folder = tiny_model_dir(family_name)
    files, _ = trained_lora(folder, family_name, tmp_path / "lora")
    expected = _expected_merge(folder, files["diffusers"], 0.7)
    for kind, lora_file in files.items():
        out = tmp_path / f"{kind}.safetensors"
        args = [
            "convert",
            str(folder),
            str(out),
            "--dtype",
            "fp32",
            "--lora",
            str(lora_file),
            "--lora-weight",
            "0.7",
        ]
        assert main(args) == 0, kind
        if family.denoiser == "transformer":
            _assert_close(load_transformer_file(out, folder).state_dict(), expected["transformer"])
        else:
            from nbkit.convert import load_single_file

            merged = load_single_file(out, torch_dtype=torch.float32)
            for component, weights in expected.items():
                _assert_close(getattr(merged, component).state_dict(), weights)


def test_convert_lora_through_the_cli_process(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("zimage")
    files, _ = trained_lora(folder, "zimage", tmp_path / "lora")
    out = tmp_path / "merged.safetensors"
    args = [str(folder), str(out), "--dtype", "fp32", "--lora", str(files["kohya"])]
    result = subprocess.run(
        [sys.executable, "-m", "nbkit", "convert", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Z-Image transformer, original layout, fp32" in result.stdout
    _assert_close(
        load_transformer_file(out, folder).state_dict(),
        _expected_merge(folder, files["diffusers"], 1.0)["transformer"],
    )


# -- the new families' transformer files ---------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["zimage", "flux2"])
def test_transformer_file_round_trips_bit_exactly_through_from_single_file(
    tiny_model_dir, tmp_path, family_name
):
    from diffusers import DiffusionPipeline

    folder = tiny_model_dir(family_name)
    original = DiffusionPipeline.from_pretrained(folder).transformer
    out = save_transformer_file(folder, tmp_path / "t.safetensors", dtype="fp32")
    tensors = load_file(out)
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in original.state_dict().values())
    for config_folder in (folder, None):  # the base folder's config, or the one stored in the file
        loaded = load_transformer_file(out, config_folder)
        assert type(loaded) is type(original)
        ours, theirs = original.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    # The fused attention: q, k, v stacked, as the original code (and ComfyUI) keeps them.
    if family_name == "zimage":
        attention = "layers.0.attention."
        expected = torch.cat([original.state_dict()[f"{attention}to_{x}.weight"] for x in "qkv"])
        assert torch.equal(tensors[f"{attention}qkv.weight"], expected)
        assert "x_embedder.weight" in tensors and "final_layer.adaLN_modulation.1.weight" in tensors
    else:
        block = "transformer_blocks.0.attn."
        expected = torch.cat([original.state_dict()[f"{block}add_{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(tensors["double_blocks.0.txt_attn.qkv.weight"], expected)
        norm = original.state_dict()["norm_out.linear.weight"]
        half = norm.shape[0] // 2
        assert torch.equal(
            tensors["final_layer.adaLN_modulation.1.weight"], torch.cat([norm[half:], norm[:half]])
        )
