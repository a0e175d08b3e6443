"""What a run trains with: the effective config, the base model, and the checks made before any work.

Everything here is cheap and runs before a model is loaded, so a bad setting, a session without
photos or a resolution the model was not made for fails in a second, not after a 5 GB download.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.env import has_native_bf16
from nbkit.errors import NbkitError
from nbkit.errors import setting as _setting
from nbkit.families import get_family
from nbkit.models.registry import validate_resolution
from nbkit.session.base_model import model_spec
from nbkit.session.manifest import BaseModelRef
from nbkit.session.settings import TrainConfig

if TYPE_CHECKING:
    import torch

    from nbkit.models.memory import TrainingPlan

# Settings a resumed run must share with its checkpoint, or the weights would not fit or mean something else.
RESUME_KEYS = (
    "resolution",
    "batch_size",
    "gradient_accumulation",
    "seed",
    "lora_rank",
    "lora_alpha",
    "random_flip",
)
RESUME_PRIOR_KEYS = ("class_prompt", "num_images")
# The same for FLUX.1's conditioning; checkpoints written before these settings existed lack them.
RESUME_FLUX_KEYS = ("flux_max_sequence_length", "flux_timestep_sampling", "flux_guidance")
# Settings added later still: a checkpoint written before them resumes as it was trained (without).
RESUME_LATER_KEYS = ("caption_dropout", "buckets", "mask_background")
QUANTIZATION_KEY = "the base model's quantization"

RESTART = _setting("restart")


def merge_config(stored: TrainConfig, overrides: dict[str, Any] | None) -> TrainConfig:
    """The session's stored config with `overrides` applied; nested `prior` settings merge key by key.

    Args:
        stored: the config in `session.json`.
        overrides: field names of `TrainConfig` and their new values; `prior` may be a partial dict.
    """
    data = stored.to_dict()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TrainConfig.from_dict(data, where="training settings")


def family_overrides(family: str, stored: TrainConfig, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`overrides` plus the family's own starting settings (`Family.training_defaults`) for the
    settings the session still has at `TrainConfig`'s defaults and the run does not set.

    Sessions get the family's settings at creation; older ones get them here where they still hold
    the SD-era defaults.

    Args:
        family: the base model's family.
        stored: the config in `session.json`.
        overrides: the run's settings.
    """
    result = dict(overrides or {})
    defaults = TrainConfig()
    for key, value in get_family(family).training_defaults.items():
        if key not in result and getattr(stored, key) == getattr(defaults, key):
            result[key] = value
    return result


def check_family_config(family: str, config: TrainConfig) -> None:
    """Refuse what the family cannot train (FLUX.1: a LoRA of its transformer only, in bf16 or fp32).

    Args:
        family: the base model's family.
        config: the run's settings.
    """
    get_family(family).check_training_settings(config)


def plan_gpu_memory(base_model: BaseModelRef, config: TrainConfig) -> TrainingPlan:
    """Plan the run for the GPU at hand from the computed figures (`nbkit.models.memory.plan_training`):
    full fine-tuning or a LoRA, and how the base loads; refuse a GPU that cannot train it.

    Args:
        base_model: the run's base model.
        config: the run's settings.

    Raises:
        NbkitError: the GPU cannot train it as set (with the figure and what would fit); a quantized
            base without a library that does it (4-bit without bitsandbytes on CUDA).
    """
    from nbkit.models import memory

    family = get_family(base_model.family)
    facts = memory.device_facts()
    plan = memory.plan_training(model_spec(base_model), config, facts)
    option = plan.option
    quantization = option.quantization if option is not None else None
    if config.quantize_base in ("8bit", "4bit") and family.trains_on_quantized_base:
        quantization = config.quantize_base
    if quantization is not None:
        from nbkit.models.quantization import choose_backend

        try:
            choose_backend(quantization)  # the library that loads it is there
        except NbkitError as error:
            if option is None or option.quantization is None:
                raise
            raise NbkitError(
                f"{facts.name} has {facts.total_gib:.0f} GiB: training a {family.title} LoRA there needs the "
                f"{option.name} way ({option.description}), and {error.message}",
                fix=error.fix,
            ) from error
    return dataclasses.replace(plan, quantization=quantization)


def check_memory(base_model: BaseModelRef, config: TrainConfig) -> str | None:
    """How the base loads for this run on this GPU: `8bit`/`4bit` (its denoiser quantized, the LoRA on
    top) or None (`plan_gpu_memory`, for a config the plan has already been applied to)."""
    return plan_gpu_memory(base_model, config).quantization


def _require(condition: bool, message: str, fix: str) -> None:
    if not condition:
        raise NbkitError(message, fix=fix)


