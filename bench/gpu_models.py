"""The GPU check's models, measurements and nbkit's side (bench/gpu_check.py runs them).

Models: random weights of the real width (`nbkit.realsize.random_models.save_random_model`), written once
to the work dir, or nbkit's tiny models with `--tiny`. Shortcuts, to stay within ~6 minutes on an H200:
- random weights are drawn on the GPU (`_random_tensor` of random_models replaced by a CUDA version of the
  same per-tensor scheme); drawing 12 billion normals on the CPU alone takes minutes;
- FLUX.1's T5-XXL is a stand-in with the real width, vocabulary and heads but `--flux-t5-layers` (2) of
  its 24 layers: its output has the real shape (512 x 4096), and neither side runs T5 during the steps
  (both encode the prompt once, and nbkit then moves the encoders to the CPU), so the step rows are
  unchanged; loads and the caption encoding are shorter, and FLUX.1's whole-run peak ("run res") lacks
  the ~9 GB of T5 layers that sit on the GPU while the caption is encoded. `--flux-t5-layers 24` writes
  the real T5-XXL.

Training rows (`StepClock`): it/s over `--steps` optimizer steps after `--warmup` steps, with the peak of
`torch.cuda.max_memory_allocated` and `max_memory_reserved` over those steps (the steady state) and the
peak reserved over the whole run (loading, caching and the steps). nbkit's row (`train_nbkit`) runs its own
stage code (`nbkit.train.stages.run_stage` on components from `nbkit.train.components.load_components`,
latents cached by `nbkit.train.data.LatentCache`), set up as `nbkit.train.trainer` does minus the session
(no images copied, no checkpoint written: `save_checkpoint` is replaced by a no-op, and the loss log by the
step clock).

Generation rows (`measure_generation`): txt2img it/s through the web UI's service
(`nbkit.webui.service.GenerationService.generate`, the path the UI and the A1111 API take: nbkit's
generation loop, its sampler, progress and live previews) against a bare diffusers pipeline call on the
same loaded pipeline with the same sampler, at the family's native size, batch 1. it/s is
(N2 - N1) / (t(N2) - t(N1)) over two calls of N1 and N2 steps, so prompt encoding and VAE decode cancel out.

Computed peaks (`computed_train`, `computed_generation`): from `nbkit/families/figures/<family>.json`
(nbkit.realsize.figures: stage 2, same mode, rank, checkpointing and optimizer, at the figures' resolution;
"n/a" when there is no file, no matching row, or the figures are for another resolution or base
quantization).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's nbkit (imported inside the functions)
CAPTION = "a photo of zwx dog"
PROMPT = "a photo of zwx dog on a beach, detailed, golden hour"
IMAGE_COUNT = 4
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Case:
    """One part's training settings, the same on both sides.

    Args:
        part: the part's name.
        family: the model family.
        resolution: training size in pixels.
        lora_rank: 0 trains the full denoiser.
        precision: accelerate's mixed precision (`fp16`, `bf16`, `no`).
        use_8bit_adam: bitsandbytes' AdamW8bit (else torch's AdamW).
        quantization: the frozen base's weights (`4bit`, `8bit`) or None.
        learning_rate: the optimizer's learning rate.
        max_sequence_length: FLUX.1's T5 prompt tokens.
        generation_resolution: txt2img size (None: no generation rows).
    """

    part: str
    family: str
    resolution: int
    lora_rank: int
    precision: str
    use_8bit_adam: bool
    quantization: str | None
    learning_rate: float
    max_sequence_length: int
    generation_resolution: int | None

    def describe(self) -> str:
        mode = f"LoRA r{self.lora_rank}" if self.lora_rank else "full"
        base = {"4bit": ", NF4 base", "8bit": ", int8 base"}.get(self.quantization or "", "")
        optimizer = "AdamW8bit" if self.use_8bit_adam else "AdamW"
        return f"{mode} {self.resolution}px {self.precision} {optimizer} ckpt{base}"


# --- models and images ------------------------------------------------------------------------------


@contextlib.contextmanager
def random_weights_on(device: str) -> Iterator[None]:
    """Draw `save_random_model`'s tensors on `device`: the same per-tensor scheme (its constant tensors,
    else N(0, WEIGHT_STD) seeded by the tensor's name), another generator."""
    import zlib

    import torch

    from nbkit.realsize import random_models

    def draw(key: str, shape, dtype, seed: int):
        constant = random_models.constant_tensor(key, shape, dtype)
        if constant is not None:
            return constant
        generator = torch.Generator(device).manual_seed(seed ^ zlib.crc32(key.encode()))
        values = torch.randn(shape, generator=generator, device=device).mul_(random_models.WEIGHT_STD)
        return values.to(dtype).cpu()

    with mock.patch.object(random_models, "_random_tensor", draw):
        yield


