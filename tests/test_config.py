"""StrictConfig: unknown keys and wrong types are refused with messages that name them."""

from __future__ import annotations

import pytest

from nbkit.errors import NbkitError
from nbkit.session.settings import TrainConfig


def test_round_trip_keeps_every_field():
    config = TrainConfig(unet_steps=10, sample_prompts=["photo of zwx"], seed=7)
    config.prior.class_prompt = "photo of a dog"
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(NbkitError) as raised:
        TrainConfig.from_dict({"unet_step": 5}, where="session.json:training")
    message = str(raised.value)
    assert "unknown key 'unet_step' in session.json:training" in message
    assert "did you mean 'unet_steps'" in message


def test_nested_unknown_key_names_its_path():
    with pytest.raises(NbkitError, match=r"unknown key 'weight' in config\.prior"):
        TrainConfig.from_dict({"prior": {"weight": 2}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"unet_steps": "many"}, r"config\.unet_steps must be int"),
        ({"unet_steps": True}, r"must be a number"),
        ({"mixed_precision": "fp8"}, r"config\.mixed_precision is 'fp8'; allowed values are 'auto'"),
        ({"sample_prompts": "a cat"}, r"config\.sample_prompts must be a list"),
        ({"sample_prompts": [3]}, r"config\.sample_prompts\[0\] must be str"),
    ],
)
def test_wrong_types_are_refused(data, pattern):
    with pytest.raises(NbkitError, match=pattern):
        TrainConfig.from_dict(data)


def test_ints_are_accepted_for_floats_and_none_for_optionals():
    config = TrainConfig.from_dict({"unet_lr": 1, "seed": None, "min_snr_gamma": 5})
    assert config.unet_lr == 1.0 and isinstance(config.unet_lr, float)
    assert config.seed is None and config.min_snr_gamma == 5.0


def test_replace_validates():
    assert TrainConfig().replace(unet_steps=3).unet_steps == 3
    with pytest.raises(NbkitError):
        TrainConfig().replace(unet_steps="x")
