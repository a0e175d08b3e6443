"""Will a model fit this GPU? Checked up front, so a run is refused with the options, not an OOM an hour in.

Every figure here is computed, not remembered: each family ships the GPU memory traced for its
real-width model (`nbkit.models.memory_figures` takes it to the run's size, batch and settings). From
them `plan_memory` picks the way a model runs (on the GPU, with model CPU offload, with 8- or 4-bit
weights) and `plan_training` picks how a run trains (full fine-tuning or a LoRA, and the quantized
base under it) for the GPU at hand, or refuses with the figure and the GPU that would fit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.families.base import Family
from nbkit.families.facts import MemoryOption, Task
from nbkit.models.memory_figures import OVERHEAD_FACTOR, GiB, generation_bytes, training_estimate
from nbkit.models.quantization import BACKEND_BITS
from nbkit.models.registry import ModelSpec

# The GPUs users meet, smallest first, to say which one would fit (name, GiB, bf16).
GPUS = (
    ("a T4 (Colab free, Kaggle)", 15.0, False),
    ("an L4 (Colab Pro)", 22.5, True),
    ("an A100 40 GB (Colab Pro)", 39.6, True),
    ("an A100 or H100 80 GB", 79.2, True),
)
HEADROOM_GIB = 1.0  # the CUDA context (about 0.3-0.5 GiB) and what other libraries hold
DEFAULT_LORA_RANK = 16


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the GPU offers (`device_facts()` reads them; tests fake them).

    Args:
        name: the GPU's name (`Tesla T4`).
        total_gib: its memory in GiB.
        bf16: whether it computes in bfloat16 at full speed (compute capability 8.0 or later).
    """

    name: str
    total_gib: float
    bf16: bool


def quantizers_installed(find_spec: Callable[[str], object] = importlib.util.find_spec) -> tuple[str, ...]:
    """The weight-quantization libraries diffusers can use that are installed (`bitsandbytes`, `torchao`)."""
    return tuple(name for name in ("bitsandbytes", "torchao") if find_spec(name) is not None)