@contextlib.contextmanager
def flux_t5_stand_in(layers: int, scratch: Path) -> Iterator[None]:
    """Make `save_random_model("flux")` write a T5 encoder of `layers` layers (real width and vocabulary)."""
    from nbkit.realsize import random_models

    real = random_models.real_config_folder
    folder = scratch / "flux-configs"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(real("flux"), folder)
    config_path = folder / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = layers
    config_path.write_text(json.dumps(config, indent=2))
    with mock.patch.object(
        random_models, "real_config_folder", lambda family: folder if family == "flux" else real(family)
    ):
        yield


def prepare_model(family: str, args: argparse.Namespace) -> tuple[Path, float]:
    """The family's model folder under the work dir (written once; `.complete` marks a finished one).

    Returns:
        the folder and the seconds spent writing it (0 when it was there).
    """
    folder = Path(args.work_dir) / "models" / family
    if (folder / ".complete").exists():
        return folder, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    if args.tiny:
        from nbkit.models.tiny import save_tiny_pipeline

        save_tiny_pipeline(family, folder)
    else:
        from nbkit.realsize.random_models import save_random_model

        with contextlib.ExitStack() as stack:
            if args.device.startswith("cuda"):
                stack.enter_context(random_weights_on(args.device))
            if family == "flux" and args.flux_t5_layers != 24:
                stack.enter_context(flux_t5_stand_in(args.flux_t5_layers, Path(args.work_dir)))
            save_random_model(family, folder)
    (folder / ".complete").touch()
    return folder, time.perf_counter() - started


def make_images(out_dir: Path, size: int) -> list[Path]:
    """Synthetic photos: coloured ellipses on noise, one per seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(IMAGE_COUNT):
        generator = np.random.default_rng(index)
        image = Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = (int(v) for v in generator.integers(0, size - size // 3, 2))
            colour = tuple(int(c) for c in generator.integers(0, 256, 3))
            draw.ellipse((x, y, x + size // 3, y + size // 3), fill=colour)
        path = out_dir / f"zwx-{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def load_pixels(path: Path, resolution: int):
    """The examples' transforms without torchvision: resize the short side (bilinear), centre-crop,
    scale to [-1, 1]. Returns (pixels, original (height, width), crop top-left (top, left))."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    top, left = round((image.height - resolution) / 2), round((image.width - resolution) / 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels.contiguous(), original, (top, left)


# --- measuring --------------------------------------------------------------------------------------


