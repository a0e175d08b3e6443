"""Text-to-image generation: the one loop behind sample grids, class images and the web UI.

`generate` runs a diffusers pipeline as it is, batch by batch, each image with its own CPU
`torch.Generator`, so image `i` depends on its own seed only (not on the batch it was drawn in, nor on
the device). Seeds follow A1111: one seed `s` gives `s, s+1, ...`; `-1` draws a random one and the
result reports the seeds used. A sampler name swaps in the matching diffusers scheduler
(`nbkit.generation.samplers`) for the call only; the caller's pipeline keeps its own. Each image comes back with
its A1111 infotext. Sampler and schedule names never fail: an unknown one falls back as A1111's does, and
one diffusers cannot run is substituted; each such note is written into the infotext
(`Sampler substitution: ...`) and listed in `GenerationResult.warnings`.

`GenerationSettings` holds one request. The web UI runs img2img, inpainting and ControlNet through the
same loop (a pipeline sharing the model's components, its extra inputs in `GenerationSettings.inputs`),
adds A1111's hires fix (`nbkit.generation.hires.HiresFix`: upscale the first pass, in latent space or as
pixels, then an img2img pass at the new size), reports progress through `on_step` and stops through `interrupt`
(the whole request) and `skip` (the current batch).

What differs between model families the loop asks the model's family (`nbkit.families`; told from the
pipeline when the request names none): its guidance arguments (`Family.call_arguments`: FLUX.1 takes
Forge's "Distilled CFG Scale", and true CFG only above CFG 1 with a negative prompt; Z-Image's scale is
A1111's minus 1), how a negative prompt reaches the pipeline (`Family.negative_arguments`: FLUX.2 [klein]
takes it encoded), the CFG the infotext names, what image sides must be multiples of, its samplers
(flow-matching ones for FLUX.1, Z-Image and FLUX.2), the hires fix's img2img pipeline
(`Family.image_pipeline_class`), whether the hires fix may upscale latents (the flow families pack them),
the largest picture its img2img redraws at its size, and how a step's latents become a preview.

Models a session exported are loaded by `nbkit.generation.session_models`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nbkit
from nbkit.generation.hires import (
    LATENT_UPSCALERS,
    SIZE_MULTIPLE,
    HiresFix,
    decode_latents,
    is_int,
    is_number,
    second_pass,
)
from nbkit.generation.infotext import format_infotext
from nbkit.generation.placement import (
    accepts,
    as_family,
    pipeline_family,
)
from nbkit.generation.samplers import SamplerChoice, choose, sampler_name, schedule_label

if TYPE_CHECKING:
    from PIL import Image


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
RANDOM_SEED_RANGE = 4294967294  # A1111 draws random seeds below this
# Not a PEP 440 version on purpose: A1111 turns on back-compat switches for infotexts whose Version
# parses as older than its own (e.g. "Old prompt editing timelines" below 1.6).
VERSION = f"nbkit {nbkit.__version__}"


@dataclasses.dataclass
class GenerationSettings:
    """One text-to-image request.

    Args:
        prompts: one prompt per image.
        negative_prompt: one for all images, or one per image.
        seeds: one seed for image 0 (image `i` gets `seed + i`; -1: random), or one per image (-1
            entries random).
        steps: sampling steps.
        width: image width in pixels, a multiple of 8.
        height: image height in pixels, a multiple of 8.
        guidance_scale: classifier-free guidance (A1111's "CFG scale"); None: the pipeline's default.
        sampler: an A1111 sampler name ("Euler a", "DPM++ 2M Karras"); None: the pipeline's own scheduler.
            An unknown name falls back to A1111's first sampler (`nbkit.generation.samplers.choose`).
        schedule: an A1111 schedule type ("Automatic", "Karras", ...); with `sampler` only. An unknown
            one falls back to Automatic.
        batch_size: images per pipeline call.
        model_name: the infotext's `Model`.
        model_hash: the infotext's `Model hash` (A1111's 10-hex short hash).
        extra_parameters: more infotext pairs, written after `Model` (e.g. "Lora hashes").
        infotext_prompts: the prompts the infotexts name, when they differ from `prompts` (A1111
            writes the prompt as typed, `<lora:...>` tags and all, while the model sees it without).
        infotext_negative_prompt: the negative prompt the infotexts name, when it differs from the one
            the model sees (an embedding's name the model sees as its token).
        inputs: more arguments for every pipeline call (img2img's `image` and `strength`, a mask, a
            control image); a PIL image is given once per image of the batch.
        hires: A1111's hires fix (text-to-image only), or None.
        distilled_guidance: FLUX.1-dev's distilled guidance (Forge's "Distilled CFG Scale"); None:
            3.5. Other families ignore it.
        family: the model's family (a key of `nbkit.families.FAMILIES`); None: told from the pipeline
            by `generate_images` (and the default family's rules in `check_inputs`).
        clip_skip: A1111's "Clip skip": 1 reads the text encoder's last layer, 2 the one before, ...
            (diffusers' `clip_skip` is one less); a pipeline without the option ignores it with a warning.
    """

    prompts: list[str]
    negative_prompt: str | list[str] = ""
    seeds: int | list[int] = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    guidance_scale: float | None = 7.0
    sampler: str | None = "Euler a"
    schedule: str | None = "Automatic"
    batch_size: int = 1
    model_name: str | None = None
    model_hash: str | None = None
    extra_parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    infotext_prompts: list[str] | None = None
    infotext_negative_prompt: str | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    hires: HiresFix | None = None
    distilled_guidance: float | None = None
    family: str | None = None
    clip_skip: int = 1

    def negative_prompts(self) -> list[str]:
        """The negative prompt of each image."""
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt)


@dataclasses.dataclass
class StepProgress:
    """What `on_step` is told after each denoising step.

    Args:
        batch: the batch being drawn (0-based).
        batches: how many batches the request has.
        images: the indices of the batch's images in the request.
        step: the steps done in this batch (1-based).
        steps: the batch's steps in all (second-order samplers take about twice `settings.steps`).
        latents: the current latents, for a preview.
        hires: True during the hires fix's second pass.
    """

    batch: int
    batches: int
    images: list[int]
    step: int
    steps: int
    latents: Any = None
    hires: bool = False


@dataclasses.dataclass
class GenerationResult:
    """What `generate` made.

    Args:
        images: the images, in request order (fewer than asked when interrupted).
        infotexts: each image's A1111 infotext.
        seeds: each image's seed (the random ones drawn for -1).
        settings: the request.
        interrupted: True when `interrupt` stopped it early.
        warnings: what was not done as asked: sampler and schedule fallbacks and substitutions
            (`Sampler substitution: ...`, also in every infotext), a clip skip the model takes none of.
    """

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    settings: GenerationSettings
    interrupted: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)


def check_inputs(settings: GenerationSettings) -> None:
    """Check a request before anything is generated; raises ValueError naming the bad value.

    Args:
        settings: the request.
    """
    family = as_family(settings.family)
    prompts = settings.prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    negative = settings.negative_prompt
    if not isinstance(negative, str):
        if not isinstance(negative, list) or not all(isinstance(n, str) for n in negative):
            raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative!r}")
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
    seeds = settings.seeds
    if isinstance(seeds, list):
        if len(seeds) != len(prompts):
            raise ValueError(
                f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed or one per prompt"
            )
        bad = [seed for seed in seeds if not is_int(seed) or not -1 <= seed <= MAX_SEED]
    else:
        bad = [] if is_int(seeds) and -1 <= seeds <= MAX_SEED - len(prompts) + 1 else [seeds]
    if bad:
        raise ValueError(f"seeds must be integers from 0 to {MAX_SEED} (or -1 for random), got {bad[0]!r}")
    if not is_int(settings.steps) or settings.steps < 1:
        raise ValueError(f"steps must be a positive integer, got {settings.steps!r}")
    step = family.image_size_multiple
    for name in ("width", "height"):
        value = getattr(settings, name)
        if not is_int(value) or value < step or value % step:
            what = f" for {family.title} models" if step != SIZE_MULTIPLE else ""
            raise ValueError(f"{name} must be a positive multiple of {step}{what}, got {value!r}")
    guidance = settings.guidance_scale
    if guidance is not None and (not is_number(guidance) or guidance < 0):
        raise ValueError(f"guidance_scale must be a number >= 0, got {guidance!r}")
    distilled = settings.distilled_guidance
    if distilled is not None and (not is_number(distilled) or distilled < 0):
        raise ValueError(f"distilled_guidance must be a number >= 0, got {distilled!r}")
    if not is_int(settings.batch_size) or settings.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {settings.batch_size!r}")
    if settings.sampler is not None:
        # Names fall back or are substituted (never an error); only a name that is not a string is.
        choose(settings.sampler, settings.schedule, family)
    if not isinstance(settings.extra_parameters, dict):
        raise ValueError(f"extra_parameters must be a dict, got {settings.extra_parameters!r}")
    shown = settings.infotext_prompts
    if shown is not None and (not isinstance(shown, list) or len(shown) != len(prompts)):
        raise ValueError(f"infotext_prompts must be a list of {len(prompts)} prompts, got {shown!r}")
    if not isinstance(settings.infotext_negative_prompt, str | None):
        raise ValueError(
            f"infotext_negative_prompt must be a string, got {settings.infotext_negative_prompt!r}"
        )
    if not isinstance(settings.inputs, dict):
        raise ValueError(f"inputs must be a dict, got {settings.inputs!r}")
    if settings.hires is not None:
        settings.hires.check(settings.steps, family)
    limit = family.image_input_max_pixels
    if limit is not None:
        # Its img2img pipeline would shrink a larger picture and return a smaller image than asked.
        sizes = {"the image": (settings.width, settings.height)} if "image" in settings.inputs else {}
        if settings.hires is not None:
            sizes["the hires fix's size"] = settings.hires.size(settings.width, settings.height, step)
        for what, (width, height) in sizes.items():
            if width * height > limit:
                side = math.isqrt(limit)
                raise ValueError(
                    f"{what} is {width}x{height}, more pixels than {family.title} models redraw a picture "
                    f"at ({side}x{side} at most); make it smaller"
                )


def resolve_seeds(seeds: int | list[int], count: int, rng: random.Random | None = None) -> list[int]:
    """Each image's seed, as A1111 assigns them.

    Args:
        seeds: one seed (image `i` gets `seed + i`; -1 draws one random seed first) or one per image
            (each -1 drawn separately).
        count: how many images.
        rng: where random seeds come from (default: the `random` module).
    """
    draw = (rng or random).randrange
    if isinstance(seeds, list):
        return [draw(RANDOM_SEED_RANGE) if seed == -1 else seed for seed in seeds]
    first = draw(RANDOM_SEED_RANGE) if seeds == -1 else seeds
    return [first + index for index in range(count)]


def _step_callback(
    on_step: Callable[[StepProgress], None] | None,
    stops: list[threading.Event],
    family: Any,
    batch: int,
    batches: int,
    images: list[int],
    hires: bool = False,
    size: tuple[int, int] | None = None,
) -> Callable | None:
    if on_step is None and not stops:
        return None

    def callback(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            total = getattr(pipeline, "num_timesteps", None) or index + 1
            latents = tensors.get("latents")
            if latents is not None and size is not None:
                latents = family.preview_latents(pipeline, latents, *size)
            on_step(StepProgress(batch, batches, images, index + 1, total, latents, hires))
        if any(event.is_set() for event in stops):
            pipeline._interrupt = True  # diffusers skips the remaining steps and decodes what it has
        return tensors

    return callback


def _per_image(inputs: dict[str, Any], count: int) -> dict[str, Any]:
    from PIL import Image

    return {
        key: [value] * count if isinstance(value, Image.Image) else value for key, value in inputs.items()
    }


def _parameters(
    settings: GenerationSettings,
    choice: SamplerChoice | None,
    scheduler: Any,
    guidance: Any,
    seed: int,
    distilled: Any = None,
    clip_skip: int | None = None,
) -> dict[str, Any]:
    if choice is not None:
        names = (choice.sampler.name, choice.schedule.label)
    else:
        names = (sampler_name(scheduler), schedule_label(scheduler))
    return {
        "Steps": settings.steps,
        "Sampler": names[0],
        "Schedule type": names[1],
        "CFG scale": guidance,
        "Distilled CFG Scale": distilled,  # Forge's key; FLUX.1-dev only
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": settings.model_hash,
        "Model": settings.model_name,
        **(settings.hires.parameters() if settings.hires is not None else {}),
        **settings.extra_parameters,
        "Clip skip": clip_skip,  # A1111 writes it only above 1
        **(choice.infotext_pairs() if choice is not None else {}),
        "Version": VERSION,
    }


def _clip_layers(pipeline: Any, skip: int) -> list[tuple[Any, Any]]:
    """(encoder, its layers) of each CLIP text encoder of the pipeline deeper than `skip` layers: those
    A1111's clip skip shortens (the text encoders the img2img, inpaint, ControlNet and hires pipelines
    share with it).

    Run without their last `skip` layers, they give the hidden state `skip` layers before the last
    through the final layer norm, which is A1111's clip skip. diffusers' own `clip_skip` argument reads
    `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
    """
    stacks = []
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipeline, name, None)
        encoder = getattr(getattr(model, "text_model", model), "encoder", None)
        layers = getattr(encoder, "layers", None)
        if layers is not None and len(layers) > skip:
            stacks.append((encoder, layers))
    return stacks


def generate_images(
    pipeline: Any,
    settings: GenerationSettings,
    *,
    on_step: Callable[[StepProgress], None] | None = None,
    interrupt: threading.Event | None = None,
    on_batch: Callable[[list[int], list[Image.Image], list[str]], None] | None = None,
    skip: threading.Event | None = None,
    hires_pipeline: Any = None,
) -> GenerationResult:
    """Run one request (see `generate` for the keyword form).

    Args:
        pipeline: a diffusers pipeline of any family, used as it is: text-to-image, or img2img,
            inpainting or ControlNet (`Family.image_pipeline_class`) with their inputs in
            `settings.inputs`.
        settings: the request.
        on_step: called after every denoising step with a `StepProgress`.
        interrupt: when set, the current batch ends after its current step (its images are
            decoded as they are, as A1111 does) and no further batch starts.
        on_batch: called with the image indices, images and infotexts of each finished batch (to
            save them as they come).
        skip: when set, the current batch ends after its current step (its images are kept, as
            A1111 does) and the next batch starts; it is cleared for the next batch.
        hires_pipeline: the img2img pipeline of the hires fix's second pass (default: the family's
            img2img pipeline (`Family.image_pipeline_class`) made with `from_pipe(pipeline)`, sharing
            its components).
    """
    import torch

    if settings.family is None:
        settings = dataclasses.replace(settings, family=pipeline_family(pipeline))
    check_inputs(settings)
    family = as_family(settings.family)
    count = len(settings.prompts)
    seeds = resolve_seeds(settings.seeds, count)
    negatives = settings.negative_prompts()
    shown_prompts = settings.infotext_prompts or settings.prompts
    shown_negatives = negatives
    if settings.infotext_negative_prompt is not None:
        shown_negatives = [settings.infotext_negative_prompt] * count
    hires = settings.hires
    if hires is not None and hires_pipeline is None:
        hires_pipeline = family.image_pipeline_class(pipeline, "img2img").from_pipe(pipeline)
    pipelines = [pipeline] + ([hires_pipeline] if hires is not None else [])
    originals = [p.scheduler for p in pipelines]
    schedulers = list(originals)
    choice = None
    if settings.sampler is not None:
        choice = choose(settings.sampler, settings.schedule, settings.family)
        schedulers = [choice.build(p.scheduler.config) for p in pipelines]
    scheduler = schedulers[0]
    starts = list(range(0, count, settings.batch_size))
    images: list[Image.Image] = []
    infotexts: list[str] = []
    interrupted = False
    stops = [event for event in (interrupt, skip) if event is not None]
    kwargs, distilled = family.call_arguments(
        pipeline,
        guidance_scale=settings.guidance_scale,
        distilled_guidance=settings.distilled_guidance,
        negative=any(negatives),
    )
    if accepts(pipeline, "height"):  # img2img pipelines take the size from their image
        kwargs.update(height=settings.height, width=settings.width)
    warnings = list(choice.warnings) if choice is not None else []
    skipped_layers = max(settings.clip_skip - 1, 0)
    stacks = (
        _clip_layers(pipeline, skipped_layers) if skipped_layers and accepts(pipeline, "clip_skip") else []
    )
    clip_skip = settings.clip_skip if stacks else None
    if skipped_layers and not stacks:
        warnings.append(f"Clip skip {settings.clip_skip}: not applied, {family.title} models take none")
    if hires is not None and hires.used_upscaler.casefold() != str(hires.upscaler).casefold():
        warnings.append(
            f"Hires upscaler {hires.upscaler!r}: not one nbkit has, {hires.used_upscaler} ran instead"
        )
    size = (settings.width, settings.height)
    latent_hires = hires is not None and hires.used_upscaler in LATENT_UPSCALERS
    try:
        for encoder, layers in stacks:
            encoder.layers = layers[: len(layers) - skipped_layers]
        for p, new in zip(pipelines, schedulers, strict=True):
            p.scheduler = new
        for batch, start in enumerate(starts):
            if interrupt is not None and interrupt.is_set():
                interrupted = True
                break
            if skip is not None:
                skip.clear()  # as A1111: a skip asked between batches does not carry over
            indices = list(range(start, min(start + settings.batch_size, count)))
            batch_seeds = [seeds[index] for index in indices]
            batch_negatives = [negatives[index] for index in indices]
            for new in schedulers:
                if hasattr(new, "noise_sampler_seed"):
                    # DPM++ SDE draws Brownian noise from its own seed: per image, as A1111 does.
                    new.noise_sampler_seed = batch_seeds if len(batch_seeds) > 1 else batch_seeds[0]
            prompts = [settings.prompts[index] for index in indices]
            # None rather than "": SDXL uses zeros, not the encoded empty prompt, for no negative.
            negative = batch_negatives if any(batch_negatives) else None
            negatives_kwargs = family.negative_arguments(pipeline, negative, kwargs)
            output = pipeline(
                prompt=prompts,
                num_inference_steps=settings.steps,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in batch_seeds],
                output_type="latent" if latent_hires else "pil",
                callback_on_step_end=_step_callback(
                    on_step, stops, family, batch, len(starts), indices, size=size
                ),
                **negatives_kwargs,
                **_per_image(settings.inputs, len(indices)),
                **kwargs,
            )
            batch_images = output.images
            if hires is not None:
                if any(event.is_set() for event in stops):
                    # Stopped in the first pass: no second pass (A1111 returns the first pass too).
                    if latent_hires:
                        batch_images = decode_latents(pipeline, batch_images)
                else:
                    hires_size = hires.size(settings.width, settings.height, family.image_size_multiple)
                    batch_images = second_pass(
                        hires_pipeline,
                        hires,
                        batch_images,
                        hires_size,
                        settings.steps,
                        prompt=prompts,
                        generator=[torch.Generator("cpu").manual_seed(seed) for seed in batch_seeds],
                        callback_on_step_end=_step_callback(
                            on_step, stops, family, batch, len(starts), indices, hires=True, size=hires_size
                        ),
                        **negatives_kwargs,
                        **kwargs,
                    )
            guidance = family.cfg_used(kwargs, settings.guidance_scale, pipeline)
            for index, image in zip(indices, batch_images, strict=True):
                images.append(image)
                parameters = _parameters(
                    settings, choice, scheduler, guidance, seeds[index], distilled, clip_skip
                )
                infotexts.append(format_infotext(shown_prompts[index], shown_negatives[index], parameters))
            if on_batch is not None:
                on_batch(indices, images[-len(indices) :], infotexts[-len(indices) :])
            if interrupt is not None and interrupt.is_set():
                interrupted = True
                break
    finally:
        for encoder, layers in stacks:
            encoder.layers = layers
        for p, original in zip(pipelines, originals, strict=True):
            p.scheduler = original
    return GenerationResult(images, infotexts, seeds[: len(images)], settings, interrupted, warnings)


def generate(
    pipeline: Any,
    prompts: list[str],
    *,
    seeds: int | list[int],
    steps: int,
    width: int,
    height: int,
    guidance_scale: float | None,
    negative_prompt: str | list[str] = "",
    sampler: str | None = "Euler a",
    schedule: str | None = "Automatic",
    batch_size: int = 1,
    model_name: str | None = None,
    model_hash: str | None = None,
    extra_parameters: dict[str, Any] | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
    interrupt: threading.Event | None = None,
    on_batch: Callable[[list[int], list[Image.Image], list[str]], None] | None = None,
    skip: threading.Event | None = None,
    distilled_guidance: float | None = None,
) -> GenerationResult:
    """Generate one image per prompt with a diffusers text-to-image pipeline.

    Args:
        pipeline: a diffusers text-to-image pipeline of any family (SD 1.x/2.x, SDXL, FLUX.1, Z-Image,
            FLUX.2 [klein]); its scheduler is restored after.
        prompts: one prompt per image.
        seeds: one seed (image `i` gets `seed + i`; -1: random) or one per image.
        steps: sampling steps.
        width: width in pixels (a multiple of 8).
        height: height in pixels (a multiple of 8).
        guidance_scale: A1111's "CFG scale"; None: the pipeline's default.
        negative_prompt: one for all images, or one per image.
        sampler: an A1111 sampler name; None keeps the pipeline's scheduler. Unknown names fall back as
            A1111's do; the result's `warnings` (and the infotexts) say so.
        schedule: an A1111 schedule type (with `sampler`).
        batch_size: images per pipeline call.
        model_name: the infotext's `Model`.
        model_hash: the infotext's `Model hash`.
        extra_parameters: more infotext pairs after `Model`.
        on_step: progress callback, called after every denoising step.
        interrupt: an event that stops generation early when set.
        on_batch: called with each finished batch's image indices, images and infotexts.
        skip: an event that ends the current batch early when set (the next one still runs).
        distilled_guidance: FLUX.1-dev's "Distilled CFG Scale" (None: 3.5).

    Returns:
        A `GenerationResult` with the images, their infotexts and the seeds used.
    """
    settings = GenerationSettings(
        prompts=prompts,
        negative_prompt=negative_prompt,
        seeds=seeds,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        sampler=sampler,
        schedule=schedule,
        batch_size=batch_size,
        model_name=model_name,
        model_hash=model_hash,
        extra_parameters=dict(extra_parameters or {}),
        distilled_guidance=distilled_guidance,
    )
    return generate_images(
        pipeline, settings, on_step=on_step, interrupt=interrupt, on_batch=on_batch, skip=skip
    )
