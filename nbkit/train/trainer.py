"""`train()`: one two-stage DreamBooth run on a session, from checks to exported model.

The main process holds the session's lock, owns `session.json` and writes everything into the
session; other processes (under `accelerate launch --num_processes N`) train their share of each
batch and wait at the barriers. Nothing is written into the session until the base model has loaded
(`nbkit.train.plan`); from then on `state` in `session.json` follows the checkpoints, always naming a
complete one, and the exported model is recorded in its `models` list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from nbkit import gpu
from nbkit.errors import DiskFullError, NbkitError, NbkitWarning, setting
from nbkit.fsio import disk_full_error, free_bytes, is_disk_full, make_room_fix
from nbkit.session.concepts import concept_settings, concepts, counting_class_images, repeats_per_image
from nbkit.session.core import Session
from nbkit.session.manifest import TrainingState
from nbkit.session.settings import TrainConfig
from nbkit.train import checkpointing
from nbkit.train.components import enable_memory_savers, load_components, tokenize
from nbkit.train.data import STREAM_CLASS_ORDER, STREAM_INSTANCE_ORDER, LatentCache, copy_to_scratch
from nbkit.train.export import export_session_model
from nbkit.train.inputs import check_memory, resolve_precision
from nbkit.train.plan import RunPlan, describe_skipped, plan_run, start_run
from nbkit.train.scratch import clean_stale_scratch, session_scratch
from nbkit.train.stages import ImageSet, RunContext, Stage, load_frozen_roles, run_stage


@dataclasses.dataclass
class TrainResult:
    """What a `train()` call did.

    Args:
        session: the session folder.
        finished: True when both stages ran to the end and the model was exported.
        stage: the stage reached (`text_encoder`, `unet` or `done`).
        step: optimizer steps done in that stage.
        seed: the run's seed.
        last_checkpoint: the newest checkpoint folder, if any.
        model_dir: the exported diffusers folder (full fine-tune).
        single_file: the exported single-file `.safetensors` (full fine-tune).
        lora_files: the exported LoRA files, `diffusers` and `kohya` (LoRA runs).
        samples: the sample grids rendered during this call.
        loss_plot: the loss curve PNG, if one was drawn.
        losses: (stage, step, loss) of every step this call took.
        config: the effective training settings.
        denoiser: how messages name stage 2's denoiser (`UNet`, `transformer`).
    """

    session: Path
    finished: bool
    stage: str
    step: int
    seed: int
    last_checkpoint: Path | None = None
    model_dir: Path | None = None
    single_file: Path | None = None
    lora_files: dict[str, Path] = dataclasses.field(default_factory=dict)
    samples: list[Path] = dataclasses.field(default_factory=list)
    loss_plot: Path | None = None
    losses: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)
    config: TrainConfig | None = None
    denoiser: str = "UNet"


def train(
    session: Session | str,
    config_overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    root: str | Path | None = None,
    max_steps_this_run: int | None = None,
    force_resolution: bool = False,
    on_progress: Callable[[TrainResult], None] | None = None,
    more: bool = False,
) -> TrainResult:
    """Train the session's model: stage 1 (text encoder), stage 2 (UNet), then export.

    Args:
        session: an open `Session` or a session name.
        config_overrides: `TrainConfig` fields to change (saved into `session.json` once the run starts),
            plus `model` to switch the base model (registry key, hub id or folder).
        resume: continue from the session's last good checkpoint (a fresh start if there is none).
        restart: start over: delete an unfinished run's checkpoints, or train a finished session again
            (its exported model is replaced).
        root: the storage root, when `session` is a name (default: `nbkit.env.storage_root()`).
        max_steps_this_run: stop after this many optimizer steps, with a checkpoint at that step, as a
            planned disconnect (for splitting a run over several sittings); `resume=True` continues.
        force_resolution: accept a resolution outside the model's sensible range.
        on_progress: called with the `TrainResult` so far after every step and every checkpoint (its
            newest sample grid and loss plot written), on the main process; for a live display, which
            replaces the stages' progress bars.
        more: train a finished session further: give the last stage's new, larger total in
            `config_overrides` (e.g. `{"unet_steps": 2000}`); it continues from the last checkpoint (or,
            when that is gone, from the exported model with a fresh optimizer) and exports again,
            replacing the model.

    Raises:
        NbkitError: before any work when the session is locked by another kernel, has no (captioned)
            instance images, its resolution does not suit the model, a setting is invalid, or an earlier
            run needs --resume/--restart; during training when memory runs out, naming the settings to lower.
        DiskFullError: when a disk fills up (the session keeps its last complete checkpoint), or, at a
            checkpoint, when the next one would not fit: training pauses there, and `resume=True`
            continues once there is room.
    """
    if max_steps_this_run is not None and max_steps_this_run < 1:
        raise NbkitError(
            f"max_steps_this_run is {max_steps_this_run}", fix="use 1 or more, or leave it unset"
        )
    session = session if isinstance(session, Session) else Session.open(session, root=root)
    options = {"resume": resume, "restart": restart, "force_resolution": force_resolution, "more": more}
    plan_run(session, config_overrides, **options)  # every input error, before the GPU is touched

    # The first PartialState fixes the backend for the process: it must see ACCELERATE_USE_CPU, which
    # is how several CPU processes under `accelerate launch` get gloo instead of running alone.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    paused: list[DiskFullError] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(gpu.lease(gpu.TRAINING, wait=False))  # the web UI says "training in progress"
        plan_data: dict[str, Any] = {}
        if state.is_main_process:
            stack.enter_context(session.lock("training"))
            plan_data = plan_run(session, config_overrides, **options).to_dict()  # again, lock held
        plan = RunPlan.from_dict(broadcast_object_list([plan_data])[0])
        for line in describe_skipped(plan) if state.is_main_process else ():
            warnings.warn(line, NbkitWarning, stacklevel=2)
        for note in plan.notes if state.is_main_process else ():
            print(note, flush=True)  # what the GPU memory plan chose (a LoRA for SDXL on a T4, say)
        if plan.config.deterministic:
            stack.enter_context(deterministic_mode(state.device))
        mixed_precision, weight_dtype = resolve_precision(plan.config.mixed_precision, state.device)
        accelerator = Accelerator(mixed_precision=mixed_precision)
        try:
            result = _execute(
                session, accelerator, plan, weight_dtype, max_steps_this_run, stack, paused, on_progress
            )
        except Exception as error:
            from nbkit.train.oom import explain_oom, is_oom

            if is_oom(error):
                counted = counting_class_images(session.manifest, plan.config)
                raise explain_oom(counted, error, family=plan.base_model.family) from error
            full = _disk_full(session, error, is_main=state.is_main_process)
            if full is not None:
                raise full from error
            raise
    if paused:
        raise paused[0]  # after the lock and the run record are closed: the pause is a clean stop
    return result


def _resume_hint(session: Session) -> str:
    state = session.manifest.state
    if state.last_checkpoint:
        return (
            f"continue training with {setting('resume')}; the session keeps checkpoint "
            f"{Path(state.last_checkpoint).name} ({state.stage} step {state.step})"
        )
    return "train again; no checkpoint had been saved yet"


def _disk_full(session: Session, error: Exception, *, is_main: bool) -> DiskFullError | None:
    """The `DiskFullError` for a write during training that did not fit (None for other errors).

    The partly staged checkpoint in scratch is removed, so the disk is not left fuller than before."""
    scratch = session_scratch(session, create=False)
    if isinstance(error, DiskFullError):
        full = error
    elif isinstance(error, NbkitError) or not any(
        is_disk_full(error, place) for place in (scratch, session.path / "checkpoints")
    ):
        return None
    else:
        named = getattr(error, "filename2", None) or getattr(error, "filename", None)
        if named is None:  # torch and safetensors name no file: the fuller of the two disks
            named = min((scratch, session.path / "checkpoints"), key=lambda place: free_bytes(place) or 0)
        full = disk_full_error(named, error=error, what=f"training {session.name}")
    if is_main:
        shutil.rmtree(scratch / "checkpoints", ignore_errors=True)
    full.fix = make_room_fix(full.path, _resume_hint(session))
    return full


@contextlib.contextmanager
def deterministic_mode(device: torch.device) -> Iterator[None]:
    """Bit-exact kernels for a run: one CPU thread (reductions split over threads sum in another order)
    and, on a GPU, deterministic algorithms with the cuBLAS workspace they need."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def _begin(session: Session, plan: RunPlan, stack: contextlib.ExitStack):
    """The run really starts: re-crop for a new size or bucket setting, apply the plan, open the history record."""
    if plan.recrop:
        from nbkit.images.manage import recrop_for_training

        print(
            f"nbkit: {len(plan.recrop)} instance image(s) are not cropped for {plan.sizing.describe()}: "
            "cropping them again from the kept originals"
        )
        recrop_for_training(session, plan.recrop, plan.sizing)
    start_run(session, plan)
    detail: dict[str, Any] = {
        "resume_from": None if plan.resume_from is None else plan.resume_from.path.name,
        "restart": plan.clear_checkpoints,
        "seed": plan.config.seed,
    }
    if plan.skipped:
        detail["skipped_checkpoints"] = describe_skipped(plan)
    return stack.enter_context(session.run_record("train", detail))


