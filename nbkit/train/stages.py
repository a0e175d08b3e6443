"""The two DreamBooth stages: the text encoder(s) with the UNet frozen, then the UNet alone.

Both stages share one step function. Stage 1 runs the frozen UNet with gradients flowing only into
the text encoder; stage 2 runs the UNet on prompt embeddings computed once per caption by the (now
frozen) text encoder. Every random draw of a step (images, flips, latent samples, noise, timesteps,
dropout) is seeded from (seed, stage, step, micro-batch, process), so a run resumed from a checkpoint
takes exactly the steps an uninterrupted run takes.

What differs between families (prompt encoding, noise levels and loss target, the denoiser's call)
is asked of the family adapter. A family whose text encoders do not train (FLUX.1) runs stage 2 only
(named `unet` like the others, so checkpoints and resume are the same; its role, and the checkpoint's
weight file, is its denoiser's, `transformer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from nbkit.device import free_memory
from nbkit.session.settings import TrainConfig
from nbkit.train import checkpointing
from nbkit.train.components import (
    Components,
    add_lora,
    freeze,
    has_lora,
    load_trained_state_dict,
    make_trainable,
    trainable_parameters,
    trained_state_dict,
)
from nbkit.train.data import (
    STREAM_INIT,
    STREAM_STEP,
    LatentCache,
    derive_seed,
    draw_indices,
)
from nbkit.train.loss import dreambooth_loss, sample_noise

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    Args:
        name: `text_encoder` or `unet` (also the checkpoint folder prefix).
        index: 1 or 2, mixed into the step seeds.
        steps: optimizer steps in the stage.
        learning_rate: the peak learning rate.
        roles: the pipeline components it trains.
    """

    name: str
    index: int
    steps: int
    learning_rate: float
    roles: tuple[str, ...]


class ImageSet:
    """Instance or class images with cached latents, their captions, and an order stream.

    Args:
        latents: the cached VAE latents, one row per image.
        captions: the prompt of each image; with `caption_dropout`, one more: the empty prompt.
        stream: the random stream that shuffles this set.
        token_ids: each caption's token ids, one tensor per tokenizer (for stage 1).
        caption_dropout: the share of draws trained on the empty prompt (the last caption).
        repeats: draws of each image per epoch (its concept's repeats; None: 1 each).
    """

    def __init__(
        self,
        latents: LatentCache,
        captions: list[str],
        stream: int,
        token_ids: list[torch.Tensor],
        caption_dropout: float = 0.0,
        repeats: list[int] | None = None,
    ):
        self.latents = latents
        self.repeats = repeats
        self.captions = captions
        self.stream = stream
        self.token_ids = token_ids
        self.caption_dropout = caption_dropout
        self.count = len(captions) - (1 if caption_dropout else 0)  # the images
        self.embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def cache_embeddings(self, components: Components, *, max_sequence_length: int = 512) -> None:
        """Encode each distinct caption once with the frozen text encoder(s), for stage 2.

        Args:
            components: the models.
            max_sequence_length: FLUX.1's T5 prompt length (other families use their tokenizer's).
        """
        device = components.text_encoders[0].device
        distinct = {caption: index for index, caption in enumerate(self.captions)}
        encoded = {}
        with torch.no_grad():
            for caption, index in distinct.items():
                ids = [ids[index : index + 1].to(device) for ids in self.token_ids]
                embeds, pooled = components.encode_prompts(
                    components.text_encoders,
                    ids,
                    [caption],
                    max_sequence_length=max_sequence_length,
                    device=device,
                )
                encoded[caption] = (embeds[0], None if pooled is None else pooled[0])
        target = components.unet.device  # encoders that wait on the CPU (FLUX.1's) may be there by now
        embeds = torch.stack([encoded[caption][0] for caption in self.captions]).to(target)
        has_pooled = encoded[self.captions[0]][1] is not None
        pooled = torch.stack([encoded[c][1] for c in self.captions]).to(target) if has_pooled else None
        self.embeddings = (embeds, pooled)


