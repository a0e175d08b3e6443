"""Turn an out-of-memory crash into advice the user can act on.

A CUDA OOM traceback says how many MiB were missing, not which of the dozen training settings to
change. `explain_oom` reads the run's settings and lists only the changes that would still help, most
effective first, with the CLI flag or `session.json` key that makes each one.
"""

from __future__ import annotations

from typing import Any

from nbkit.errors import NbkitError, setting
from nbkit.families import FAMILIES

# Messages the allocators of each backend put in their errors (torch raises plain RuntimeErrors for
# some of them, and accelerate or a DataLoader worker may wrap them in another exception).
OOM_MARKERS = (
    "out of memory",  # CUDA, ROCm (HIP) and MPS all say it
    "defaultcpuallocator: can't allocate memory",
    "not enough memory",  # Windows' CPU allocator
    "cublas_status_alloc_failed",
)


MIN_SAVING_GIB = 0.05  # computed savings below this are not worth a tip


def is_oom(error: BaseException) -> bool:
    """True when `error` (or an exception it was raised from) is an out-of-memory failure.

    Args:
        error: the exception caught around the training loop.
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or _is_torch_oom(current):
            return True
        text = str(current).lower()
        if isinstance(current, RuntimeError | OSError) and any(marker in text for marker in OOM_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_torch_oom(error: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom_type is not None and isinstance(error, oom_type)


def _device_word(error: BaseException) -> str:
    text = str(error).lower()
    if "mps" in text:
        return "Apple GPU (MPS)"
    if "cuda" in text or "cublas" in text or _is_torch_oom(error):
        return "GPU"
    return "system (CPU)"


def _peak(family: str | None, run) -> float | None:
    """The computed peak (GiB) of `run` for `family`, in its largest way; None without figures."""
    from nbkit.models.memory import training_options

    options = training_options(family, run) if run.stages else ()
    return options[0].peak_gib if options else None


def suggestions(config: Any, *, family: str | None = None, stage: str | None = None) -> list[str]:
    """The settings worth lowering for `config`, most memory saved first.

    Where the family has computed memory figures (`nbkit.models.memory`), each tip says how much it
    saves and the tips are ranked by it (gradient checkpointing saves half of SDXL LoRA's peak but
    little of SD 1.5 full fine-tuning, where 8-bit Adam is the big saving).

    Args:
        config: a `TrainConfig` (any object with its attribute names works).
        family: the model family's name, to judge the resolution and word the advice.
        stage: `text_encoder` or `unet` when the crash happened inside one stage.
    """
    import dataclasses

    run = None
    if family in FAMILIES and hasattr(config, "prior"):
        from nbkit.models.memory import training_run

        run = training_run(FAMILIES[family], config)
        if stage is not None:
            run = dataclasses.replace(
                run, stages=("text_encoder" if stage == "text_encoder" else "denoiser",)
            )
    current = _peak(family, run) if run is not None else None
    tips: list[tuple[str, dict[str, Any] | None]] = []  # advice, and the change to the run it makes
    precision = getattr(config, "mixed_precision", "auto")
    if precision == "no":
        tips.append(
            (
                f"use mixed precision (`mixed_precision` is '{precision}'; set 'fp16', or 'bf16' on Ampere+ GPUs)",
                None,
            )
        )
    if not getattr(config, "gradient_checkpointing", True):
        tips.append(
            (
                "turn gradient checkpointing on (`gradient_checkpointing: true`)",
                {"gradient_checkpointing": True},
            )
        )
    if not getattr(config, "use_8bit_adam", True):
        tips.append(
            ("use 8-bit Adam (`use_8bit_adam: true`; needs CUDA and bitsandbytes)", {"eight_bit_adam": True})
        )
    if getattr(config, "lora_rank", 0) == 0:
        tips.append(
            (
                "train a LoRA instead of the full model (`--training-mode lora`): only a few MB of weights get "
                "gradients and optimizer state"
                + (FAMILIES[family].lora_oom_hint if family in FAMILIES else ""),
                {"full": False},
            )
        )
    batch_size = getattr(config, "batch_size", 1)
    prior = getattr(config, "prior", None)
    prior_on = prior is not None and getattr(prior, "num_images", 0) > 0
    if batch_size > 1:
        accumulation = getattr(config, "gradient_accumulation", 1)
        tips.append(
            (
                f"lower the batch size (`--batch-size` is {batch_size}; try 1 with `gradient_accumulation` "
                f"{batch_size * accumulation} to keep the same effective batch)",
                {"batch": 2 if prior_on else 1},
            )
        )
    if prior_on:
        tips.append(
            (
                "prior preservation doubles every batch (instance + class images); turn it off to halve it",
                {"batch": batch_size},
            )
        )
    resolution = getattr(config, "resolution", None)
    # Never below what training accepts without --force-resolution: the family's smallest useful size.
    known = [FAMILIES[family]] if family in FAMILIES else list(FAMILIES.values())
    floor = min(spec.smallest_useful_resolution for spec in known)
    if resolution is not None and resolution > floor:
        lower = max(floor, (resolution * 3 // 4) // 64 * 64)
        tips.append(
            (f"lower the resolution (`--resolution` is {resolution}; try {lower})", {"resolution": lower})
        )
    if stage == "text_encoder" or (stage is None and getattr(config, "text_encoder_steps", 0) > 0):
        tips.append(
            (
                "skip text encoder training (`--te-steps 0`): stage 1 keeps the text encoder's gradients and "
                "optimizer state in memory",
                {"stages": ("denoiser",)},
            )
        )
    if current is None:
        return [advice for advice, _ in tips]
    ranked = []
    for order, (advice, change) in enumerate(tips):
        after = _peak(family, dataclasses.replace(run, **change)) if change is not None else None
        saving = None if after is None else current - after
        if saving is not None and saving < MIN_SAVING_GIB:
            continue  # it would not help this run (stage 1 skipped where stage 2 is the larger, say)
        if saving is not None:
            advice += f" (about {saving:.1f} GiB less)"
        # Unknown savings (fp32 to mixed precision: not traced) first: they halve every weight.
        ranked.append((-(saving if saving is not None else float("inf")), order, advice))
    return [advice for *_, advice in sorted(ranked)]


def explain_oom(
    config: Any, error: BaseException, *, family: str | None = None, stage: str | None = None
) -> NbkitError:
    """An `NbkitError` naming the settings to lower after `error` ran out of memory.

    Raise it `from error` so the original stays attached for debugging.

    Args:
        config: the run's `TrainConfig`.
        error: the out-of-memory exception.
        family: the model family, if known.
        stage: the training stage that crashed (`text_encoder` or `unet`), if known.
    """
    where = f" in the {stage} stage" if stage else ""
    resolution = getattr(config, "resolution", "?")
    batch_size = getattr(config, "batch_size", "?")
    tips = suggestions(config, family=family, stage=stage)
    message = (
        f"training ran out of {_device_word(error)} memory{where} "
        f"(resolution {resolution}px, batch size {batch_size})"
    )
    if not tips:
        fix = "every memory-saving setting is already on; use a machine with more memory (a bigger Colab GPU)"
    else:
        fix = f"change one of these and run again with {setting('resume')}:\n    - " + "\n    - ".join(tips)
    return NbkitError(message, fix=fix)
