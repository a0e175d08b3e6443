"""Out-of-memory detection and the advice that names the settings to lower."""

from __future__ import annotations

import pytest
import torch

from nbkit.errors import NbkitError
from nbkit.session.settings import PriorPreservation, TrainConfig
from nbkit.train.oom import explain_oom, is_oom, suggestions


def _real_cpu_oom() -> RuntimeError:
    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the allocator refuses at once
    except RuntimeError as error:
        return error
    pytest.skip("this machine allocated a petabyte")


def _chained(error: BaseException) -> BaseException:
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("training step failed") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
        MemoryError(),
        _chained(torch.OutOfMemoryError("CUDA out of memory.")),
    ],
    ids=["cuda", "mps", "python", "chained"],
)
def test_is_oom_recognises_allocation_failures(error):
    assert is_oom(error)


def test_is_oom_recognises_a_real_cpu_allocation_failure():
    assert is_oom(_real_cpu_oom())


@pytest.mark.parametrize(
    "error",
    [ValueError("out of memory"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("x")],
)
def test_is_oom_rejects_other_errors(error):
    assert not is_oom(error)


def test_explain_oom_names_every_setting_worth_lowering_with_current_values():
    config = TrainConfig(
        resolution=768,
        batch_size=4,
        gradient_accumulation=2,
        gradient_checkpointing=False,
        mixed_precision="no",
        use_8bit_adam=False,
        lora_rank=0,
        text_encoder_steps=350,
        prior=PriorPreservation(class_prompt="a dog", num_images=100),
    )
    error = explain_oom(config, torch.OutOfMemoryError("CUDA out of memory"), family="sd1")
    text = str(error)
    assert isinstance(error, NbkitError)
    assert "GPU memory" in text and "768px" in text and "batch size 4" in text
    for expected in (
        "gradient_checkpointing: true",
        "mixed_precision",
        "use_8bit_adam: true",
        "--training-mode lora",
        "--batch-size` is 4",
        "`gradient_accumulation` 8",
        "prior preservation",
        "--resolution` is 768; try 576",
    ):
        assert expected in text, expected
    # Stage 2 is the larger one here: skipping stage 1 would not help, so it is not offered.
    assert "--te-steps 0" not in text


def _tips(config, family):
    return [tip.split(" (`")[0] for tip in suggestions(config, family=family)]


def test_the_advice_is_ranked_by_the_computed_savings():
    # SD 1.5 full fine-tuning at 512 px: the optimizer states are the big saving, checkpointing a small one.
    full = TrainConfig(use_8bit_adam=False, gradient_checkpointing=False, text_encoder_steps=0)
    tips = _tips(full, "sd1")
    assert tips.index("train a LoRA instead of the full model") < tips.index("use 8-bit Adam")
    assert tips.index("use 8-bit Adam") < tips.index("turn gradient checkpointing on")
    # A LoRA at 1024 px: the activations are the peak, so checkpointing comes first.
    lora = TrainConfig(resolution=1024, lora_rank=16, gradient_checkpointing=False, text_encoder_steps=0)
    assert _tips(lora, "sd1")[0] == "turn gradient checkpointing on"
    text = " ".join(suggestions(lora, family="sd1"))
    assert "GiB less)" in text


def test_explain_oom_leaves_out_what_is_already_set():
    config = TrainConfig(
        resolution=512,
        batch_size=1,
        gradient_checkpointing=True,
        mixed_precision="fp16",
        use_8bit_adam=True,
        lora_rank=16,
        text_encoder_steps=350,
    )
    tips = " ".join(suggestions(config, family="sdxl", stage="unet"))
    for absent in (
        "gradient_checkpointing",
        "mixed_precision",
        "use_8bit_adam",
        "--lora-rank",
        "--batch-size",
    ):
        assert absent not in tips, absent
    assert "--te-steps" not in tips  # the crash was in stage 2, where the text encoder is frozen
    assert "--resolution" not in tips  # SDXL below 768 px is not worth suggesting
    assert "every memory-saving setting" in str(
        explain_oom(config, _real_cpu_oom(), family="sdxl", stage="unet")
    )
    assert "system (CPU) memory in the unet stage" in str(explain_oom(config, _real_cpu_oom(), stage="unet"))


def test_the_resolution_advice_never_goes_below_what_training_accepts():
    from nbkit.models.registry import get_model, validate_resolution

    tips = " ".join(suggestions(TrainConfig(resolution=768), family="sd2-v"))
    assert "--resolution` is 768; try 640" in tips
    validate_resolution(get_model("sd21-768"), 640)  # the suggestion is accepted without forcing
    assert "--resolution" not in " ".join(suggestions(TrainConfig(resolution=640), family="sd2-v"))