@dataclasses.dataclass
class RunContext:
    """Everything a stage needs that outlives it.

    Args:
        accelerator: the run's accelerator.
        components: the models.
        config: the effective training config.
        seed: the run's seed.
        weight_dtype: dtype of frozen weights (fp16/bf16 under mixed precision, else fp32).
        instance: the instance images.
        prior: the class images, or None without prior preservation.
        scratch: local folder for checkpoint staging.
        checkpoints_dir: the session's `checkpoints/` folder.
        trained_roles: components changed so far, mapped to `lora` or `full`.
        on_checkpoint: called on the main process with (stage, step, published folder).
        on_step: called on the main process with (stage, step, loss, lr).
        steps_left: optimizer steps this call may still take (None: no limit).
        base_state: what every checkpoint's `trainer_state.json` records besides stage and step
            (the config and base model a resume is checked against).
        progress_bars: show a progress bar per stage (off where the caller shows its own progress).
    """

    accelerator: Accelerator
    components: Components
    config: TrainConfig
    seed: int
    weight_dtype: torch.dtype
    instance: ImageSet
    prior: ImageSet | None
    scratch: Path
    checkpoints_dir: Path
    trained_roles: dict[str, str]
    on_checkpoint: Callable[[Stage, int, Path], None]
    on_step: Callable[[Stage, int, float, float], None]
    steps_left: int | None = None
    base_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress_bars: bool = True


def load_frozen_roles(
    context: RunContext, checkpoint: checkpointing.Checkpoint, skip: tuple[str, ...]
) -> None:
    """Restore components an earlier stage trained (not those in `skip`) from a checkpoint, frozen."""
    roles = checkpoint.state()["roles"]
    for role, kind in roles.items():
        if role in skip:
            continue
        model = context.components.model(role)
        if kind == "lora" and not has_lora(model):
            _add_role_lora(context, role)
        load_trained_state_dict(
            model, checkpointing.load_weights(checkpoint.path, role), where=str(checkpoint.path)
        )
        freeze(model, context.weight_dtype)
        context.trained_roles[role] = kind


def _add_role_lora(context: RunContext, role: str) -> None:
    targets = context.components.lora_targets(role)
    role_index = ("text_encoder", "text_encoder_2", "unet", "transformer").index(role)
    add_lora(
        context.components.model(role),
        rank=context.config.lora_rank,
        alpha=context.config.lora_alpha,
        targets=targets,
        seed=derive_seed(context.seed, STREAM_INIT, role_index),
    )


def make_optimizer(
    parameters: list[torch.nn.Parameter], learning_rate: float, *, use_8bit: bool, device: torch.device
):
    """AdamW; bitsandbytes' 8-bit AdamW where it is installed and the GPU is CUDA."""
    if use_8bit and device.type == "cuda":
        try:
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(parameters, lr=learning_rate)
        except ImportError:
            logger.warning("use_8bit_adam is set but bitsandbytes is not installed; using torch's AdamW")
    # The fused kernel does the whole update in one pass; per-tensor AdamW was ~40% of a small-model
    # step on CPU (bench/train.py).
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=learning_rate, fused=fused)


def run_stage(
    context: RunContext, stage: Stage, *, start_step: int, resume_from: checkpointing.Checkpoint | None
) -> bool:
    """Train `stage` from `start_step` to its end (or until `context.steps_left` runs out).

    Returns whether the stage reached its last step; the trained models are frozen afterwards.
    """
    accelerator, config = context.accelerator, context.config
    lora = config.lora_rank > 0
    models = [context.components.model(role) for role in stage.roles]
    for role, model in zip(stage.roles, models, strict=True):
        if lora and not has_lora(model):
            _add_role_lora(context, role)
        make_trainable(model, lora=lora)
        context.trained_roles[role] = "lora" if lora else "full"
    parameters = trainable_parameters(models)
    optimizer = make_optimizer(
        parameters, stage.learning_rate, use_8bit=config.use_8bit_adam, device=accelerator.device
    )
    # accelerate steps a prepared scheduler once per process, so the schedule counts in those units.
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=stage.steps * accelerator.num_processes,
    )
    *wrapped, optimizer, lr_scheduler = accelerator.prepare(*models, optimizer, lr_scheduler)
    hooks = [
        accelerator.register_save_state_pre_hook(
            lambda _models, weights, folder: _save_roles(context, weights, folder)
        ),
        accelerator.register_load_state_pre_hook(
            lambda loaded, folder: _load_roles(context, stage, loaded, folder)
        ),
    ]
    try:
        if resume_from is not None and resume_from.stage == stage.name:
            accelerator.load_state(str(resume_from.path))
            if resume_from.state().get("config", {}).get(f"{stage.name}_steps", stage.steps) != stage.steps:
                continue_schedule(lr_scheduler)  # trained more: the rate of the schedule over the new total
        elif start_step > 0:
            continue_schedule(lr_scheduler, start_step * accelerator.num_processes)  # from exported weights
        if stage.name == "unet":
            for images in (context.instance, context.prior):
                if images is not None:
                    images.cache_embeddings(
                        context.components, max_sequence_length=config.flux_max_sequence_length
                    )
            offload_text_encoders(context.components)
        return _loop(context, stage, start_step, wrapped, parameters, optimizer, lr_scheduler)
    finally:
        for handle in hooks:
            handle.remove()
        accelerator.free_memory()
        for model in models:
            freeze(model, context.weight_dtype)