def _image_sets(session: Session, accelerator: Accelerator, components, plan: RunPlan, scratch: Path):
    device, config, sizing = accelerator.device, plan.config, plan.sizing
    records = session.manifest.images
    masked = [record for record in records if record.mask] if config.mask_background is not None else []
    with accelerator.main_process_first():  # the main process copies; the others find the copies
        paths = copy_to_scratch([session.path / record.file for record in records], scratch / "instance")
        mask_copies = copy_to_scratch([session.path / record.mask for record in masked], scratch / "masks")
    by_file = {record.file: copy for record, copy in zip(masked, mask_copies, strict=True)}
    masks = [by_file.get(record.file) for record in records]
    captions = [record.caption for record in records]
    normalize = components.family_adapter.latent_normalizer(components.vae)
    latents = LatentCache(
        components.vae,
        paths,
        sizing,
        flip=config.random_flip,
        device=device,
        normalize=normalize,
        masks=masks,
    )
    # Caption dropout trains some draws on the empty prompt: it is one more caption, encoded (and
    # cached for stage 2) with the others.
    prompts = [*captions, ""] if config.caption_dropout else captions
    instance = ImageSet(
        latents,
        prompts,
        STREAM_INSTANCE_ORDER,
        tokenize(components, prompts),
        config.caption_dropout,
        repeats=repeats_per_image(session.manifest),
    )
    # The run's prior settings (not the session's: other processes never saw them saved); concepts
    # without photos train nothing, their class images included.
    views = concepts(session.manifest, config.prior)
    wanted = [view for view in views if view.images and view.class_images and view.class_prompt]
    if not wanted:
        return instance, None
    from nbkit.train.class_images import class_image_path, ensure_class_images

    class_paths, class_captions = [], []
    for view in wanted:  # each concept's class images in its own folder, drawn as one set
        class_dir = session.dir("class_images") / view.name  # the first's: the folder itself
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_class_images(
                    components.pipeline,
                    view.class_prompt,
                    view.class_images,
                    class_dir,
                    seed=0,  # fixed, so the set is reused whatever the training seed
                    steps=config.prior.generation_steps,
                    resolution=config.resolution,
                    model=session.manifest.base_model.source,
                )
            sources = [class_image_path(class_dir, index) for index in range(view.class_images)]
            folder = scratch / ("class" if not view.name else f"class-{view.name}")
            class_paths += copy_to_scratch(sources, folder)
        class_captions += [view.class_prompt] * view.class_images
    class_latents = LatentCache(
        components.vae,
        class_paths,
        sizing,
        flip=config.random_flip,
        device=device,
        normalize=normalize,
    )
    return instance, ImageSet(
        class_latents, class_captions, STREAM_CLASS_ORDER, tokenize(components, class_captions)
    )


