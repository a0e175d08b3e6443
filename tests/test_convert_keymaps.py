"""The key maps on the full-size topologies (built on the meta device from nbkit's shipped configs, so
no weights are allocated): the original layout's key counts and landmark keys, and the shipped configs'
parameter counts, which pin them to the real SD 1.5 / 2.1 / SDXL models."""

from __future__ import annotations

import pytest

from nbkit.convert.from_single_file import shipped_config_dir
from nbkit.convert.keymaps_unet import unet_recipes
from nbkit.convert.layout import single_file_layout
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.fsio import read_json

# Parameter counts of the real models' components (UNet, VAE, text encoder(s)).
REAL_PARAMETERS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}
# Tensors nbkit writes: the original checkpoints' keys (SD 1.5 has 1131, SDXL base 2515) less the
# buffers it leaves out (CLIP's position_ids, OpenCLIP's logit_scale), and for SD 2.x also less the
# unused 24th OpenCLIP layer and text_projection, which diffusers' SD 2.x text encoder does not have.
WRITTEN_TENSOR_COUNTS = {"sd1": 1130, "sd2": 1214, "sdxl": 2513}


def _meta_component(family: str, name: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = shipped_config_dir(family) / name
    with init_empty_weights():
        if name == "unet":
            return UNet2DConditionModel.from_config(read_json(folder / "config.json"))
        if name == "vae":
            return AutoencoderKL.from_config(read_json(folder / "config.json"))
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig.from_pretrained(folder))


@pytest.fixture(scope="module")
def full_size_plans():
    plans = {}
    for family in ("sd1", "sd2", "sdxl"):
        recipes, parameters = [], {}
        for component in single_file_layout(FAMILIES[family]):
            model = _meta_component(family, component.name)
            parameters[component.name] = sum(p.numel() for p in model.parameters())
            shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
            recipes += component.recipes(
                shapes, read_json(shipped_config_dir(family) / component.name / "config.json")
            )
        plans[family] = ({recipe.key: recipe for recipe in recipes}, parameters)
    return plans


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_are_the_real_models(full_size_plans, family):
    assert full_size_plans[family][1] == REAL_PARAMETERS[family]


def test_sd2_v_configs_differ_only_where_the_models_do():
    assert read_json(shipped_config_dir("sd2-v") / "unet/config.json")["sample_size"] == 96
    assert read_json(shipped_config_dir("sd2") / "unet/config.json")["sample_size"] == 64
    assert (
        read_json(shipped_config_dir("sd2-v") / "scheduler/scheduler_config.json")["prediction_type"]
        == "v_prediction"
    )
    assert (
        read_json(shipped_config_dir("sd2") / "scheduler/scheduler_config.json")["prediction_type"]
        == "epsilon"
    )


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout(full_size_plans, family):
    recipes = full_size_plans[family][0]
    assert len(recipes) == WRITTEN_TENSOR_COUNTS[family]
    unet = "model.diffusion_model."
    landmarks = {
        f"{unet}time_embed.0.weight": None,
        f"{unet}out.2.weight": None,
        f"{unet}middle_block.1.proj_in.weight": None,
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),  # levels reversed
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),  # linear -> 1x1 conv
    }
    if family == "sdxl":
        landmarks |= {
            f"{unet}label_emb.0.0.weight": (1280, 2816),
            f"{unet}input_blocks.3.0.op.weight": None,
            f"{unet}output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),  # upsampler after attention: slot 2
            f"{unet}input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
            "conditioner.embedders.1.model.text_projection": (1280, 1280),
            "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        }
    else:
        landmarks |= {
            f"{unet}output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # upsampler without attention: slot 1
            f"{unet}output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            f"{unet}input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        }
    if family == "sd1":
        landmarks |= {
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
            f"{unet}input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),  # SD 1.x: conv projections
        }
    if family == "sd2":
        landmarks |= {
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias": (1024,),
            "cond_stage_model.model.ln_final.weight": (1024,),
            f"{unet}input_blocks.1.1.proj_in.weight": (320, 320),  # SD 2.x: linear projections
        }
    for key, shape in landmarks.items():
        assert key in recipes, key
        if shape is not None:
            assert recipes[key].shape == shape, key


def test_unknown_weights_are_refused():
    config = read_json(shipped_config_dir("sd1") / "unet/config.json")
    with pytest.raises(NbkitError, match="does not know how to place"):
        unet_recipes({"conv_in.weight": (320, 4, 3, 3), "lora_adapter.weight": (4, 4)}, config)
    with pytest.raises(NbkitError, match="ResNet block"):
        unet_recipes({"down_blocks.0.resnets.0.extra.weight": (4,)}, config)
