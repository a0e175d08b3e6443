"""GPU check: nbkit's training step and txt2img against diffusers-example-style loops on real-width models.

    bench/gpu.sh                                   # on a CUDA GPU (>= 40 GB; an H200 takes ~5 min)
    python bench/gpu_check.py --device cpu --tiny  # the same code paths on nbkit's tiny models (CPU smoke test;
                                                   # its figures check the code runs, they measure nothing)

Parts, each on a random-weight model of the real width (`nbkit.realsize.random_models.save_random_model`,
written once to local disk, or to /dev/shm when it has room):

- `sd1`: SD 1.5 full DreamBooth (stage 2, the UNet) at 512 px with the T4 settings: fp16 mixed precision,
  8-bit AdamW where bitsandbytes is installed, gradient checkpointing, SDPA attention;
- `sdxl`: SDXL rank-16 LoRA of the UNet at 1024 px, same settings;
- `flux-bf16`: FLUX.1 [dev] rank-16 LoRA of the transformer at 512 px, bf16, base in bf16;
- `flux-nf4`: the same on an NF4 (bitsandbytes 4-bit, bf16 compute) base.

Each training row is it/s over `--steps` optimizer steps after `--warmup` steps, with the peak of
`torch.cuda.max_memory_allocated` and `max_memory_reserved` over those steps (the steady state) and the
peak reserved over the whole run (loading, caching and the steps), for:

- nbkit: its own stage code (`nbkit.train.stages.run_stage` on components from
  `nbkit.train.components.load_components`, latents cached by `nbkit.train.data.LatentCache`), set up as
  `nbkit.train.trainer` does minus the session (no images copied, no checkpoint written: `save_checkpoint`
  is replaced by a no-op, and the loss log by the step clock);
- baseline: a loop written like diffusers' examples/dreambooth/train_dreambooth.py (SD 1.5),
  train_dreambooth_lora_sdxl.py (SDXL) and train_dreambooth_lora_flux.py (FLUX.1; the NF4 base as
  examples/research_projects/flux_lora_quantization/train_dreambooth_lora_flux_miniature.py loads it):
  every step encodes the images with the VAE (the examples' default, no --cache_latents); SD 1.5 encodes the
  prompt every step (no --pre_compute_text_embeddings), SDXL and FLUX.1 encode the one instance prompt once.

"Same settings" on both sides: resolution, batch 1, mixed precision, optimizer, gradient checkpointing,
attention kernel, LoRA rank and target modules (nbkit's, which for FLUX.1 differ from the example's
default list), timestep sampling (FLUX.1: logit-normal) and the quantization config (nbkit's NF4 config,
with double quantization). The SDXL and FLUX.1 baselines load their frozen weights in the mixed-precision
dtype directly, where the examples load float32 and cast: the same weights on the GPU, a shorter load.

Beside each row, the computed peak from `nbkit/families/figures/<family>.json` (nbkit.realsize.figures:
stage 2, same mode, rank, checkpointing and optimizer, at the figures' resolution; "n/a" when there is no
file, no matching row, or the figures are for another resolution or base quantization).

Generation rows (`sd1`, `sdxl`, `flux-bf16`): txt2img it/s through the web UI's service
(`nbkit.webui.service.GenerationService.generate`, the path the UI and the A1111 API take: nbkit's
generation loop, its sampler, progress and live previews) against a bare diffusers pipeline call on the
same loaded pipeline with the same sampler, at the family's native size, batch 1. it/s is
(N2 - N1) / (t(N2) - t(N1)) over two calls of N1 and N2 steps, so prompt encoding and VAE decode cancel out.

Shortcuts, to stay within ~6 minutes on an H200:
- random weights are drawn on the GPU (`_random_tensor` of random_models replaced by a CUDA version of the
  same per-tensor scheme); drawing 12 billion normals on the CPU alone takes minutes;
- FLUX.1's T5-XXL is a stand-in with the real width, vocabulary and heads but `--flux-t5-layers` (2) of
  its 24 layers: its output has the real shape (512 x 4096), and neither side runs T5 during the steps
  (both encode the prompt once, and nbkit then moves the encoders to the CPU), so the step rows are
  unchanged; loads and the caption encoding are shorter, and FLUX.1's whole-run peak ("run res") lacks
  the ~9 GB of T5 layers that sit on the GPU while the caption is encoded. `--flux-t5-layers 24` writes
  the real T5-XXL.
- each part runs in its own process with a time limit (`--budget` for all, shared out by PART_BUDGET,
  time a part leaves unused going to the next); a part that runs out is killed and reported with the
  rows it finished.

The table is printed at the end; with `$OUT` set (or `--json PATH`) it is also written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
PARTS = ("sd1", "sdxl", "flux-bf16", "flux-nf4")
# Seconds per part on an H200 (model writing, three loads, two step loops, generation); scaled down
# to fit `--budget` when it is smaller than their sum.
PART_BUDGET = {"sd1": 55, "sdxl": 80, "flux-bf16": 125, "flux-nf4": 80}
FAMILY_OF_PART = {"sd1": "sd1", "sdxl": "sdxl", "flux-bf16": "flux", "flux-nf4": "flux"}


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


def make_case(part: str, args: argparse.Namespace) -> Case:
    from nbkit.families import get_family

    family = get_family(FAMILY_OF_PART[part])
    cuda = args.device.startswith("cuda")
    native = family.tiny_native_resolution if args.tiny else family.native_resolution
    # The T4 settings; FLUX.1 overflows in fp16, and the CPU has no fp16 autocast nbkit accepts.
    precision = ("bf16" if family.needs_bf16 else "fp16") if cuda else "no"
    flux = part.startswith("flux")
    quantization = None
    if part == "flux-nf4":
        # bitsandbytes needs CUDA: the CPU smoke test takes the same path with torchao's int8.
        quantization = "4bit" if cuda else "8bit"
    return Case(
        part=part,
        family=family.name,
        resolution=native if not flux else (args.flux_resolution if not args.tiny else native),
        lora_rank=0 if part == "sd1" else 16,
        precision=precision,
        use_8bit_adam=cuda and _has("bitsandbytes"),
        quantization=quantization,
        learning_rate=2e-6 if part == "sd1" else 1e-4,
        max_sequence_length=32 if args.tiny else 512,
        generation_resolution=None if part == "flux-nf4" else native,
    )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --- models and images ------------------------------------------------------------------------------


@contextlib.contextmanager
def random_weights_on(device: str) -> Iterator[None]:
    """Draw `save_random_model`'s tensors on `device`: the same per-tensor scheme (ones for 1-D weights
    and scales, zeros for biases, N(0, WEIGHT_STD) seeded by the tensor's name), another generator."""
    import zlib

    import torch

    from nbkit.realsize import random_models

    def draw(key: str, shape, dtype, seed: int):
        if len(shape) == 1 and key.endswith(("weight", "scale")):
            return torch.ones(shape, dtype=dtype)
        if key.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
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