def continue_schedule(lr_scheduler, last_epoch: int | None = None) -> None:
    """Set the learning rate to what the stage's schedule gives at its current step (or at `last_epoch`,
    in the scheduler's units), for a stage that continues to another step count than its checkpoint's.

    A checkpoint restores the scheduler's step and the optimizer's last rate, which came from the
    schedule over the old step count; the schedule's function is the new one's (`get_scheduler` builds
    it from the stage's steps), so the rate is taken from it again.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    if last_epoch is not None:
        scheduler.last_epoch = last_epoch
    rates = [
        base * schedule(scheduler.last_epoch)
        for base, schedule in zip(scheduler.base_lrs, lambdas, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


def offload_text_encoders(components: Components) -> None:
    """On a GPU, move the frozen text encoders of a family that offloads them (FLUX.1's T5-XXL is 9.5 GB)
    to the CPU once the captions are encoded, as the memory plan's options assume; samples bring them
    back while they render."""
    if not components.family_adapter.offloads_text_encoders or components.unet.device.type == "cpu":
        return
    for encoder in components.text_encoders:
        encoder.to("cpu")
    free_memory()


def stage_title(context: RunContext, stage: Stage) -> str:
    """The stage as messages name it: `text encoder`, or the denoiser (`UNet`, `transformer`)."""
    return (
        "text encoder" if stage.name == "text_encoder" else context.components.family_adapter.denoiser_title
    )


def _loop(context, stage, start_step, wrapped, parameters, optimizer, lr_scheduler) -> bool:
    accelerator, config = context.accelerator, context.config
    progress = tqdm(
        total=stage.steps,
        initial=start_step,
        desc=f"stage {stage.index} ({stage_title(context, stage)})",
        unit="step",
        disable=not (accelerator.is_main_process and context.progress_bars),
    )
    every = config.checkpoint_every
    with progress:
        for step in range(start_step + 1, stage.steps + 1):
            if context.steps_left is not None and context.steps_left <= 0:
                return False
            learning_rate = lr_scheduler.get_last_lr()[0]  # the rate this step uses
            loss = _optimizer_step(context, stage, step, wrapped, parameters, optimizer, lr_scheduler)
            if accelerator.is_main_process:
                context.on_step(stage, step, loss, learning_rate)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}")
            progress.update()
            if context.steps_left is not None:
                context.steps_left -= 1
            # A stop on request (max_steps_this_run) checkpoints where it stops, so a resume loses nothing.
            stopping = context.steps_left is not None and context.steps_left <= 0 and step < stage.steps
            if step == stage.steps or (every > 0 and step % every == 0) or stopping:
                save_checkpoint(context, stage, step)
            if stopping:
                return False
    return True


def _optimizer_step(context, stage, step, wrapped, parameters, optimizer, lr_scheduler) -> float:
    accelerator, config = context.accelerator, context.config
    accumulation = config.gradient_accumulation
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        with contextlib.ExitStack() as stack:
            if micro < accumulation - 1:  # only the last micro-batch all-reduces gradients
                for model in wrapped:
                    stack.enter_context(accelerator.no_sync(model))
            loss = _micro_batch_loss(context, stage, step, micro, wrapped)
            accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(total, reduction="mean"))


def _draw(context: RunContext, images: ImageSet, stage: Stage, first: int, generator, text_encoders):
    config, device = context.config, context.accelerator.device
    indices = draw_indices(
        images.latents,
        seed=context.seed,
        stream=images.stream,
        stage_index=stage.index,
        first_position=first,
        batch_size=config.batch_size,
        repeats=images.repeats,
    )
    if config.random_flip:
        flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist()
    else:
        flips = [False] * len(indices)
    latents = images.latents.sample(indices, flips, generator)
    prompts = prompt_rows(images, indices, generator)
    if images.embeddings is not None and stage.name == "unet":
        embeds, pooled = images.embeddings
        embeds, pooled = embeds[prompts], None if pooled is None else pooled[prompts]
    else:
        ids = [token_ids[prompts].to(device) for token_ids in images.token_ids]
        embeds, pooled = context.components.encode_prompts(
            text_encoders,
            ids,
            [images.captions[index] for index in prompts],
            max_sequence_length=config.flux_max_sequence_length,
            device=device,
        )
    weights = images.latents.pixel_weights(indices, flips, config.mask_background)
    return latents, embeds, pooled, images.latents.time_ids(indices), weights


def prompt_rows(images: ImageSet, indices: list[int], generator: torch.Generator) -> list[int]:
    """The caption row each drawn image trains with: its own, or the empty prompt's for the share
    `caption_dropout` (drawn from the step's generator only when dropout is on, so runs without it
    draw exactly what they did before)."""
    if not images.caption_dropout:
        return list(indices)
    dropped = (torch.rand(len(indices), generator=generator) < images.caption_dropout).tolist()
    return [images.count if drop else index for index, drop in zip(indices, dropped, strict=True)]


def _micro_batch_loss(context: RunContext, stage: Stage, step: int, micro: int, wrapped) -> torch.Tensor:
    accelerator, config, components = context.accelerator, context.config, context.components
    step_seed = derive_seed(context.seed, STREAM_STEP, stage.index, step, micro, accelerator.process_index)
    torch.manual_seed(step_seed)  # dropout, or anything else that reads the global RNG
    generator = torch.Generator().manual_seed(step_seed)
    draws_before = ((step - 1) * config.gradient_accumulation + micro) * accelerator.num_processes
    first = (draws_before + accelerator.process_index) * config.batch_size
    text_encoders = wrapped if stage.name == "text_encoder" else components.text_encoders
    unet = wrapped[0] if stage.name == "unet" else components.unet
    with accelerator.autocast():
        parts = [_draw(context, context.instance, stage, first, generator, text_encoders)]
        if context.prior is not None:
            parts.append(_draw(context, context.prior, stage, first, generator, text_encoders))
        # In buckets a photo's shape differs from the square class images': then a pass for each.
        together = len({part[0].shape for part in parts}) == 1
        batches = [_concatenate(parts)] if together else parts
        passes = [_denoise(context, unet, drawn, generator) for drawn in batches]
    losses = [
        dreambooth_loss(
            prediction,
            noisy.target,
            weights=noisy.weights,
            num_class=config.batch_size if together and context.prior is not None else 0,
            prior_loss_weight=config.prior.loss_weight,
            pixel_weights=drawn[4],
        )[0]
        for (prediction, noisy), drawn in zip(passes, batches, strict=True)
    ]
    # Apart, the second pass's loss is the prior loss.
    return losses[0] if together else losses[0] + config.prior.loss_weight * losses[1]


def _concatenate(parts: list[tuple]) -> tuple:
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))


def _denoise(context: RunContext, unet, part: tuple, generator: torch.Generator):
    """The denoiser's prediction for one drawn batch, and the noised batch it predicted from."""
    config, components = context.config, context.components
    latents, embeds, pooled, time_ids, _ = part
    noise = sample_noise(latents, generator, config.offset_noise)
    family = components.family_adapter
    batch = family.noisy_latents(components.noise_scheduler, latents, noise, generator, config)
    return family.denoise(components.pipeline, unet, batch, embeds, pooled, time_ids, config), batch


def _save_roles(context: RunContext, weights: list, folder: str) -> None:
    # Only what training changed goes in, as a LoRA or full state dict per component.
    weights.clear()
    if context.accelerator.is_main_process:
        for role in context.trained_roles:
            checkpointing.save_weights(Path(folder), role, trained_state_dict(context.components.model(role)))


def _load_roles(context: RunContext, stage: Stage, loaded: list, folder: str) -> None:
    loaded.clear()  # accelerate would look for its own model.safetensors otherwise
    for role in stage.roles:
        state = checkpointing.load_weights(Path(folder), role)
        load_trained_state_dict(context.components.model(role), state, where=folder)


def save_checkpoint(context: RunContext, stage: Stage, step: int) -> Path:
    """Save the run's state locally, then move it into the session (main process) and report it."""
    accelerator = context.accelerator
    local = context.scratch / "checkpoints" / checkpointing.checkpoint_name(stage.name, step)
    if accelerator.is_main_process and local.exists():
        shutil.rmtree(local)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(local))
    accelerator.wait_for_everyone()
    published = context.checkpoints_dir / local.name
    if accelerator.is_main_process:
        state = {
            **context.base_state,
            "stage": stage.name,
            "step": step,
            "roles": dict(context.trained_roles),
            "num_processes": accelerator.num_processes,
        }
        checkpointing.finish_local(local, state)
        published = checkpointing.publish(local, context.checkpoints_dir)
        shutil.rmtree(local, ignore_errors=True)
        context.on_checkpoint(stage, step, published)
    accelerator.wait_for_everyone()
    return published
