"""The generation service behind the web UI and the A1111 API (no gradio, no HTTP in here).

One `GenerationService` holds one loaded checkpoint and runs requests on it: txt2img, img2img and
inpaint on shared components, with A1111's samplers, seeds, batches, hires fix, LoRAs and ControlNet.
The UI and the API build a `GenerationRequest` and hand `service.generate` to the `GpuQueue`, so
requests run one at a time; `progress()`, `interrupt()` and `skip()` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from typing import Any, Literal

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.webui.models import ModelCatalog, ModelEntry
from nbkit.webui.outputs import OutputStore

Mode = Literal["txt2img", "img2img", "inpaint"]


@dataclasses.dataclass
class ControlNetUnit:
    """One ControlNet applied to a request.

    Args:
        model: a ControlNet registry key or path (`nbkit.webui.controlnet`).
        image: the input picture (preprocessed unless `preprocessor` is `none`).
        preprocessor: `canny`, `depth` or `none` (the image already is a control map).
        weight: the conditioning scale.
    """

    model: str
    image: Image.Image
    preprocessor: str = "none"
    weight: float = 1.0


@dataclasses.dataclass
class GenerationRequest:
    """One request, with A1111's field names and the web UI's defaults.

    Args:
        mode: `txt2img`, `img2img` or `inpaint`.
        prompt: the prompt; `<lora:NAME:WEIGHT>` tags in it apply LoRAs.
        negative_prompt: the negative prompt.
        seed: the first image's seed (image i gets seed + i); -1 draws one.
        batch_size: images per pipeline call.
        n_iter: batches (A1111's batch count).
        steps: sampling steps.
        cfg_scale: classifier-free guidance.
        width: image width (multiple of 8).
        height: image height (multiple of 8).
        sampler_name: an A1111 sampler ("Euler a", "DPM++ 2M Karras", ...).
        scheduler: an A1111 schedule type ("Automatic", "Karras", ...).
        denoising_strength: img2img/inpaint strength, and the hires pass's.
        init_image: the img2img/inpaint source picture.
        mask: the inpaint mask (white: repaint).
        mask_blur: pixels of blur on the mask edge.
        inpainting_mask_invert: repaint the black part instead.
        inpainting_fill: A1111's masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
        resize_mode: A1111's: 0 just resize, 1 crop and resize, 2 resize and fill.
        enable_hr: txt2img hires fix: upscale, then a second img2img pass.
        hr_scale: the upscale factor.
        hr_upscaler: `Latent` or `Lanczos` (and A1111's other names, mapped to these).
        hr_second_pass_steps: steps of the second pass (0: as many as `steps`).
        vae: a VAE to use instead of the model's (None: the model's).
        controlnet: a ControlNet unit, or None.
        save_images: save into the outputs folder.
    """

    mode: Mode = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    denoising_strength: float = 0.75
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    inpainting_fill: int = 1
    resize_mode: int = 0
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    vae: str | None = None
    controlnet: ControlNetUnit | None = None
    save_images: bool = True


@dataclasses.dataclass
class GenerationOutput:
    """What a request made.

    Args:
        images: the images, in order.
        infotexts: each image's A1111 infotext.
        seeds: each image's seed.
        paths: where they were saved (empty when not saved).
        request: the request.
        model: the checkpoint used.
        interrupted: True when stopped early.
        seconds: wall time.
    """

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    paths: list[Any]
    request: GenerationRequest
    model: ModelEntry | None
    interrupted: bool = False
    seconds: float = 0.0


@dataclasses.dataclass
class Progress:
    """A snapshot of the running job (A1111's /progress `state`).

    Args:
        job: a short name of the running job ("" when idle).
        job_no: the batch being drawn (0-based).
        job_count: batches in the job (0 when idle).
        sampling_step: steps done in this batch.
        sampling_steps: steps in this batch.
        interrupted: interrupt was asked.
        skipped: skip was asked.
        started: when the job started (time.time()), or None.
        preview: a small preview of the current image, when one was made.
        textinfo: a line for people ("Loading model ...", "Step 3/20").
    """

    job: str = ""
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float | None = None
    preview: Image.Image | None = None
    textinfo: str = ""

    @property
    def fraction(self) -> float:
        """How far the job is, 0..1."""
        if not self.job_count:
            return 0.0
        within = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)

    @property
    def eta(self) -> float:
        """Seconds left, estimated from the time so far."""
        if self.started is None or self.fraction <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / self.fraction - elapsed


class GenerationService:
    """One loaded checkpoint and the requests that run on it.

    Args:
        catalog: the checkpoints and LoRAs on offer.
        outputs: where images are saved (None: not saved).
        model: the checkpoint to load first (title, name, hash, path or registry key); None: the
            catalog's first, loaded on the first request.
        device: `cuda`/`cpu` (default: CUDA when available).
        low_vram: on a GPU, attention slicing, VAE tiling and model CPU offload.
    """

    def __init__(
        self,
        catalog: ModelCatalog,
        outputs: OutputStore | None = None,
        *,
        model: str | None = None,
        device: str | None = None,
        low_vram: bool = False,
    ):
        import torch

        self.catalog = catalog
        self.outputs = outputs
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.low_vram = low_vram
        self.pipeline: Any = None
        self.current: ModelEntry | None = None
        self._wanted = model
        self._progress = Progress()
        self._progress_lock = threading.Lock()
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    # --- models -------------------------------------------------------------------------------------

    def select_model(self, key: str) -> ModelEntry:
        """Load the checkpoint `key` names (title, model name, hash, file, or a new path/URL/hub id).

        The old weights are freed before the new ones load (a T4 has room for one SDXL).
        """
        try:
            entry = self.catalog.find(key)
        except NbkitError:
            if not any(sep in key for sep in ("/", "\\", ".")):
                raise
            entry = self.catalog.add(key)
        if self.current == entry and self.pipeline is not None:
            return entry
        self._set_progress(job="load model", textinfo=f"Loading {entry.title}")
        self.unload()
        from nbkit.models.loading import load_pipeline

        try:
            pipeline = load_pipeline(entry.source, family=entry.family, torch_dtype=self.dtype)
            pipeline.set_progress_bar_config(disable=True)
            self.pipeline = self._place(pipeline)
            self.current = entry
        finally:
            self._set_progress(job="", textinfo="")
        return entry

    def _place(self, pipeline: Any) -> Any:
        if self.device.type == "cuda" and self.low_vram:
            pipeline.enable_attention_slicing()
            pipeline.enable_vae_tiling()
            pipeline.enable_model_cpu_offload()
            return pipeline
        return pipeline.to(self.device)

    def unload(self) -> None:
        """Free the loaded weights (CUDA memory included)."""
        self.pipeline = self.current = None
        gc.collect()
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def ensure_model(self) -> ModelEntry:
        """The loaded checkpoint, loading the wanted (or first) one when none is."""
        if self.pipeline is None:
            if self._wanted is None and not self.catalog.checkpoints:
                raise NbkitError("there is no checkpoint to load", fix="train a model or add one to models/")
            self.select_model(self._wanted or self.catalog.checkpoints[0].title)
        return self.current

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Run one request on the loaded checkpoint (load it first if needed). Not thread-safe: call it
        through the `GpuQueue`."""
        if request.mode != "txt2img" or request.enable_hr or request.controlnet is not None:
            raise NbkitError(f"{request.mode} with these options is not available yet")
        from nbkit.generate import GenerationSettings, generate_images

        started = time.time()
        entry = self.ensure_model()
        self._interrupt.clear()
        self._skip.clear()
        count = request.batch_size * request.n_iter
        settings = GenerationSettings(
            prompts=[request.prompt] * count,
            negative_prompt=request.negative_prompt,
            seeds=request.seed,
            steps=request.steps,
            width=request.width,
            height=request.height,
            guidance_scale=request.cfg_scale,
            sampler=request.sampler_name,
            schedule=request.scheduler,
            batch_size=request.batch_size,
            model_name=entry.model_name,
            model_hash=entry.hash,
        )
        self._set_progress(job=request.mode, job_no=0, job_count=request.n_iter, started=started)
        try:
            result = generate_images(
                self.pipeline, settings, on_step=self._on_step, interrupt=self._interrupt
            )
        finally:
            self._set_progress(job="", job_count=0, sampling_step=0, sampling_steps=0, started=None)
        paths = []
        if request.save_images and self.outputs is not None and result.images:
            paths = self.outputs.save(result.images, result.infotexts, result.seeds)
        return GenerationOutput(
            result.images,
            result.infotexts,
            result.seeds,
            paths,
            request,
            entry,
            interrupted=result.interrupted,
            seconds=time.time() - started,
        )

    # --- progress -----------------------------------------------------------------------------------

    def _on_step(self, step) -> None:
        self._set_progress(
            job_no=step.batch,
            job_count=step.batches,
            sampling_step=step.step,
            sampling_steps=step.steps,
            textinfo=f"Batch {step.batch + 1}/{step.batches}, step {step.step}/{step.steps}",
        )

    def _set_progress(self, **changes: Any) -> None:
        with self._progress_lock:
            self._progress = dataclasses.replace(self._progress, **changes)

    def progress(self) -> Progress:
        """A snapshot of the running job (idle: job_count 0)."""
        with self._progress_lock:
            return dataclasses.replace(
                self._progress, interrupted=self._interrupt.is_set(), skipped=self._skip.is_set()
            )

    def interrupt(self) -> None:
        """Stop the running job after its current step (its images so far are kept)."""
        self._interrupt.set()

    def skip(self) -> None:
        """End the current batch after its current step and go on with the next."""
        self._skip.set()