def _execute(
    session, accelerator, plan: RunPlan, weight_dtype, max_steps, stack, paused, on_progress=None
) -> TrainResult:
    main, device = accelerator.is_main_process, accelerator.device
    base_model, config, resume_from = plan.base_model, plan.config, plan.resume_from
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scratch = session_scratch(session, create=main)
    if main:
        shutil.rmtree(scratch / "checkpoints", ignore_errors=True)  # staging of a killed run
        clean_stale_scratch(current=session)
    accelerator.wait_for_everyone()
    # FLUX.1 on a smaller GPU: the transformer in 8/4 bits
    quantization = check_memory(base_model, counting_class_images(session.manifest, config))
    components = load_components(
        base_model.source,
        base_model.family,
        base_model.prediction_type,
        weight_dtype,
        quantization=quantization,
    )
    components.pipeline.to(device)
    enable_memory_savers(components, gradient_checkpointing=config.gradient_checkpointing, device=device)
    record = _begin(session, plan, stack) if main else None
    if record is not None and quantization is not None:
        record.detail["quantized_base"] = quantization
    accelerator.wait_for_everyone()  # the other processes read the re-cropped images
    instance, prior = _image_sets(session, accelerator, components, plan, scratch)

    result = TrainResult(
        session=session.path,
        finished=False,
        stage="idle",
        step=0,
        seed=config.seed,
        config=config,
        denoiser=components.family_adapter.denoiser_title,
    )
    reporter = (
        _Reporter(session, components, config, result, accelerator, scratch, on_progress) if main else None
    )
    context = RunContext(
        accelerator=accelerator,
        components=components,
        config=config,
        seed=config.seed,
        weight_dtype=weight_dtype,
        instance=instance,
        prior=prior,
        scratch=scratch,
        checkpoints_dir=session.path / "checkpoints",
        trained_roles={},
        on_checkpoint=reporter.on_checkpoint if reporter else _ignore,
        on_step=reporter.on_step if reporter else _ignore,
        steps_left=max_steps,
        progress_bars=on_progress is None,
        base_state={
            "config": config.to_dict(),
            "base_model": base_model.to_dict(),
            "quantized_base": quantization,
            "concepts": concept_settings(session.manifest),
        },
    )
    stages = [
        Stage(
            "text_encoder",
            1,
            config.text_encoder_steps,
            config.text_encoder_lr,
            tuple(components.text_encoder_roles),
        ),
        # FLUX.1's denoiser is its transformer; the stage keeps the name `unet` (checkpoint folders).
        Stage("unet", 2, config.unet_steps, config.unet_lr, (components.denoiser_role,)),
    ]
    stages = [stage for stage in stages if stage.steps > 0]
    if reporter is not None:
        reporter.context, reporter.stages, reporter.weight_dtype = context, stages, weight_dtype
    try:
        finished = _run_stages(context, stages, resume_from, result, plan.from_model, session)
        if reporter is not None and reporter.paused is not None:
            paused.append(reporter.paused)
            finished = False  # paused after the last checkpoint: the export waits for room too
        if finished and main:
            reporter.export(context.trained_roles, weight_dtype)
    finally:
        if reporter is not None:
            reporter.close()
    accelerator.wait_for_everyone()
    result.finished = finished
    if record is not None:
        record.detail.update(stage=result.stage, step=result.step, finished=finished)
        if not finished:
            record.status = "interrupted"  # stopped by max_steps_this_run or a full disk; resume continues it
        if paused:
            record.detail["paused"] = paused[0].message
    return result