def check_config(config: TrainConfig) -> None:
    """Reject settings that cannot train, naming the setting and the value."""
    _require(
        not (config.training_mode == "full" and config.lora_rank > 0),
        f"training_mode is 'full' but lora_rank is {config.lora_rank}",
        "use lora_rank 0 (--lora-rank 0) for full fine-tuning, or training_mode 'lora'",
    )
    _require(
        config.text_encoder_steps >= 0, f"text_encoder_steps is {config.text_encoder_steps}", "use 0 or more"
    )
    _require(config.unet_steps >= 0, f"unet_steps is {config.unet_steps}", "use 0 or more")
    _require(
        config.text_encoder_steps + config.unet_steps > 0,
        "both text_encoder_steps and unet_steps are 0: there is nothing to train",
        "set --unet-steps (e.g. 1500) and/or --te-steps (e.g. 350)",
    )
    for name, steps in (("text_encoder_lr", config.text_encoder_steps), ("unet_lr", config.unet_steps)):
        value = getattr(config, name)
        _require(
            steps == 0 or (math.isfinite(value) and value > 0),
            f"{name} is {value}",
            "use a positive rate, e.g. 2e-6",
        )
    _require(config.batch_size >= 1, f"batch_size is {config.batch_size}", "use 1 or more")
    _require(
        config.gradient_accumulation >= 1,
        f"gradient_accumulation is {config.gradient_accumulation}",
        "use 1 or more",
    )
    _require(config.lr_warmup_steps >= 0, f"lr_warmup_steps is {config.lr_warmup_steps}", "use 0 or more")
    _require(config.max_grad_norm >= 0, f"max_grad_norm is {config.max_grad_norm}", "use 0 (off) or more")
    _require(config.offset_noise >= 0, f"offset_noise is {config.offset_noise}", "use 0 (off) to about 0.1")
    _require(
        0 <= config.caption_dropout < 1,
        f"caption_dropout is {config.caption_dropout}",
        "use a share from 0 (off) to below 1, e.g. 0.1",
    )
    _require(
        config.mask_background is None or 0 <= config.mask_background <= 1,
        f"mask_background is {config.mask_background}",
        "use a weight from 0 (background ignored) to 1 (as the subject), or leave it unset (off)",
    )
    _require(
        config.min_snr_gamma is None or config.min_snr_gamma > 0,
        f"min_snr_gamma is {config.min_snr_gamma}",
        "use a positive value (5 is usual) or leave it unset",
    )
    _require(
        config.checkpoint_every >= 0,
        f"checkpoint_every is {config.checkpoint_every}",
        "use 0 (stage ends only) or more",
    )
    _require(
        config.keep_checkpoints >= 1, f"keep_checkpoints is {config.keep_checkpoints}", "keep at least 1"
    )
    _require(
        config.lora_rank >= 0, f"lora_rank is {config.lora_rank}", "use 0 (full fine-tune) or a rank like 16"
    )
    _require(
        config.lora_alpha is None or config.lora_alpha > 0,
        f"lora_alpha is {config.lora_alpha}",
        "use a positive value or leave it unset (= rank)",
    )
    prior = config.prior
    _require(prior.num_images >= 0, f"prior.num_images is {prior.num_images}", "use 0 (off) or more")
    _require(
        prior.num_images == 0 or prior.class_prompt.strip(),
        f"prior preservation asks for {prior.num_images} class images but the class prompt is empty",
        "set --prior-class-prompt (e.g. 'photo of a dog'), or --prior-images 0",
    )
    _require(
        prior.loss_weight >= 0, f"prior.loss_weight is {prior.loss_weight}", "use 0 or more (1.0 is usual)"
    )
    _require(
        config.seed is None or 0 <= config.seed < 2**63, f"seed is {config.seed}", "use a whole number >= 0"
    )
    _require(
        not config.score or bool(config.sample_prompts),
        "score is on but there are no sample prompts: scoring rates the samples rendered at each checkpoint",
        "add --sample-prompt 'photo of zwx dog' (repeatable), or turn scoring off with --no-score",
    )


def check_images(session_path: Path, images: list, *, masked: bool = False) -> None:
    """The session must have instance images, each present and captioned; with masked loss
    (`masked`), at least one with a subject mask, and every mask present."""
    if not images:
        raise NbkitError(
            "the session has no instance images",
            path=session_path / "instance_images",
            fix="add photos of your subject first (the 'Instance images' cell, or `nbkit images add`)",
        )
    for record in images:
        path = session_path / record.file
        if not path.is_file():
            raise NbkitError(
                "an instance image listed in session.json is missing",
                path=path,
                fix="add it again, or remove it from the session (`nbkit images`)",
            )
        if not record.caption.strip():
            raise NbkitError(
                "this instance image has an empty caption",
                path=path,
                fix="give it a caption with your subject's token (the captions cell, or captions/<name>.txt)",
            )
        if masked and record.mask and not (session_path / record.mask).is_file():
            raise NbkitError(
                "a subject mask listed in session.json is missing",
                path=session_path / record.mask,
                fix="add the mask again (`nbkit images add SESSION <photo>.mask.png`)",
            )
    if masked and not any(record.mask for record in images):
        raise NbkitError(
            "masked loss is on (mask_background) but no photo has a subject mask",
            path=session_path / "instance_images",
            fix="add masks (`<photo>.mask.png` beside each photo, or `nbkit images mask`), or train "
            "without masked loss (leave mask_background unset)",
        )


