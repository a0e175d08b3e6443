"""The GPU memory planner on faked T4 / L4 / A100 devices: what fits is chosen, what does not is refused
with the figure and the GPU that would fit, and the estimates move the way memory does.

The figures are the ones nbkit ships (`nbkit/families/figures/*.json`, traced at full width); the
assertions are about the planner's decisions and their consistency with those figures, so a new trace
that moves a figure moves the expectations only where a decision really changes.
"""

from __future__ import annotations

import itertools

import pytest

from nbkit.errors import NbkitError
from nbkit.families import get_family
from nbkit.models.memory import (
    HEADROOM_GIB,
    DeviceFacts,
    TrainingRun,
    generation_options,
    plan_memory,
    plan_training,
    training_options,
    training_run,
)
from nbkit.models.memory_figures import training_estimate
from nbkit.session.settings import PriorPreservation, TrainConfig

T4 = DeviceFacts("Tesla T4", 15.0, bf16=False)
L4 = DeviceFacts("NVIDIA L4", 22.5, bf16=True)
A100 = DeviceFacts("NVIDIA A100-SXM4-40GB", 39.6, bf16=True)
BNB = ("bitsandbytes",)


def _new_session(family: str, **settings) -> TrainConfig:
    spec = get_family(family)
    return TrainConfig(resolution=spec.native_resolution).replace(**spec.training_defaults, **settings)


def _fits(peak: float, device: DeviceFacts) -> bool:
    return peak <= device.total_gib - HEADROOM_GIB


# family, device, settings -> what a new session trains there ("full", "lora", or the refusal's words)
TABLE = [
    ("sd1", T4, {}, "full"),
    ("sd1", L4, {}, "full"),
    ("sd1", A100, {}, "full"),
    ("sd1", T4, {"use_8bit_adam": False}, "lora"),  # fp32 AdamW states: full fine-tuning is over 14 GiB
    ("sd1", A100, {"use_8bit_adam": False}, "full"),
    ("sd2-v", T4, {}, "full"),
    ("sdxl", T4, {}, "lora"),
    ("sdxl", L4, {}, "lora"),
    ("sdxl", A100, {}, "full"),
    ("sdxl", T4, {"training_mode": "full"}, "refused: too little for full fine-tuning"),
    ("flux", T4, {}, "refused: no bfloat16"),
    ("flux", L4, {}, "lora"),
    ("flux", A100, {}, "lora"),
    ("zimage", T4, {}, "refused: no bfloat16"),
    ("zimage", L4, {}, "lora"),
    ("zimage", A100, {}, "lora"),
    ("flux2", T4, {}, "refused: no bfloat16"),
    ("flux2", L4, {}, "lora"),
    ("flux2", A100, {}, "lora"),
]


@pytest.mark.parametrize(
    ("family", "device", "changes", "expected"),
    TABLE,
    ids=[f"{row[0]}-{row[1].name.split()[-1]}-{'-'.join(row[2]) or 'defaults'}" for row in TABLE],
)
def test_a_new_session_trains_what_fits_the_gpu(family, device, changes, expected):
    config = _new_session(family, **changes)
    if expected.startswith("refused"):
        with pytest.raises(NbkitError) as error:
            plan_training(family, config, device, quantizers=BNB)
        assert expected.removeprefix("refused: ") in error.value.message
        assert device.name in error.value.message and "GiB" in str(error.value)
        return
    plan = plan_training(family, config, device, quantizers=BNB)
    rank = plan.changes.get("lora_rank", config.lora_rank)
    assert ("lora" if rank else "full") == expected
    assert _fits(plan.option.peak_gib, device)
    # Every larger way (listed before the chosen one) does not fit; the note gives the chosen figure.
    run = training_run(get_family(family), config.replace(**plan.changes))
    options = training_options(family, run)
    names = [option.name for option in options]
    for option in options[: names.index(plan.option.name)]:
        assert not _fits(option.peak_gib, device)
    assert f"about {plan.option.peak_gib:.1f} GiB" in plan.notes[-1]