def _run_stages(
    context: RunContext, stages: list[Stage], resume_from, result: TrainResult, from_model=None, session=None
) -> bool:
    start = {stage.name: 0 for stage in stages}
    pending = list(stages)
    if from_model is not None:  # training more without the last checkpoint: from the exported model
        from nbkit.train.more import load_exported_roles

        load_exported_roles(context, session.path, from_model["name"], session.manifest.models)
        pending = [stage for stage in stages if stage.name == from_model["stage"]]
        start[from_model["stage"]] = from_model["step"]
        result.stage, result.step = from_model["stage"], from_model["step"]
    if resume_from is not None:
        order = checkpointing.STAGES.index(resume_from.stage)
        # Stages before the checkpoint's are done; its own is done if it reached its last step.
        pending = [
            stage
            for stage in stages
            if checkpointing.STAGES.index(stage.name) > order
            or (stage.name == resume_from.stage and resume_from.step < stage.steps)
        ]
        resumed = [stage for stage in pending if stage.name == resume_from.stage]
        load_frozen_roles(context, resume_from, skip=resumed[0].roles if resumed else ())
        start[resume_from.stage] = resume_from.step
        result.stage, result.step = resume_from.stage, resume_from.step
        result.last_checkpoint = resume_from.path
    for stage in pending:
        if context.steps_left is not None and context.steps_left <= 0:
            return False  # stopped at the end of the stage before (max_steps_this_run, a pause)
        from_checkpoint = resume_from if resume_from is not None and resume_from.stage == stage.name else None
        if not run_stage(context, stage, start_step=start[stage.name], resume_from=from_checkpoint):
            return False
    return True