def check_resolution(base_model: BaseModelRef, resolution: int, *, force: bool = False) -> None:
    validate_resolution(model_spec(base_model), resolution, force=force)


def check_resume(
    config: TrainConfig,
    base_model: BaseModelRef,
    saved: dict[str, Any],
    where: Path,
    *,
    quantization: str | None = None,
    concepts: dict[str, dict] | None = None,
) -> None:
    """A resumed run must keep the settings its checkpoint was trained with.

    Args:
        config: the run's settings.
        base_model: the run's base model.
        saved: the checkpoint's `trainer_state.json`.
        where: the checkpoint folder, for the message.
        quantization: how the run loads its base (`check_memory`): a LoRA trained on an 8-bit
            transformer does not continue on a 4-bit one (another GPU) without being told.
        concepts: the session's further concepts (`nbkit.session.concepts.concept_settings`); a
            checkpoint written before concepts existed records none.
    """
    saved_config, saved_model = saved.get("config", {}), saved.get("base_model", {})
    current = config.to_dict()
    mismatches = [
        (key, saved_config.get(key), current[key])
        for key in RESUME_KEYS
        if saved_config.get(key) != current[key]
    ]
    mismatches += [
        (key, saved_config[key], current[key])
        for key in (*RESUME_FLUX_KEYS, *RESUME_LATER_KEYS)
        if key in saved_config and saved_config[key] != current[key]
    ]
    if "quantized_base" in saved and saved["quantized_base"] != quantization:
        mismatches.append((QUANTIZATION_KEY, saved["quantized_base"], quantization))
    if "concepts" in saved:
        mismatches += _concept_changes(saved["concepts"], concepts or {})
    saved_prior = saved_config.get("prior", {})
    # With prior preservation off before and now, its class prompt trains nothing: a class word set
    # (or suggested) after the stop does not block the resume.
    prior_used = bool(saved_prior.get("num_images")) or bool(current["prior"]["num_images"])
    mismatches += [
        (f"prior.{key}", saved_prior.get(key), current["prior"][key])
        for key in RESUME_PRIOR_KEYS
        if prior_used and saved_prior.get(key) != current["prior"][key]
    ]
    for key in ("source", "family"):
        if saved_model.get(key) != getattr(base_model, key):
            mismatches.append((f"base model {key}", saved_model.get(key), getattr(base_model, key)))
    if mismatches:
        key, before, now = mismatches[0]
        if key == QUANTIZATION_KEY:
            back = f"resume with --quantize-base {before or 'none'} on a GPU it fits"
        elif key.startswith("concept ") and before is None:
            back = f"{key} came after the checkpoint: remove its photos to resume without it"
        elif key.startswith("concept ") and now is None:
            back = f"{key} has no photos now: import them again to resume with it"
        elif key.startswith("concept "):
            back = f"set {key} back to {before!r} (`nbkit images concept`)"
        else:
            back = f"resume with the checkpoint's {key} (drop the new setting)"
        raise NbkitError(
            f"cannot resume: {key} was {before!r} in the checkpoint but is {now!r} now",
            path=where,
            fix=f"{back}, or start over with {RESTART}",
        )


def _concept_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(`concept 'dog' repeats`, before, now) for each setting of a further concept that changed since
    the checkpoint; a concept added or gone (its photos all removed) shows as its whole settings."""
    changes = []
    for name in [*saved, *(name for name in current if name not in saved)]:
        before, now = saved.get(name), current.get(name)
        if before is None or now is None:
            changes.append((f"concept {name!r}", before, now))
            continue
        changes += [
            (f"concept {name!r} {field}", before.get(field), now.get(field))
            for field in sorted({*before, *now})
            if before.get(field) != now.get(field)
        ]
    return changes


def resolve_precision(setting: str, device: torch.device) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision mode and the dtype of frozen weights for `setting` on `device`.

    `auto` is bf16 on GPUs that do it natively (Ampere and newer), fp16 on older ones, `no` on CPU.
    """
    import torch

    if setting == "auto":
        if device.type != "cuda":
            setting = "no"
        else:
            setting = "bf16" if has_native_bf16(torch.cuda.get_device_capability(device)) else "fp16"
    if setting == "fp16" and device.type != "cuda":
        raise NbkitError(
            "fp16 mixed precision needs a CUDA GPU, and this run has none",
            fix="use mixed_precision 'auto' or 'no' (or 'bf16') on a CPU",
        )
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return setting, dtypes[setting]