def device_facts(index: int = 0) -> DeviceFacts | None:
    """The facts of CUDA GPU `index`, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(index)
    return DeviceFacts(properties.name, properties.total_memory / 2**30, properties.major >= 8)


def _family(spec: ModelSpec | str | Family) -> Family:
    if isinstance(spec, Family):
        return spec
    return FAMILIES[spec if isinstance(spec, str) else spec.family]


def smallest_gpu(peak_gib: float, *, bf16: bool = False) -> str | None:
    """The smallest common GPU that holds `peak_gib` (with the headroom), or None."""
    for name, total, has_bf16 in GPUS:
        if total - HEADROOM_GIB >= peak_gib and (has_bf16 or not bf16):
            return name
    return None


def _refuse_bf16(family: Family, device: DeviceFacts, what: str, listing: str) -> NbkitError:
    return NbkitError(
        f"{device.name} cannot {what} {family.title}: it has no bfloat16, and {family.title} overflows "
        f"in float16 (its ways of running: {listing})",
        fix="switch the runtime to a GPU with bf16 (Colab: L4 or A100; Kaggle: none, its T4 and P100 "
        "lack it), or use an SD family model on this GPU",
    )


def _listing(options: Sequence[MemoryOption]) -> str:
    return "; ".join(
        f"{option.name}: {option.description}, about {option.peak_gib:.1f} GiB" for option in options
    )


def _pick(
    family: Family,
    options: Sequence[MemoryOption],
    device: DeviceFacts,
    installed: Sequence[str],
    what: str,
    headroom_gib: float,
) -> MemoryOption:
    """The first of `options` (peaks computed) that fits and that an installed library can quantize."""
    usable = device.total_gib - headroom_gib
    listing = _listing(options)
    lacking: list[MemoryOption] = []  # ways that would fit, but no installed library does their bits
    for option in options:
        if option.peak_gib > usable:
            continue
        if option.quantization is None or _can_do(option.quantization, installed):
            return option
        lacking.append(option)
    if lacking:
        option = lacking[0]
        able = " or ".join(name for name, bits in BACKEND_BITS.items() if option.quantization in bits)
        raise NbkitError(
            f"{device.name} has {device.total_gib:.0f} GiB: to {what} {family.title} there it needs the "
            f"{option.name} way ({option.description}, about {option.peak_gib:.1f} GiB), and {option.quantization} "
            f"weights need {able} (installed: {', '.join(installed) or 'none'}); ways: {listing}",
            fix="`pip install bitsandbytes` and restart the runtime, or use a GPU with more memory "
            "(Colab: L4 24 GB or A100 40 GB)",
        )
    smallest = min(options, key=lambda option: option.peak_gib)
    lacks_library = not installed and any(option.quantization for option in options)
    missing = (
        " (8-bit and 4-bit need `pip install bitsandbytes` or torchao, not installed)"
        if lacks_library
        else ""
    )
    bigger = smallest_gpu(smallest.peak_gib, bf16=family.needs_bf16)
    raise NbkitError(
        f"{device.name} has {device.total_gib:.0f} GiB, too little to {what} {family.title}: the smallest way "
        f"({smallest.name}) needs about {smallest.peak_gib:.1f} GiB{missing}; ways: {listing}",
        fix=f"use {bigger or 'a GPU with more memory'}"
        + (", or install bitsandbytes and restart the runtime" if lacks_library else ""),
    )


def generation_options(
    spec: ModelSpec | str | Family, *, resolution: int | None = None, batch: int = 1, precision: str = "fp16"
) -> tuple[MemoryOption, ...]:
    """The family's ways of generating with their computed peaks (GiB, overhead included); empty
    without figures.

    Args:
        spec: the model, its family or the family's name.
        resolution: the image size (default: the family's native one).
        batch: images at once.
        precision: the weights' dtype (`fp16` or `bf16`).
    """
    family = _family(spec)
    options = []
    for option in family.memory_options("generate"):
        peak = generation_bytes(family, option, resolution=resolution, batch=batch, precision=precision)
        if peak is None:
            return ()
        options.append(dataclasses.replace(option, peak_gib=peak * OVERHEAD_FACTOR / GiB))
    return tuple(options)


def plan_memory(
    spec: ModelSpec | str,
    task: Task,
    device: DeviceFacts | None,
    *,
    quantizers: Sequence[str] | None = None,
    headroom_gib: float = HEADROOM_GIB,
) -> MemoryOption | None:
    """Pick how to run `spec` for `task` on `device`, or refuse with the reason and the options.

    Training is planned here as a LoRA at the family's native size (what a quantized base is for);
    `plan_training` plans a whole run from its settings.

    Args:
        spec: the model (a registry entry) or its family name.
        task: `generate` or `train`.
        device: the GPU (`device_facts()`), or None on a CPU, where nothing is checked.
        quantizers: the quantization libraries installed (default: looked up); a quantized way is
            picked only when one of them does its bit width (8-bit: bitsandbytes or torchao; 4-bit:
            bitsandbytes).
        headroom_gib: memory kept free for the CUDA context.

    Returns:
        The first option (largest, fastest) that fits, its computed peak filled in, or None on a CPU or
        for a family without figures.

    Raises:
        NbkitError: when the GPU lacks bf16 for a family that needs it, or no option fits.
    """
    family = _family(spec)
    if task not in ("generate", "train"):
        raise ValueError(f"task must be 'generate' or 'train', got {task!r}")
    if device is None:
        return None
    precision = "bf16" if device.bf16 else "fp16"
    if task == "generate":
        options = generation_options(family, precision=precision)
    else:
        options = training_options(family, TrainingRun())
    what = "train a LoRA of" if task == "train" else "run"
    # A family that needs bf16 is refused on a GPU without it, figures or not.
    if family.needs_bf16 and not device.bf16:
        raise _refuse_bf16(family, device, what, _listing(options) if options else "bf16 only")
    if not options:
        return None
    installed = tuple(quantizers_installed() if quantizers is None else quantizers)
    return _pick(family, options, device, installed, what, headroom_gib)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What a run trains, as the estimates see it (`plan_training` reads it from the run's settings).

    Args:
        full: full fine-tuning, else a LoRA.
        lora_rank: the LoRA's rank.
        stages: the stages that run (`text_encoder`, `denoiser`).
        gradient_checkpointing: recompute activations in backward.
        eight_bit_adam: bitsandbytes' 8-bit AdamW, else float32 AdamW states.
        resolution: the training size; None: the family's native size.
        batch: images per step (class images included).
        samples: the run renders sample images (the whole pipeline on the GPU while it does).
    """

    full: bool = False
    lora_rank: int = DEFAULT_LORA_RANK
    stages: tuple[str, ...] = ("denoiser",)
    gradient_checkpointing: bool = True
    eight_bit_adam: bool = True
    resolution: int | None = None
    batch: int = 1
    samples: bool = True

    def describe(self, family: Family) -> str:
        mode = "full fine-tuning" if self.full else f"a rank-{self.lora_rank} LoRA"
        return f"{mode} at {self.resolution or family.native_resolution} px, batch {self.batch}"


def training_options(spec: ModelSpec | str | Family, run: TrainingRun) -> tuple[MemoryOption, ...]:
    """The family's ways of training `run` with their computed peaks (GiB, overhead included: the
    largest of each stage's step, setup and sampling; fp16 and bf16 hold the same bytes); empty
    without figures.

    Args:
        spec: the model, its family or the family's name.
        run: what trains.
    """
    family = _family(spec)
    options = []
    for option in family.memory_options("train"):
        peaks = []
        for stage in run.stages:
            estimate = training_estimate(
                family,
                stage=stage,
                full=run.full,
                gradient_checkpointing=run.gradient_checkpointing,
                eight_bit_adam=run.eight_bit_adam,
                resolution=run.resolution,
                batch=run.batch,
                lora_rank=run.lora_rank,
                option=option,
            )
            if estimate is None:
                return ()
            peaks.append(estimate.peak(samples=run.samples))
        options.append(dataclasses.replace(option, peak_gib=max(peaks)))
    return tuple(options)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How a run trains on the GPU at hand (`plan_training`).

    Args:
        option: the way it runs (`Family.memory_options("train")`, its peak computed), or None when
            nothing was checked (a CPU, or a family without figures).
        changes: settings the plan sets (`lora_rank` when full fine-tuning does not fit).
        notes: what the plan decided and why, for the user.
        quantization: how the base loads (`8bit`, `4bit`) or None.
    """

    option: MemoryOption | None = None
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    quantization: str | None = None


def training_run(
    family: Family, config: Any, *, full: bool | None = None, lora_rank: int | None = None
) -> TrainingRun:
    """What `config` (a `TrainConfig`) trains, for the estimates.

    Args:
        family: the base model's family.
        config: the run's settings.
        full: full fine-tuning or a LoRA (default: a LoRA when `lora_rank` is above 0).
        lora_rank: the LoRA's rank (default: `lora_rank`, or 16).
    """
    if full is None:
        full = config.lora_rank == 0 and family.trains_full_denoiser
    if lora_rank is None:
        lora_rank = config.lora_rank or DEFAULT_LORA_RANK
    stages = []
    if config.text_encoder_steps > 0 and family.trains_text_encoders:
        stages.append("text_encoder")
    if config.unet_steps > 0:
        stages.append("denoiser")
    return TrainingRun(
        full=full,
        lora_rank=lora_rank,
        stages=tuple(stages),
        gradient_checkpointing=config.gradient_checkpointing,
        eight_bit_adam=config.use_8bit_adam,
        resolution=config.resolution,
        batch=config.batch_size * (2 if config.prior.num_images > 0 else 1),
        samples=bool(config.sample_prompts),
    )


def _allowed(option: MemoryOption, quantize_base: str) -> bool:
    if quantize_base == "auto":
        return True
    return option.quantization == (None if quantize_base == "none" else quantize_base)


def plan_training(
    spec: ModelSpec | str | Family,
    config: Any,
    device: DeviceFacts | None,
    *,
    quantizers: Sequence[str] | None = None,
    headroom_gib: float = HEADROOM_GIB,
) -> TrainingPlan:
    """Pick how a run trains on `device` from the computed figures, or refuse it before it starts.

    `training_mode` `auto` (with `lora_rank` 0) fine-tunes the full model where it fits and trains a
    rank-16 LoRA where it does not (saying why); `full` is refused where it does not fit, with the
    figure, the LoRA's figure and the smallest GPU that would fit. `quantize_base` `auto` takes the
    largest way (bf16, then 8-bit, then 4-bit base) that fits.

    Args:
        spec: the base model, its family or the family's name.
        config: the run's `TrainConfig`.
        device: the GPU (`device_facts()`), or None on a CPU, where nothing is checked.
        quantizers: the quantization libraries installed (default: looked up).
        headroom_gib: memory kept free for the CUDA context.

    Raises:
        NbkitError: the GPU lacks bf16 for a family that needs it, or nothing the settings allow fits.
    """
    family = _family(spec)
    if device is None:
        return TrainingPlan()
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(
        config.mixed_precision, "bf16" if device.bf16 else "fp16"
    )
    changes: dict[str, Any] = {}
    if config.lora_rank > 0:
        candidates = [(False, config.lora_rank)]
    elif config.training_mode == "lora" or not family.trains_full_denoiser:
        candidates = [(False, DEFAULT_LORA_RANK)]
    elif config.training_mode == "full":
        candidates = [(True, 0)]
    else:
        candidates = [(True, 0), (False, DEFAULT_LORA_RANK)]
    installed = tuple(quantizers_installed() if quantizers is None else quantizers)
    runs = [training_run(family, config, full=full, lora_rank=rank) for full, rank in candidates]
    if "bitsandbytes" not in installed:  # the trainer falls back to AdamW's float32 states without it
        runs = [dataclasses.replace(run, eight_bit_adam=False) for run in runs]
    if not runs[0].stages:
        return TrainingPlan()
    first = training_options(family, runs[0])
    if not first:
        return TrainingPlan()
    what = "train a LoRA of" if not runs[0].full else "fine-tune"
    if family.needs_bf16 and not device.bf16:
        raise _refuse_bf16(family, device, what, _listing(first))
    usable = device.total_gib - headroom_gib
    for run in runs:
        options = training_options(family, run)
        allowed = [option for option in options if _allowed(option, config.quantize_base)]
        if not any(option.peak_gib <= usable for option in options):
            continue
        if not any(option.peak_gib <= usable for option in allowed):
            fitting = next(option for option in options if option.peak_gib <= usable)
            raise NbkitError(
                f"{device.name} has {device.total_gib:.0f} GiB: {run.describe(family)} of {family.title} there "
                f"needs the {fitting.name} way ({fitting.description}, about {fitting.peak_gib:.1f} GiB), but "
                f"quantize_base is '{config.quantize_base}' (ways: {_listing(options)})",
                fix="use quantize_base 'auto' (--quantize-base auto), or a GPU with more memory",
            )
        option = _pick(family, allowed, device, installed, "train a LoRA of", headroom_gib)
        notes = []
        if run is not runs[0]:
            changes["lora_rank"] = run.lora_rank
            full_peak = min(option.peak_gib for option in first)
            notes.append(
                f"{family.title}: full fine-tuning at {run.resolution} px needs about {full_peak:.1f} GiB and "
                f"{device.name} has {device.total_gib:.0f} GiB, so this run trains a rank-{run.lora_rank} LoRA "
                f"(about {option.peak_gib:.1f} GiB); full fine-tuning fits "
                f"{smallest_gpu(full_peak, bf16=family.needs_bf16) or 'no common GPU'}"
            )
        elif run.lora_rank and candidates[0][1] != config.lora_rank:
            changes["lora_rank"] = run.lora_rank
        notes.append(
            f"GPU memory: {run.describe(family)}, {option.description}: about {option.peak_gib:.1f} GiB "
            f"of {device.name}'s {device.total_gib:.0f} GiB"
        )
        return TrainingPlan(option, changes, tuple(notes), option.quantization)
    raise _refuse_training(family, device, runs, first, precision, usable)


def _refuse_training(family, device, runs, first, precision, usable) -> NbkitError:
    need = min(option.peak_gib for option in first)
    run = runs[0]
    message = (
        f"{device.name} has {device.total_gib:.0f} GiB, too little for {run.describe(family)} of {family.title}: "
        f"it needs about {need:.1f} GiB" + (f" (ways: {_listing(first)})" if len(first) > 1 else "")
    )

    def peak(candidate: TrainingRun) -> float:
        return min(option.peak_gib for option in training_options(family, candidate))

    lora = dataclasses.replace(run, full=False, lora_rank=DEFAULT_LORA_RANK)
    changes = [
        ({}, ""),
        (dict(eight_bit_adam=True), "use 8-bit Adam (use_8bit_adam: true; needs bitsandbytes)"),
        (dict(gradient_checkpointing=True), "turn gradient checkpointing on (gradient_checkpointing: true)"),
        (dict(batch=1), "use batch size 1 without prior preservation"),
        (dict(gradient_checkpointing=True, batch=1), "turn gradient checkpointing on with batch size 1"),
    ]
    fixes = []
    for base, words in ((run, ""), (lora, "train a LoRA (--training-mode lora)")):
        if base is lora and not (run.full and family.trains_full_denoiser):
            continue
        for change, change_words in changes:
            changed = dataclasses.replace(base, **change)
            if (change and changed == base) or (base is run and not change):
                continue
            if peak(changed) <= usable:
                fixes.append(
                    f"{' and '.join(filter(None, (words, change_words)))}: about {peak(changed):.1f} GiB"
                )
                break  # the smallest change that fits, for this mode
    bigger = smallest_gpu(need, bf16=family.needs_bf16 or precision == "bf16")
    fixes.append(f"use {bigger}" if bigger else "use a GPU with more memory")
    return NbkitError(message, fix="; or ".join(fixes))


def _can_do(quantization: str, installed: Sequence[str]) -> bool:
    return any(quantization in BACKEND_BITS.get(name, ()) for name in installed)