def _ignore(*_args) -> None:
    return None


def _device(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_dev
        except OSError:
            continue
    return None


class _Reporter:
    """Main-process bookkeeping: the manifest's state, pruning, samples, the loss log and export."""

    def __init__(
        self,
        session: Session,
        components,
        config: TrainConfig,
        result: TrainResult,
        accelerator,
        scratch: Path,
        on_progress: Callable[[TrainResult], None] | None = None,
    ):
        from nbkit.train.progress_log import TrainingLog

        self.session, self.components, self.config = session, components, config
        self.result, self.accelerator, self.scratch = result, accelerator, scratch
        self.log = TrainingLog(session.dir("logs"))
        self.context: RunContext | None = None
        self.stages: list[Stage] = []
        self.paused: DiskFullError | None = None
        self.weight_dtype = torch.float32
        self.on_progress = on_progress or _ignore

    def on_step(self, stage: Stage, step: int, loss: float, learning_rate: float) -> None:
        offset = self.config.text_encoder_steps if stage.name == "unet" else 0
        self.log.log(offset + step, stage.name, loss, learning_rate)
        self.result.losses.append((stage.name, step, loss))
        self.result.stage, self.result.step = stage.name, step
        self.on_progress(self.result)

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        manifest = self.session.manifest
        relative = path.relative_to(self.session.path).as_posix()
        manifest.state = TrainingState(stage=stage.name, step=step, last_checkpoint=relative)
        self.session.save()  # only now, with the checkpoint complete in the session
        checkpointing.prune(self.session.path / "checkpoints", self.config.keep_checkpoints)
        self.result.last_checkpoint = path
        if self.config.sample_prompts:
            self.result.samples.append(self._render_samples(path.name))
            if self.config.score:
                # Imported here: nbkit.train must not need the vision extra unless --score is on.
                from nbkit.vision.scoring import score_after_checkpoint

                score_after_checkpoint(self.session, device=str(self.accelerator.device))
        self.log.flush()
        self.result.loss_plot = self.log.plot(self.session.dir("logs") / "loss.png")
        self.on_progress(self.result)
        self._pause_if_full(stage, step, path)

    def _pause_if_full(self, stage: Stage, step: int, path: Path) -> None:
        """Stop here, with this checkpoint saved, when what comes next would not fit on a disk: the
        next checkpoint (staged in scratch, then copied into the session), or the exported model."""
        last = stage is self.stages[-1] and step == stage.steps
        size = sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
        needs = {
            path.parent: self._export_bytes(size) if last else self._next_checkpoint_bytes(stage, step, size)
        }
        if not last:
            needs[self.scratch] = needs[path.parent]
        if len({_device(place) for place in needs}) == 1 and len(needs) == 2:
            needs = {path.parent: 2 * needs[path.parent]}  # one disk holds the staging and the copy
        for place, needed in needs.items():
            free = free_bytes(place)
            if free is None or free >= needed:
                continue
            coming = "the export of the model" if last else "the next checkpoint"
            pause = disk_full_error(
                place,
                needed=needed,
                free=free,
                what=coming,
                then=_resume_hint(self.session),
            )
            pause.message = (
                f"training paused at {stage.name} step {step} of {stage.steps}, with checkpoint {path.name} "
                f"saved: {pause.message}"
            )
            if self.accelerator.num_processes > 1:
                raise pause  # the launcher stops the other processes; the checkpoint is complete
            self.paused = pause
            self.context.steps_left = 0  # the loop stops before its next step
            return

    def _next_checkpoint_bytes(self, stage: Stage, step: int, size: int) -> int:
        """The previous checkpoint's size; at the end of a full fine-tune's first stage, plus the
        denoiser's weights and AdamW's two fp32 moments, which the second stage's checkpoints add."""
        if step == stage.steps and self.config.lora_rank == 0:
            parameters = sum(parameter.numel() for parameter in self.components.unet.parameters())
            size += parameters * 12  # fp32 weights, as they train, and two fp32 moments
        return size + (16 << 20)  # samples, logs, session.json

    def _export_bytes(self, size: int) -> int:
        """What the export writes: a full model twice (a diffusers folder in the run's weight dtype and an
        fp16 single file), or the LoRA."""
        if self.config.lora_rank > 0:
            return size + (16 << 20)
        models = [self.components.unet, self.components.vae, *self.components.text_encoders]
        weights = sum(parameter.numel() for model in models for parameter in model.parameters())
        return weights * (self.weight_dtype.itemsize + 2) + (16 << 20)

    def _render_samples(self, name: str) -> Path:
        from nbkit.train.samples import render_samples

        models = [self.components.unet, *self.components.text_encoders]
        modes = [model.training for model in models]
        for model in models:
            model.eval()
        # FLUX.1's text encoders wait on the CPU after caching (stages.offload_text_encoders).
        devices = [encoder.device for encoder in self.components.text_encoders]
        for encoder in self.components.text_encoders:
            encoder.to(self.components.unet.device)
        try:
            with self.accelerator.autocast():
                return render_samples(
                    self.components.pipeline,
                    self.config.sample_prompts,
                    seed=self.config.sample_seed,
                    steps=self.config.sample_steps,
                    resolution=self.config.resolution,
                    out_path=self.session.dir("outputs") / "samples" / f"{name}.png",
                    model_name=self.session.name,
                )
        finally:
            for model, mode in zip(models, modes, strict=True):
                model.train(mode)
            for encoder, device in zip(self.components.text_encoders, devices, strict=True):
                encoder.to(device)

    def export(self, trained_roles: dict[str, str], weight_dtype: torch.dtype) -> None:
        session, config, result = self.session, self.config, self.result
        manifest = session.manifest
        last_stage = "unet" if config.unet_steps > 0 else "text_encoder"
        _, files = export_session_model(
            session,
            self.components,
            trained_roles,
            name=session.name,
            config=config.to_dict(),
            base_model=manifest.base_model.to_dict(),
            steps={"text_encoder": config.text_encoder_steps, "unet": config.unet_steps},
            stage=last_stage,
            step=config.unet_steps if last_stage == "unet" else config.text_encoder_steps,
            dtype=weight_dtype,
        )
        if config.lora_rank > 0:
            result.lora_files = files
        else:
            result.model_dir, result.single_file = files["folder"], files["single_file"]
        manifest.state = dataclasses.replace(manifest.state, stage="done")
        session.save()
        result.stage = "done"

    def close(self) -> None:
        self.log.close()