class StepClock:
    """Step end times and CUDA peaks: the peaks are reset when the warmup steps are done, so the
    measured peak is the steady state; the run peak keeps what loading and caching reached."""

    def __init__(self, device, warmup: int):
        import torch

        self.cuda = device.type == "cuda"
        self.warmup = warmup
        self.started = time.perf_counter()
        self.times: list[float] = []
        self.run_reserved = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step_done(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.warmup and self.cuda:
            self.run_reserved = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()

    def figures(self, steps: int) -> dict[str, Any]:
        import torch

        if len(self.times) != self.warmup + steps:
            raise RuntimeError(f"{len(self.times)} steps ran, expected {self.warmup + steps}")
        measured = self.times[self.warmup - 1 :]
        result: dict[str, Any] = {
            "it_s": (len(measured) - 1) / (measured[-1] - measured[0]),
            "setup_s": self.times[0] - self.started,
        }
        if self.cuda:
            result.update(
                alloc_gib=torch.cuda.max_memory_allocated() / GiB,
                reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                run_reserved_gib=max(self.run_reserved, torch.cuda.max_memory_reserved()) / GiB,
            )
        return result


def release_memory() -> float:
    """Free what earlier measurements left; returns the GiB still allocated (0 on the CPU)."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / GiB


def new_accelerator(mixed_precision: str, device):
    """A fresh Accelerator: accelerate's state is a per-process singleton that keeps the first settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def weight_dtype_of(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]


def describe_error(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}{where}"


# --- nbkit's side -----------------------------------------------------------------------------------


def train_nbkit(case: Case, folder: Path, images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """nbkit's stage 2 as its trainer runs it (`run_stage`), on components `load_components` loads."""
    import torch

    from nbkit.families import detect_family_from_config
    from nbkit.images.buckets import Sizing
    from nbkit.session.settings import TrainConfig
    from nbkit.train import stages
    from nbkit.train.components import enable_memory_savers, load_components, tokenize
    from nbkit.train.data import STREAM_INSTANCE_ORDER, LatentCache
    from nbkit.train.inputs import resolve_precision

    device = torch.device(args.device)
    total = args.warmup + args.steps
    config = TrainConfig(
        resolution=case.resolution,
        text_encoder_steps=0,
        unet_steps=total,
        unet_lr=case.learning_rate,
        lr_schedule="constant",
        seed=0,
        checkpoint_every=0,
        mixed_precision=case.precision,
        gradient_checkpointing=True,
        use_8bit_adam=case.use_8bit_adam,
        lora_rank=case.lora_rank,
        flux_max_sequence_length=case.max_sequence_length,
    )
    clock = StepClock(device, args.warmup)
    mixed_precision, weight_dtype = resolve_precision(config.mixed_precision, device)
    accelerator = new_accelerator(mixed_precision, device)
    if device.type == "cuda":  # as nbkit.train.trainer._execute
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    detected = detect_family_from_config(folder)
    components = load_components(
        str(folder), case.family, detected.prediction_type, weight_dtype, quantization=case.quantization
    )
    components.pipeline.to(device)
    attention = enable_memory_savers(components, gradient_checkpointing=True, device=device)
    captions = [CAPTION] * len(images)
    normalize = components.family_adapter.latent_normalizer(components.vae)
    sizing = Sizing(case.resolution, components.family_adapter.resolution_step, buckets=False)
    latents = LatentCache(
        components.vae, images, sizing, flip=config.random_flip, device=device, normalize=normalize
    )
    instance = stages.ImageSet(latents, captions, STREAM_INSTANCE_ORDER, tokenize(components, captions))
    scratch = Path(args.work_dir) / "scratch"
    context = stages.RunContext(
        accelerator=accelerator,
        components=components,
        config=config,
        seed=0,
        weight_dtype=weight_dtype,
        instance=instance,
        prior=None,
        scratch=scratch,
        checkpoints_dir=scratch / "checkpoints",
        trained_roles={},
        on_checkpoint=lambda *_: None,
        on_step=lambda *_: clock.step_done(),
    )
    stage = stages.Stage("unet", 2, total, case.learning_rate, (components.denoiser_role,))
    # The last step would save a checkpoint (a full SD 1.5 UNet and its optimizer: GBs of disk).
    with mock.patch.object(stages, "save_checkpoint", lambda *_args: None):
        stages.run_stage(context, stage, start_step=0, resume_from=None)
    result = clock.figures(args.steps)
    optimizer = "AdamW8bit" if case.use_8bit_adam and device.type == "cuda" else "AdamW"
    result["notes"] = [f"attention {attention}", optimizer]
    result["attention"] = attention
    return result


# --- generation -------------------------------------------------------------------------------------


def measure_generation(case: Case, folder: Path, args, emit: Callable[[dict], None]) -> None:
    """Web UI txt2img (GenerationService.generate) vs a bare diffusers call on the same pipeline."""
    import torch

    from nbkit.families import get_family
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.service import GenerationRequest, GenerationService

    family = get_family(case.family)
    flow = family.name == "flux"
    size = case.generation_resolution
    few, many = args.gen_steps_pair
    cuda = args.device.startswith("cuda")
    common = {"part": case.part, "task": f"txt2img {size}px"}
    started = time.perf_counter()
    service = GenerationService(
        ModelCatalog(include_base_models=False), model=str(folder), device=args.device
    )
    service.ensure_model()
    load_s = time.perf_counter() - started
    pipeline = service.pipeline
    # FLUX.1: distilled guidance 3.5 and no true CFG (the web UI's CFG 1); SD: CFG 7 with "Euler a".
    sampler, cfg = ("Euler", 1.0) if flow else ("Euler a", 7.0)
    what = f"{sampler}, {'distilled 3.5' if flow else 'CFG 7'}, {few}/{many} steps"

    def webui(steps: int) -> None:
        request = GenerationRequest(
            prompt=PROMPT,
            seed=1,
            steps=steps,
            width=size,
            height=size,
            cfg_scale=cfg,
            sampler_name=sampler,
            save_images=False,
        )
        service.generate(request)

    if flow:
        bare_scheduler = pipeline.scheduler  # FlowMatchEulerDiscreteScheduler, what "Euler" is for FLUX.1
        extra = {"guidance_scale": 3.5}
    else:
        from diffusers import EulerAncestralDiscreteScheduler

        bare_scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
        extra = {"guidance_scale": cfg}

    def bare(steps: int) -> None:
        original = pipeline.scheduler
        pipeline.scheduler = bare_scheduler
        try:
            pipeline(
                prompt=PROMPT,
                num_inference_steps=steps,
                width=size,
                height=size,
                generator=torch.Generator("cpu").manual_seed(1),
                **extra,
            )
        finally:
            pipeline.scheduler = original

    computed, computed_note = computed_generation(case, args)
    for call in (webui, bare):
        call(few)  # warmup: kernels, allocator
    for side, call in (("nbkit web UI", webui), ("diffusers", bare)):
        row = {**common, "side": side, "what": what, "computed_gib": computed, "computed_note": computed_note}
        try:
            row.update(_time_calls(call, few, many, cuda))
            row["setup_s"] = load_s if side == "nbkit web UI" else None
        except Exception as error:  # one failure is reported; the other side still runs
            row["error"] = describe_error(error)
        emit(row)
    service.unload()


def _time_calls(call: Callable[[int], None], few: int, many: int, cuda: bool) -> dict[str, Any]:
    import torch

    def timed(steps: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        call(steps)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    short = timed(few)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    long = timed(many)
    # Timing noise (a loaded CPU) can make the short call the slower one: then there is no rate.
    rate = (many - few) / (long - short) if long > short else None
    result: dict[str, Any] = {"it_s": rate, "image_s": long}
    if cuda:
        result.update(
            alloc_gib=torch.cuda.max_memory_allocated() / GiB,
            reserved_gib=torch.cuda.max_memory_reserved() / GiB,
        )
    return result


# --- computed figures -------------------------------------------------------------------------------


def _figures(family: str, args) -> tuple[dict | None, str]:
    if args.tiny:
        return None, "tiny model"
    from nbkit.realsize.figures import FIGURES_DIR

    path = FIGURES_DIR / f"{family}.json"
    if not path.exists():
        return None, f"no {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
    return json.loads(path.read_text()), ""


def computed_train(case: Case, args) -> tuple[float | None, str]:
    """The figures' stage-2 peak for the case's settings (GiB), or None and why not."""
    document, why = _figures(case.family, args)
    if document is None:
        return None, why
    if document.get("resolution") != case.resolution:
        return None, f"figures at {document.get('resolution')} px"
    if case.quantization is not None:
        return None, "figures are for a bf16 base"
    optimizer = "adamw8bit" if case.use_8bit_adam else "adamw"
    for row in document.get("train", []):
        if (
            row.get("stage") == "denoiser"
            and row.get("mode") == ("lora" if case.lora_rank else "full")
            and row.get("lora_rank") == case.lora_rank
            and row.get("gradient_checkpointing") is True
            and row.get("optimizer") == optimizer
            and row.get("quantization") is None
        ):
            return row["peak"] / GiB, ""
    return None, f"no {optimizer} row"


def computed_generation(case: Case, args) -> tuple[float | None, str]:
    """A resident pipeline's peak from the figures' phases: every phase's parameters, plus the largest
    phase's working memory (its peak less its parameters)."""
    document, why = _figures(case.family, args)
    if document is None:
        return None, why
    if document.get("resolution") != case.generation_resolution:
        return None, f"figures at {document.get('resolution')} px"
    try:
        phases = list(document["generate"].values())
        parameters = sum(phase["breakdown"]["parameters"] for phase in phases)
        working = max(phase["peak"] - phase["breakdown"]["parameters"] for phase in phases)
    except (KeyError, TypeError, ValueError) as error:
        return None, f"figures: {error!r}"
    return (parameters + working) / GiB, "resident"