def test_sdxl_on_a_t4_trains_a_lora_and_says_why():
    config = _new_session("sdxl")
    plan = plan_training("sdxl", config, T4, quantizers=BNB)
    assert plan.changes == {"lora_rank": 16}
    full_peak = min(
        o.peak_gib
        for o in training_options("sdxl", TrainingRun(full=True, stages=("text_encoder", "denoiser")))
    )
    assert not _fits(full_peak, T4) and not _fits(full_peak, L4) and _fits(full_peak, A100)
    why = plan.notes[0]
    assert f"needs about {full_peak:.1f} GiB" in why and "Tesla T4" in why
    assert "rank-16 LoRA" in why and "A100 40 GB" in why


def test_full_fine_tuning_asked_on_a_t4_is_refused_with_the_figure_the_lora_and_the_gpu():
    with pytest.raises(NbkitError) as error:
        plan_training("sdxl", _new_session("sdxl", training_mode="full"), T4, quantizers=BNB)
    text = str(error.value)
    assert "Tesla T4 has 15 GiB" in text and "full fine-tuning at 1024 px" in text
    assert "--training-mode lora" in text and "A100 40 GB" in text


def test_without_bitsandbytes_the_plan_counts_float32_adam_states():
    with_bnb = plan_training("sd1", _new_session("sd1"), T4, quantizers=BNB)
    without = plan_training("sd1", _new_session("sd1"), T4, quantizers=())
    assert with_bnb.changes == {}  # full fine-tuning with 8-bit Adam fits a T4
    assert without.changes == {"lora_rank": 16}  # AdamW's float32 states do not


def test_a_cpu_and_a_lora_rank_are_left_alone():
    assert plan_training("sdxl", _new_session("sdxl"), None).option is None
    plan = plan_training("sdxl", _new_session("sdxl", lora_rank=8), T4, quantizers=BNB)
    assert plan.changes == {} and "rank-8 LoRA" in plan.notes[-1]


def test_flux_picks_the_largest_way_that_fits_and_needs_a_library_for_its_bits():
    config = _new_session("flux")
    options = training_options("flux", TrainingRun())
    for device in (L4, A100, DeviceFacts("NVIDIA H100 80GB HBM3", 79.2, True)):
        chosen = plan_training("flux", config, device, quantizers=BNB).option
        fitting = [option for option in options if _fits(option.peak_gib, device)]
        assert chosen.name == fitting[0].name
    with pytest.raises(NbkitError, match=r"need bitsandbytes .*installed: torchao"):
        plan_training("flux", config, L4, quantizers=("torchao",))
    with pytest.raises(NbkitError, match="quantize_base is 'none'"):
        plan_training("flux", config.replace(quantize_base="none"), L4, quantizers=BNB)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_the_qwen_families_train_a_lora_in_bf16_or_on_a_quantized_base(family):
    """Z-Image and FLUX.2 [klein] train only a LoRA: full fine-tuning is never planned, a T4 is refused
    for its missing bf16 whatever the figures, and an L4 gets the largest way that fits."""
    config = _new_session(family).replace(lora_rank=0)  # asks for full fine-tuning where a family has it
    with pytest.raises(NbkitError, match="no bfloat16"):
        plan_training(family, config, T4, quantizers=BNB)
    with pytest.raises(NbkitError, match="no bfloat16"):
        plan_memory(family, "generate", T4, quantizers=BNB)
    plan = plan_training(family, config, L4, quantizers=BNB)
    assert plan.changes == {"lora_rank": 16}
    options = training_options(family, TrainingRun())
    assert plan.option.name == next(o.name for o in options if _fits(o.peak_gib, L4))
    assert plan.quantization == plan.option.quantization
    assert training_estimate(get_family(family), stage="denoiser", full=True) is None  # nothing traced


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "zimage", "flux2"])
def test_generation_takes_the_largest_way_that_fits(family):
    precision = "bf16" if get_family(family).needs_bf16 else "fp16"
    options = generation_options(family, precision=precision)
    for device in (L4, A100) if get_family(family).needs_bf16 else (T4, L4, A100):
        chosen = plan_memory(family, "generate", device, quantizers=BNB)
        assert chosen.name == next(o.name for o in options if _fits(o.peak_gib, device))
    resident, offload = options[0], options[1]
    assert offload.peak_gib < resident.peak_gib  # model CPU offload holds one component at a time


