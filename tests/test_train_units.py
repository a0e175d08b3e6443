"""Small pieces of the trainer: seeds, batch order, loss targets and weights, config merging, the CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import DDPMScheduler

from nbkit.cli import build_parser
from nbkit.cli.train import overrides_from_args
from nbkit.errors import NbkitError
from nbkit.families._training import min_snr_weights, training_target
from nbkit.session.settings import TrainConfig
from nbkit.train.checkpointing import checkpoint_name, finish_local, is_complete, list_checkpoints, prune
from nbkit.train.data import batch_indices, derive_seed
from nbkit.train.inputs import check_config, merge_config
from nbkit.train.loss import dreambooth_loss, sample_noise


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


def test_derive_seed_is_stable_and_sensitive_to_every_part():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(1, 2, 3), derive_seed(1, 2, 4), derive_seed(1, 3, 3), derive_seed(2, 2, 3)}
    assert len(seeds) == 4 and all(0 <= seed < 2**63 for seed in seeds)


def test_batches_visit_every_image_once_per_epoch_and_do_not_depend_on_history():
    draws = batch_indices(seed=7, stream=1, stage_index=2, first_position=0, batch_size=10, count=5)
    assert sorted(draws[:5]) == sorted(draws[5:]) == [0, 1, 2, 3, 4]
    assert draws[:5] != draws[5:] or draws[:5] != [0, 1, 2, 3, 4]
    # A batch drawn later (as after a resume) is the same slice of the same stream.
    assert (
        batch_indices(seed=7, stream=1, stage_index=2, first_position=6, batch_size=3, count=5) == draws[6:9]
    )
    assert batch_indices(seed=8, stream=1, stage_index=2, first_position=0, batch_size=10, count=5) != draws


def test_v_prediction_targets_the_velocity_and_epsilon_the_noise():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert training_target(_scheduler("epsilon"), latents, noise, timesteps) is noise
    scheduler = _scheduler("v_prediction")
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    expected = alpha * noise - sigma * latents
    assert torch.allclose(training_target(scheduler, latents, noise, timesteps), expected, atol=1e-6)


def test_min_snr_weights_clip_the_easy_timesteps():
    timesteps = torch.tensor([1, 500, 999])
    assert min_snr_weights(_scheduler("epsilon"), timesteps, None) is None
    weights = min_snr_weights(_scheduler("epsilon"), timesteps, 5.0)
    assert weights[0] < 0.01 and weights[2] == pytest.approx(1.0)  # low noise: huge SNR, clipped to 5/SNR
    v_weights = min_snr_weights(_scheduler("v_prediction"), timesteps, 5.0)
    assert torch.all(v_weights < 1.0)


def test_offset_noise_shifts_whole_channels():
    latents = torch.zeros(2, 4, 16, 16)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    shifted = sample_noise(latents, torch.Generator().manual_seed(0), offset_noise=0.5)
    difference = shifted - plain
    assert difference.abs().sum() > 0
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))


def test_prior_loss_is_weighted_and_split_from_the_instance_loss():
    prediction, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    target[2:] = 2.0
    total, instance, prior = dreambooth_loss(
        prediction, target, weights=None, num_class=2, prior_loss_weight=0.5
    )
    assert (instance.item(), prior.item(), total.item()) == (1.0, 4.0, 3.0)
    total, instance, prior = dreambooth_loss(
        prediction, target, weights=None, num_class=0, prior_loss_weight=0.5
    )
    assert prior is None and total.item() == pytest.approx(2.5)


def test_overrides_merge_prior_settings_key_by_key():
    stored = TrainConfig().replace(
        prior={"class_prompt": "photo of a dog", "num_images": 50, "loss_weight": 1.0}
    )
    merged = merge_config(stored, {"unet_steps": 10, "prior": {"num_images": 100}})
    assert (
        merged.unet_steps == 10
        and merged.prior.class_prompt == "photo of a dog"
        and merged.prior.num_images == 100
    )
    with pytest.raises(NbkitError, match="did you mean 'unet_lr'"):
        merge_config(stored, {"unet_rl": 1e-6})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size is 0"),
        ({"keep_checkpoints": 0}, "keep at least 1"),
        ({"unet_lr": 0.0}, "unet_lr is 0.0"),
        ({"lora_rank": -1}, "lora_rank is -1"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma is 0.0"),
    ],
)
def test_bad_settings_are_named(change, message):
    with pytest.raises(NbkitError, match=message):
        check_config(TrainConfig().replace(**change))


def test_cli_options_become_overrides():
    args = build_parser().parse_args(
        ["train", "mine", "--te-steps", "0", "--unet-lr", "1e-6", "--prior-class-prompt", "photo of a dog",
         "--prior-images", "200", "--sample-prompt", "zwx dog", "--sample-prompt", "zwx dog, oil", "--resume",
         "--no-random-flip", "--model", "sd15"]
    )  # fmt: skip
    assert isinstance(args, argparse.Namespace) and args.resume
    assert overrides_from_args(args) == {
        "text_encoder_steps": 0,
        "unet_lr": 1e-6,
        "random_flip": False,
        "prior": {"class_prompt": "photo of a dog", "num_images": 200},
        "sample_prompts": ["zwx dog", "zwx dog, oil"],
        "model": "sd15",
    }
    assert overrides_from_args(build_parser().parse_args(["train", "mine"])) == {}


def test_checkpoints_count_only_when_complete_and_prune_oldest_first(tmp_path):
    for stage, step in (("text_encoder", 350), ("unet", 500), ("unet", 1000), ("unet", 1500)):
        folder = tmp_path / checkpoint_name(stage, step)
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(b"x" * step)
        finish_local(folder, {"stage": stage, "step": step})
    (tmp_path / "unet-001500" / "unet.safetensors").write_bytes(b"short")  # damaged after the fact
    (tmp_path / "unet-002000").mkdir()  # never finished: no trainer_state.json
    assert not is_complete(tmp_path / "unet-001500")
    assert [c.path.name for c in list_checkpoints(tmp_path)] == [
        "text_encoder-000350",
        "unet-000500",
        "unet-001000",
    ]
    assert [path.name for path in prune(tmp_path, keep=2)] == ["text_encoder-000350"]
    assert [c.path.name for c in list_checkpoints(tmp_path)] == ["unet-000500", "unet-001000"]