def make_optimizer_like_examples(parameters, case: Case, weight_decay: float):
    import torch

    if case.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters, lr=case.learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8
    )


def set_attention(model, attention: str) -> None:
    """The examples' attention: diffusers' default SDPA, or xformers with
    --enable_xformers_memory_efficient_attention (used when nbkit picked it)."""
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()


# --- nbkit's side -----------------------------------------------------------------------------------


def train_nbkit(case: Case, folder: Path, images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """nbkit's stage 2 as its trainer runs it (`run_stage`), on components `load_components` loads."""
    import torch

    from nbkit.families import detect_family_from_config
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
    latents = LatentCache(components.vae, images, case.resolution, flip=config.random_flip, device=device)
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


# --- the baselines, written like diffusers' example scripts ------------------------------------------


def baseline_sd1(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth.py without --train_text_encoder: the UNet trains in fp32
    under autocast, the VAE and text encoder run in the mixed-precision dtype every step."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    set_attention(unet, attention)
    unet.enable_gradient_checkpointing()
    if device.type == "cuda":  # --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = make_optimizer_like_examples(unet.parameters(), case, weight_decay=1e-2)

    class DreamBoothDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, index: int) -> dict:
            pixels, _, _ = load_pixels(images[index], case.resolution)
            tokens = tokenizer(
                CAPTION,
                truncation=True,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            return {"instance_images": pixels, "instance_prompt_ids": tokens.input_ids}

    def collate_fn(examples: list[dict]) -> dict:
        pixel_values = torch.stack([example["instance_images"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.cat([example["instance_prompt_ids"] for example in examples], dim=0)
        return {"input_ids": input_ids, "pixel_values": pixel_values}

    loader = torch.utils.data.DataLoader(
        DreamBoothDataset(), batch_size=1, shuffle=True, collate_fn=collate_fn
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    weight_dtype = weight_dtype_of(case.precision)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                model_input = model_input * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device
                ).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(
                    batch["input_ids"].to(text_encoder.device), return_dict=False
                )[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss.detach().item()  # the example logs the loss every step
            clock.step_done()
            steps += 1
            if steps == total:
                break
    result = clock.figures(args.steps)
    accelerator.free_memory()
    return result


def _precomputed_dataset(images: list[Path], resolution: int):
    """The SDXL and FLUX.1 examples' DreamBoothDataset: every image transformed once, up front."""
    import torch

    loaded = [load_pixels(path, resolution) for path in images]

    class DreamBoothDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(loaded)

        def __getitem__(self, index: int) -> dict:
            pixels, original, crop = loaded[index]
            return {"instance_images": pixels, "original_size": original, "crop_top_left": crop}

    def collate_fn(examples: list[dict]) -> dict:
        pixel_values = torch.stack([example["instance_images"] for example in examples])
        return {
            "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
            "original_sizes": [example["original_size"] for example in examples],
            "crop_top_lefts": [example["crop_top_left"] for example in examples],
        }

    return torch.utils.data.DataLoader(DreamBoothDataset(), batch_size=1, shuffle=True, collate_fn=collate_fn)


def _lora_config(case: Case):
    from peft import LoraConfig

    from nbkit.families import get_family

    family = get_family(case.family)
    return LoraConfig(
        r=case.lora_rank,
        lora_alpha=case.lora_rank,
        init_lora_weights="gaussian",
        target_modules=family.lora_target_modules(family.denoiser),
    )


def baseline_sdxl(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth_lora_sdxl.py: UNet and text encoders in the mixed-precision
    dtype, the VAE in float32 encoding every step, the instance prompt encoded once (the encoders stay on
    the GPU: the example deletes only the lists holding them), LoRA weights upcast to fp32 under fp16."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    weight_dtype = weight_dtype_of(case.precision)
    tokenizer_one = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_two = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=weight_dtype
    )
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(
        folder, subfolder="text_encoder_2", torch_dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=weight_dtype)
    for model in (vae, text_encoder_one, text_encoder_two, unet):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)  # "The VAE is always in float32 to avoid NaN losses."
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    set_attention(unet, attention)
    unet.enable_gradient_checkpointing()
    unet.add_adapter(_lora_config(case))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if case.precision == "fp16":
        cast_training_params([unet], dtype=torch.float32)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer_like_examples([{"params": parameters, "lr": case.learning_rate}], case, 1e-4)
    loader = _precomputed_dataset(images, case.resolution)

    def compute_time_ids(original_size, crops_coords_top_left):
        add_time_ids = list(original_size + crops_coords_top_left + (case.resolution, case.resolution))
        return torch.tensor([add_time_ids]).to(accelerator.device, dtype=weight_dtype)

    def encode_prompt(text_encoders, tokenizers, prompt):
        prompt_embeds_list = []
        for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = output[0]
            prompt_embeds_list.append(output[-1][-2])
        return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds.view(1, -1)

    tokenizers, text_encoders = [tokenizer_one, tokenizer_two], [text_encoder_one, text_encoder_two]
    with torch.no_grad():
        prompt_embeds, unet_add_text_embeds = encode_prompt(text_encoders, tokenizers, CAPTION)
    del tokenizers, text_encoders
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample()
                model_input = (model_input * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device
                ).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                add_time_ids = torch.cat(
                    [
                        compute_time_ids(original_size=s, crops_coords_top_left=c)
                        for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)
                    ]
                )
                unet_added_conditions = {
                    "time_ids": add_time_ids,
                    "text_embeds": unet_add_text_embeds.repeat(bsz, 1),
                }
                model_pred = unet(
                    noisy_model_input,
                    timesteps,
                    prompt_embeds.repeat(bsz, 1, 1),
                    added_cond_kwargs=unet_added_conditions,
                    return_dict=False,
                )[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()
            clock.step_done()
            steps += 1
            if steps == total:
                break
    result = clock.figures(args.steps)
    accelerator.free_memory()
    return result


def baseline_flux(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth_lora_flux.py (the NF4 base loaded as the quantization research
    example does, then `prepare_model_for_kbit_training`): both prompts encoded once and the text encoders
    deleted, the VAE encoding every step, flow-matching loss with logit-normal timesteps."""
    import copy

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import (
        cast_training_params,
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
        free_memory,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    weight_dtype = weight_dtype_of(case.precision)
    tokenizer_one = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_two = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    text_encoder_one = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=weight_dtype
    )
    text_encoder_two = T5EncoderModel.from_pretrained(
        folder, subfolder="text_encoder_2", torch_dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=weight_dtype)
    if case.quantization is not None:
        from peft import prepare_model_for_kbit_training

        from nbkit.models.quantization import choose_backend, component_config

        # nbkit's config for the same weights (NF4, bf16 compute, double quantization).
        quantization_config = component_config(
            "transformer", case.quantization, choose_backend(case.quantization)
        )
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=quantization_config, torch_dtype=weight_dtype
        )
        transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=weight_dtype
        )
    for model in (transformer, vae, text_encoder_one, text_encoder_two):
        model.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    if case.quantization is None:
        transformer.to(accelerator.device, dtype=weight_dtype)
    elif device.type != "cuda":
        transformer.to(accelerator.device)  # bitsandbytes places its weights on the GPU as it loads
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    set_attention(transformer, attention)
    transformer.enable_gradient_checkpointing()
    transformer.add_adapter(_lora_config(case))
    if case.precision == "fp16":
        cast_training_params([transformer], dtype=torch.float32)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer_like_examples([{"params": parameters, "lr": case.learning_rate}], case, 1e-4)
    loader = _precomputed_dataset(images, case.resolution)

    # The example's encode_prompt: CLIP's pooled output and T5's sequence, once for the instance prompt.
    with torch.no_grad():
        ids = tokenizer_one(
            [CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        pooled_prompt_embeds = text_encoder_one(
            ids.to(accelerator.device), output_hidden_states=False
        ).pooler_output.to(dtype=text_encoder_one.dtype)
        ids = tokenizer_two(
            [CAPTION],
            padding="max_length",
            max_length=case.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        prompt_embeds = text_encoder_two(ids.to(accelerator.device))[0].to(dtype=text_encoder_two.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=accelerator.device, dtype=weight_dtype)
    del text_encoder_one, text_encoder_two, tokenizer_one, tokenizer_two
    free_memory()
    vae_shift, vae_scale = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, loader, lr_scheduler
    )

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        timesteps = timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds
    transformer.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(transformer):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample()
                model_input = ((model_input - vae_shift) * vae_scale).to(dtype=weight_dtype)
                latent_image_ids = FluxPipeline._prepare_latent_image_ids(
                    model_input.shape[0],
                    model_input.shape[2] // 2,
                    model_input.shape[3] // 2,
                    accelerator.device,
                    weight_dtype,
                )
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(
                    weighting_scheme="logit_normal",
                    batch_size=bsz,
                    logit_mean=0.0,
                    logit_std=1.0,
                    mode_scale=1.29,
                )
                indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                packed_noisy_model_input = FluxPipeline._pack_latents(
                    noisy_model_input,
                    batch_size=model_input.shape[0],
                    num_channels_latents=model_input.shape[1],
                    height=model_input.shape[2],
                    width=model_input.shape[3],
                )
                guidance = None
                if guidance_embeds:
                    guidance = torch.tensor([args.flux_guidance], device=accelerator.device).expand(bsz)
                model_pred = transformer(
                    hidden_states=packed_noisy_model_input,
                    timestep=timesteps / 1000,
                    guidance=guidance,
                    pooled_projections=pooled_prompt_embeds,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=latent_image_ids,
                    return_dict=False,
                )[0]
                model_pred = FluxPipeline._unpack_latents(
                    model_pred,
                    height=model_input.shape[2] * vae_scale_factor,
                    width=model_input.shape[3] * vae_scale_factor,
                    vae_scale_factor=vae_scale_factor,
                )
                weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean(
                    (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                        target.shape[0], -1
                    ),
                    1,
                ).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()
            clock.step_done()
            steps += 1
            if steps == total:
                break
    result = clock.figures(args.steps)
    accelerator.free_memory()
    return result


BASELINES = {"sd1": baseline_sd1, "sdxl": baseline_sdxl, "flux": baseline_flux}


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


# --- parts ------------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}{where}"


def run_part(part: str, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """Prepare the part's model and measure its rows; each measurement's failure becomes its row."""
    case = make_case(part, args)
    folder, written_s = prepare_model(case.family, args)
    if written_s:
        emit({"part": part, "task": "write model", "side": "-", "what": str(folder), "setup_s": written_s})
    images = make_images(Path(args.work_dir) / f"images-{case.resolution}", case.resolution)
    computed, computed_note = computed_train(case, args)
    attention = "sdpa"
    for side in ("nbkit", "baseline"):
        row = {"part": part, "task": "train", "side": side, "what": case.describe()}
        row.update(computed_gib=computed, computed_note=computed_note)
        leftover = release_memory()
        try:
            if side == "nbkit":
                figures = train_nbkit(case, folder, images, args)
                attention = figures.pop("attention")
            else:
                figures = BASELINES[case.family](case, folder, images, args, attention)
            row.update(figures)
        except Exception as error:
            row["error"] = describe_error(error)
            traceback.print_exc()
        if leftover > 0.25:
            row.setdefault("notes", []).append(f"{leftover:.1f} GiB left allocated before it")
        emit(row)
    release_memory()
    if case.generation_resolution is not None and not args.no_generation:
        try:
            measure_generation(case, folder, args, emit)
        except Exception as error:
            emit({"part": part, "task": "txt2img", "side": "both", "error": describe_error(error)})
            traceback.print_exc()
        release_memory()


def environment() -> dict[str, Any]:
    import importlib.metadata

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{properties.name}, {properties.total_memory / GiB:.0f} GiB"
    return info


def worker(args: argparse.Namespace) -> None:
    """One part in this process; rows go to `args.results` as JSON lines as they are measured."""
    from nbkit.quiet import quiet_libraries

    quiet_libraries()
    results = Path(args.results)

    def emit(row: dict) -> None:
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{row.get('part')}] {format_row(row)}", file=sys.__stdout__, flush=True)

    if not results.exists() or '"part": "environment"' not in results.read_text():
        emit({"part": "environment", **environment()})
    run_part(args.part, args, emit)


# --- the parent: budgets, the table ------------------------------------------------------------------


def part_timeout(part: str, later: list[str], scale: float, left: float) -> float:
    """Seconds part `part` may run: what is left of the budget less half the shares of the parts after it
    (a part that finishes early leaves its time to the next ones), at most 2.5 times its own share.

    Args:
        part: the part about to run.
        later: the parts after it.
        scale: the budget over the sum of all parts' `PART_BUDGET` (at most 1).
        left: the seconds left of the budget.
    """
    reserved = sum(0.5 * PART_BUDGET[name] * scale for name in later)
    return min(left - reserved, 2.5 * PART_BUDGET[part] * scale)


def run_parts(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "rows.jsonl"
    results.unlink(missing_ok=True)
    parts = args.parts
    deadline = time.monotonic() + args.budget if args.budget > 0 else None
    scale = min(1.0, args.budget / sum(PART_BUDGET[part] for part in parts))
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "NBKIT_HOME": str(work / "home")}
    child_env.setdefault("NBKIT_SCRATCH", str(work / "scratch"))
    for index, part in enumerate(parts, 1):
        if args.in_process:
            _run_in_process(part, args, results)
        else:
            timeout = None
            if deadline is not None:
                timeout = part_timeout(part, parts[index:], scale, deadline - time.monotonic())
                if timeout < 10:
                    _append(results, {"part": part, "error": "skipped: the time budget is spent"})
                    continue
            _run_subprocess(part, argv, results, work, timeout, child_env)
        write_json(args, _read_rows(results))  # after each part: a run killed later keeps what it had
        if not args.keep_models:
            still_needed = {FAMILY_OF_PART[later] for later in parts[index:]}
            for family in {FAMILY_OF_PART[p] for p in parts} - still_needed:
                shutil.rmtree(work / "models" / family, ignore_errors=True)
    return _read_rows(results)


def _read_rows(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def write_json(args: argparse.Namespace, rows: list[dict]) -> Path | None:
    """Write the rows to `--json`, else $OUT/gpu_check.json when OUT is set; returns the path."""
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if not out:
        return None
    settings = {key: value for key, value in vars(args).items() if key not in ("part", "results")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"args": settings, "rows": rows}, indent=2, default=str))
    return Path(out)


def _append(results: Path, row: dict) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"[{row.get('part')}] {format_row(row)}", flush=True)


def _run_in_process(part: str, args: argparse.Namespace, results: Path) -> None:
    log = Path(args.work_dir) / f"{part}.log"
    started = time.monotonic()
    with log.open("w") as handle, contextlib.redirect_stderr(handle):
        try:
            worker(argparse.Namespace(**{**vars(args), "part": part, "results": str(results)}))
        except Exception as error:  # outside the measurements (writing the model, say): the part's row
            traceback.print_exc()
            _append(results, {"part": part, "error": describe_error(error)})
    print(f"  ({part}: {time.monotonic() - started:.0f} s, log {log})", flush=True)


def _run_subprocess(part, argv, results: Path, work: Path, timeout, env) -> None:
    log = work / f"{part}.log"
    # The work dir as the parent resolved it (/dev/shm's free space changes once models are written).
    command = [sys.executable, __file__, *argv, "--work-dir", str(work), "--part", part]
    command += ["--results", str(results)]
    started = time.monotonic()
    with log.open("w") as handle:
        # Rows print to the console as they come; library output goes to the log.
        process = subprocess.Popen(command, stderr=handle, env=env, cwd=REPO)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            _append(
                results,
                {
                    "part": part,
                    "error": f"timed out after {timeout:.0f} s (its share of --budget; rows it finished are kept)",
                },
            )
            return
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        _append(results, {"part": part, "error": f"exit status {code}: {' | '.join(tail)}"})
    print(f"  ({part}: {time.monotonic() - started:.0f} s, log {log})", flush=True)


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_row(row: dict) -> str:
    if row.get("part") == "environment":
        return ", ".join(f"{key} {value}" for key, value in row.items() if key != "part" and value)
    if "error" in row and "it_s" not in row:
        return f"{row.get('task', '')} {row.get('side', '')}: ERROR {row['error']}"
    fields = [row.get("task", ""), row.get("side", ""), row.get("what", "")]
    if "it_s" in row:
        fields.append(f"{_number(row['it_s'])} it/s")
    if row.get("alloc_gib") is not None:
        fields.append(f"alloc {row['alloc_gib']:.2f} GiB, reserved {row['reserved_gib']:.2f} GiB")
    if row.get("setup_s") is not None:
        fields.append(f"{row['setup_s']:.0f} s setup")
    return " | ".join(str(field) for field in fields if field != "")


COLUMNS = (
    ("part", 9),
    ("task", 13),
    ("side", 12),
    ("it/s", 7),
    ("x base", 6),
    ("alloc", 6),
    ("reserv", 6),
    ("run res", 7),
    ("computed", 8),
    ("setup s", 7),
)


def table(rows: list[dict]) -> str:
    """The rows as one table (GiB for memory); ratios are nbkit / baseline it/s within a part and task."""
    base = {
        (row["part"], row.get("task")): row.get("it_s")
        for row in rows
        if row.get("side") in ("baseline", "diffusers")
    }
    lines = [
        " ".join(
            f"{name:>{width}}" if i > 2 else f"{name:<{width}}" for i, (name, width) in enumerate(COLUMNS)
        )
    ]
    lines.append(" " * 0 + "-" * (sum(width for _, width in COLUMNS) + len(COLUMNS) - 1) + "  what / notes")
    for row in rows:
        if row.get("part") == "environment":
            continue
        reference = base.get((row["part"], row.get("task")))
        ratio = None
        if row.get("side") in ("nbkit", "nbkit web UI") and reference and row.get("it_s"):
            ratio = row["it_s"] / reference
        computed = _number(row.get("computed_gib"))
        values = [
            row.get("part", ""),
            row.get("task", ""),
            row.get("side", ""),
            _number(row.get("it_s")),
            _number(ratio),
            _number(row.get("alloc_gib")),
            _number(row.get("reserved_gib")),
            _number(row.get("run_reserved_gib")),
            computed,
            _number(row.get("setup_s"), 0),
        ]
        cells = [
            f"{value:<{width}}" if i <= 2 else f"{value:>{width}}"
            for i, (value, (_, width)) in enumerate(zip(values, COLUMNS, strict=True))
        ]
        notes = [row.get("what", "")]
        if row.get("computed_note") and row.get("computed_gib") is None:
            notes.append(f"computed n/a: {row['computed_note']}")
        notes += row.get("notes", [])
        if row.get("image_s") is not None:
            notes.append(f"{row['image_s']:.2f} s/image")
        if row.get("error"):
            notes.append(f"ERROR {row['error']}")
        lines.append(" ".join(cells) + "  " + "; ".join(note for note in notes if note))
    return "\n".join(lines)


def default_work_dir(tiny: bool) -> Path:
    """/dev/shm when it holds the FLUX.1 folder with room to spare (no disk writes), else the temp dir."""
    shm = Path("/dev/shm")
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 48 * GiB:
        return shm / "nbkit-gpu-check"
    return Path(tempfile.gettempdir()) / ("nbkit-gpu-check-tiny" if tiny else "nbkit-gpu-check")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="nbkit's tiny models instead of real-width ones")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10; tiny 2)")
    parser.add_argument(
        "--gen-steps", type=int, default=None, help="txt2img steps of the long call (default 20; tiny 2)"
    )
    parser.add_argument("--flux-resolution", type=int, default=512, help="FLUX.1 training size")
    parser.add_argument(
        "--flux-t5-layers", type=int, default=2, help="T5 stand-in depth (24: the real T5-XXL)"
    )
    parser.add_argument(
        "--flux-guidance", type=float, default=1.0, help="FLUX.1-dev's training guidance input"
    )
    parser.add_argument("--no-generation", action="store_true", help="training rows only")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for all parts (330 on a GPU; 0: none)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="models and logs (default: /dev/shm or the temp dir)"
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the written models for another run")
    parser.add_argument(
        "--in-process", action="store_true", help="no process per part, no budget (default with --tiny)"
    )
    parser.add_argument("--isolate", action="store_true", help="a process per part even with --tiny")
    parser.add_argument(
        "--json", default=None, help="also write the rows here (default: $OUT/gpu_check.json)"
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    many = args.gen_steps if args.gen_steps is not None else (2 if args.tiny else 20)
    args.gen_steps_pair = (max(1, many // 4), many)
    if args.warmup < 1 or args.steps < 2 or many < 2:
        parser.error("--warmup must be at least 1, --steps and --gen-steps at least 2")
    if args.budget is None:
        args.budget = 0 if args.tiny else 330
    args.in_process = (args.in_process or args.tiny) and not args.isolate
    args.work_dir = str(args.work_dir or default_work_dir(args.tiny))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.part:
        worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NBKIT_HOME", str(Path(args.work_dir) / "home"))
    started = time.monotonic()
    print(
        f"nbkit GPU check: parts {', '.join(args.parts)} on {args.device}{' (tiny)' if args.tiny else ''}, "
        f"work dir {args.work_dir}",
        flush=True,
    )
    rows = run_parts(args, argv)
    print()
    env = next((row for row in rows if row.get("part") == "environment"), {})
    print(format_row(env))
    print(
        f"train it/s: {args.steps} steps after {args.warmup} warmup; txt2img it/s: (N2 - N1) / (t(N2) - t(N1)); "
        "x base: nbkit it/s / baseline it/s\nmemory in GiB: alloc/reserv = CUDA peaks over the measured steps "
        "or the long txt2img call, run res = peak reserved over the whole run (load, caching, steps), computed = "
        "nbkit/families/figures; setup s: start to the end of the first step (or the model load)"
    )
    print(table(rows))
    print(f"({time.monotonic() - started:.0f} s in all)")
    out = write_json(args, rows)
    if out is not None:
        print(f"wrote {out}")
    if not args.keep_models:
        shutil.rmtree(Path(args.work_dir) / "models", ignore_errors=True)


if __name__ == "__main__":
    main()
