"""Peak GPU memory of a training run or a generation, estimated from a family's traced figures.

Each family ships figures traced at full width (`Family.memory_figures`, made by
`python -m nbkit.realsize.figures`): one training step per stage, mode (full or LoRA) and gradient
checkpointing, and each phase of one generation, at its native resolution and batch 1, each split
into parameters, gradients, optimizer states and the rest (activations, temporaries, inputs). The
estimates here take those figures to the run's settings:

- the activations, temporaries and inputs scale with the images' pixels times the batch (prior
  preservation doubles it), above the traced size at the rate the peak grew from batch 1 to batch 2
  (both traced); attention runs in fused kernels that keep no score matrix, so they grow linearly
  with pixels rather than with their square;
- AdamW keeps two float32 states per trained parameter (8 bytes); 8-bit Adam the traced figure
  (about 2 bytes: bitsandbytes' uint8 states and their block scales);
- a LoRA of another rank scales its trained parameters, gradients and states with the rank;
- a quantized component holds `QUANTIZED_BYTES` per parameter instead of two;
- stage 1 without gradient checkpointing (not traced) adds what turning it off adds to the
  activations of a LoRA step of stage 2, where the denoiser is frozen as it is in stage 1.

What the trace does not see (allocator fragmentation and cuBLAS/cuDNN workspaces) is added by
`OVERHEAD_FACTOR`, and the CUDA context by the planner's headroom: a stated margin until the GPU check
(`bench/gpu.sh`) measures them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nbkit.families.base import Family
from nbkit.families.facts import MemoryOption

GiB = 2**30
OVERHEAD_FACTOR = 1.15
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}  # NF4 with double-quantized scales
HALF = 2  # bytes of a float16 / bfloat16 weight
DYNAMIC = ("activations", "temporaries", "inputs")


@dataclasses.dataclass(frozen=True)
class TrainingEstimate:
    """The estimated peak GPU memory of each phase of a training run, in GiB (overhead included).

    Args:
        step: one training step of the stage (forward, backward, optimizer step).
        setup: encoding the photos and captions with the whole pipeline on the GPU.
        sampling: rendering sample images with the whole pipeline on the GPU and the training state kept.
    """

    step: float
    setup: float
    sampling: float

    def peak(self, *, samples: bool = True) -> float:
        """The largest phase (sampling only when the run renders samples)."""
        return max(self.step, self.setup, *((self.sampling,) if samples else ()))


def _dynamic(traced: Mapping[str, Any], scale: float = 1.0, *, floor: float = 0.0) -> float:
    """The activations, temporaries and inputs of a traced row at `scale` times its pixels x batch.

    At the traced size it is what the peak's moment held. Larger, the peak grows as it grew from the
    traced batch 1 to 2, and never slower than what the batch-1 peak's moment held or than `floor`
    (a larger batch may move the peak to a moment that holds more activations). Smaller, that moment
    shrinks.
    """
    at_peak = sum(traced["breakdown"].get(key, 0) for key in DYNAMIC)
    if scale <= 1:
        return at_peak * scale
    return at_peak + max(at_peak, _growth(traced), floor) * (scale - 1)


def _growth(traced: Mapping[str, Any]) -> float:
    return traced["peak_batch_2"] - traced["peak"]


def _row(figures: Mapping[str, Any], stage: str, mode: str, checkpointing: bool) -> Mapping[str, Any] | None:
    for row in figures["train"]:
        if (row["stage"], row["mode"], row["gradient_checkpointing"]) == (stage, mode, checkpointing):
            return row
    return None


def _pixels(figures: Mapping[str, Any], resolution: int) -> float:
    return (resolution / figures["resolution"]) ** 2


def _weights(
    figures: Mapping[str, Any],
    names,
    *,
    quantization: str | None = None,
    quantized=(),
    upcast_vae: bool = False,
) -> float:
    total = 0.0
    for name in names:
        count = figures["components"][name]["parameters"]
        per = QUANTIZED_BYTES[quantization] if quantization and name in quantized else HALF
        if name == "vae" and upcast_vae:
            per = 4
        total += count * per
    return total


def _upcast_vae(family: Family, precision: str) -> bool:
    # diffusers decodes in float32 when a float16 VAE says it overflows (SDXL's `force_upcast`).
    return precision == "fp16" and bool(family.vae_latent.get("force_upcast"))


def generation_bytes(
    family: Family,
    option: MemoryOption,
    *,
    resolution: int | None = None,
    batch: int = 1,
    precision: str = "fp16",
) -> float | None:
    """The estimated peak GPU memory (bytes, before `OVERHEAD_FACTOR`) of one generation run as `option`.

    Resident components add up with the largest phase; under offload each phase holds only its own
    components (and the ones that cannot move, `option.stays`).

    Args:
        family: the model's family.
        option: one of `family.memory_options("generate")`.
        resolution: the image's size (default: the family's native size).
        batch: images at once.
        precision: `fp16` or `bf16` (the weights' dtype).

    Returns:
        The bytes, or None when the family has no figures.
    """
    figures = family.memory_figures()
    if figures is None:
        return None
    pixels = _pixels(figures, resolution or figures["resolution"])
    upcast = _upcast_vae(family, precision)
    weights = dict(quantization=option.quantization, quantized=option.quantized, upcast_vae=upcast)
    components = list(figures["components"])
    resident = option.stays if option.offload else components
    largest = 0.0
    for phase, traced in figures["generate"].items():
        scale = batch if phase == "text" else batch * pixels
        dynamic = _dynamic(traced, scale) * (2 if phase == "decode" and upcast else 1)
        moved = [name for name in traced["components"] if name not in resident]
        largest = max(largest, _weights(figures, moved, **weights) + dynamic)
    return _weights(figures, resident, **weights) + largest


def training_estimate(
    family: Family,
    *,
    stage: str,
    full: bool,
    gradient_checkpointing: bool = True,
    eight_bit_adam: bool = True,
    resolution: int | None = None,
    batch: int = 1,
    lora_rank: int = 16,
    option: MemoryOption | None = None,
) -> TrainingEstimate | None:
    """The estimated peak GPU memory of a training stage's phases (module docstring), in GiB. fp16 and
    bf16 mixed precision hold the same bytes, so the estimate does not depend on which.

    Args:
        family: the base model's family.
        stage: `text_encoder` (stage 1) or `denoiser` (stage 2).
        full: full fine-tuning of the stage's model, else a LoRA of it.
        gradient_checkpointing: recompute activations in backward.
        eight_bit_adam: bitsandbytes' 8-bit AdamW, else torch's AdamW with float32 states.
        resolution: the training size (default: the family's native size).
        batch: images per step, class images of prior preservation included.
        lora_rank: the LoRA's rank (ignored for full fine-tuning).
        option: one of `family.memory_options("train")` (a quantized base), or None.

    Returns:
        The estimate, or None when the family has no figures or nothing was traced for the stage and mode.
    """
    figures = family.memory_figures()
    if figures is None:
        return None
    mode = "full" if full else "lora"
    row = _row(figures, stage, mode, gradient_checkpointing)
    pixels = _pixels(figures, resolution or figures["resolution"])
    extra = 0.0
    if row is None and not gradient_checkpointing:
        row = _row(figures, stage, mode, True)
        on, off = _row(figures, "denoiser", "lora", True), _row(figures, "denoiser", "lora", False)
        if row is not None and on is not None and off is not None:
            extra = max(0.0, _dynamic(off, pixels * batch) - _dynamic(on, pixels * batch))
    if row is None:
        return None
    breakdown = row["breakdown"]
    trained = row["trained_parameters"]
    wanted = trained if full else trained * lora_rank / figures["lora_rank"]
    parameters = breakdown["parameters"] + (wanted - trained) * 4  # trained weights are float32 masters
    gradients = breakdown["gradients"] * wanted / trained
    optimizer = breakdown["optimizer"] * wanted / trained if eight_bit_adam else wanted * 8
    quantization = option.quantization if option is not None else None
    if quantization:
        base = [name for name in option.quantized if name in figures["components"]]
        parameters -= _weights(figures, base)
        parameters += _weights(figures, base, quantization=quantization, quantized=base)
    # Fine-tuning the whole model holds at least the activations a LoRA of it holds (its peak may sit at
    # the optimizer step at batch 1 and 2, where activations are gone).
    lora = _row(figures, row["stage"], "lora", row["gradient_checkpointing"]) if full else None
    floor = _growth(lora) if lora is not None else 0.0
    step = parameters + gradients + optimizer + _dynamic(row, pixels * batch, floor=floor) + extra
    # The optimizer step holds every gradient (float32) at once, whatever the size.
    step = max(step, parameters + wanted * 4 + optimizer)
    if not gradient_checkpointing:  # keeping activations never needs less than recomputing them
        arguments = dict(stage=stage, full=full, eight_bit_adam=eight_bit_adam, resolution=resolution)
        arguments.update(batch=batch, lora_rank=lora_rank, option=option)
        checkpointed = training_estimate(family, gradient_checkpointing=True, **arguments)
        step = max(step, checkpointed.step * GiB / OVERHEAD_FACTOR)
    # Setup and sampling hold the whole pipeline (text encoders a family offloads included) besides the
    # trained weights; sampling also keeps the optimizer's states. One image at a time.
    quantized = option.quantized if option is not None else ()
    resident = _weights(figures, figures["components"], quantization=quantization, quantized=quantized)
    # float32 masters: a full model's replace its half-precision weights, a LoRA's come on top
    trained_bytes = wanted * (2 if full else 4)
    largest_phase = max(
        _dynamic(traced, 1 if phase == "text" else pixels) for phase, traced in figures["generate"].items()
    )
    setup = resident + trained_bytes + largest_phase
    sampling = setup + optimizer
    return TrainingEstimate(*(value * OVERHEAD_FACTOR / GiB for value in (step, setup, sampling)))