def _step_peak(family: str, **arguments) -> float:
    return training_estimate(get_family(family), **arguments).step


def test_the_estimates_move_the_way_memory_does():
    for family, stage, full, checkpointing, resolution, batch in itertools.product(
        ["sd1", "sd2-v", "sdxl"],
        ["text_encoder", "denoiser"],
        [True, False],
        [True, False],
        [512, 768, 1024],
        [1, 3],
    ):
        case = dict(
            stage=stage, full=full, gradient_checkpointing=checkpointing, resolution=resolution, batch=batch
        )
        peak = _step_peak(family, **case)
        # More pixels never need less (the optimizer step's gradients may stay the peak: equal), and
        # where activations are the peak (no checkpointing) they need more.
        strictly = not checkpointing and stage == "denoiser"
        for more in ({"batch": batch + 1}, {"resolution": resolution + 128}):
            larger = _step_peak(family, **{**case, **more})
            assert larger > peak if strictly else larger >= peak, (case, more)
        assert _step_peak(family, **case, eight_bit_adam=False) > peak, case
        assert (
            _step_peak(family, **{**case, "gradient_checkpointing": False}) >= peak or checkpointing is False
        ), case
        assert _step_peak(family, **{**case, "full": False}) <= peak, case


def test_prior_preservation_doubles_the_batch_the_plan_sees():
    # SD 1.5 full fine-tuning: the training step is the peak, and it grows with the batch.
    def peak(**settings):
        return plan_training("sd1", _new_session("sd1", **settings), A100, quantizers=BNB).option.peak_gib

    alone, batch_2 = peak(), peak(batch_size=2)
    with_prior = peak(prior=PriorPreservation("a dog", 50).to_dict())
    assert with_prior == pytest.approx(batch_2) and with_prior > alone


def test_a_run_on_a_faked_t4_trains_sdxl_as_a_lora_and_refuses_full_before_writing(
    tiny_model_dir, monkeypatch
):
    from test_train_support import make_session

    from nbkit.models import memory
    from nbkit.session.core import Session
    from nbkit.train.plan import plan_run

    # The T4 settings a Colab user has: 8-bit Adam, gradient checkpointing, batch 1.
    make_session(
        "xl", tiny_model_dir("sdxl"), "sdxl", batch_size=1, gradient_checkpointing=True, use_8bit_adam=True
    )
    monkeypatch.setattr(memory, "device_facts", lambda index=0: T4)
    monkeypatch.setattr(memory, "quantizers_installed", lambda *args: BNB)
    session = Session.open("xl")
    saved = (session.path / "session.json").read_bytes()
    plan = plan_run(session, {"resolution": 1024}, force_resolution=True)
    assert plan.config.lora_rank == 16 and plan.config.training_mode == "auto"
    assert "trains a rank-16 LoRA" in plan.notes[0]
    with pytest.raises(NbkitError, match="too little for full fine-tuning at 1024 px"):
        plan_run(session, {"resolution": 1024, "training_mode": "full"}, force_resolution=True)
    with pytest.raises(NbkitError, match="training_mode is 'full' but lora_rank is 4"):
        plan_run(session, {"training_mode": "full", "lora_rank": 4})
    assert (session.path / "session.json").read_bytes() == saved
