"""The generation service behind the web UI and the A1111 API (no gradio, no HTTP in here).

One `GenerationService` holds one loaded checkpoint and runs requests on it: txt2img, img2img and
inpaint on shared components, with A1111's samplers, seeds, batches, hires fix, LoRAs and ControlNet.
The UI and the API build a `GenerationRequest` and hand `service.generate` to the `GpuQueue`, so
requests run one at a time; `progress()`, `interrupt()` and `skip()` may be called from any thread.

img2img, inpainting and ControlNet pipelines are made per request with diffusers' `from_pipe` from
the loaded pipeline: they share its modules (no second copy of the weights), and a chosen VAE or a
ControlNet is passed in as one more component. LoRAs named in the prompt are loaded into the shared
modules for the request and unloaded after it. Inpainting follows A1111: the mask is blurred by
`mask_blur`, "masked content" prepares the masked area, and the result is pasted over the original
through the blurred mask, so the unmasked area keeps its pixels exactly.

Every family's checkpoints (diffusers folders, registry models, session exports) run on the same paths;
what differs the loaded model's family says (`nbkit.families`, through `nbkit.generation.generate`): its
samplers, guidance (FLUX.1's `distilled_cfg_scale`), size steps, live preview and whether it takes
ControlNets. Before a model loads on a GPU, `nbkit.models.memory.plan_memory` refuses a GPU that cannot
run it (a T4 for FLUX.1) and picks how to place it (bf16 on the GPU, or CPU offload, with the
transformer and T5 in 8 or 4 bits where the GPU is small: `nbkit.models.quantization`).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageFilter, ImageOps

from nbkit.errors import NbkitError
from nbkit.families import Family, get_family
from nbkit.webui import controlnet as cn
from nbkit.webui.lora import applied_loras, lora_hash, lora_hashes_text, parse_loras
from nbkit.webui.models import ModelCatalog, ModelEntry, folder_family
from nbkit.webui.outputs import OutputStore

Mode = Literal["txt2img", "img2img", "inpaint"]
MODES = ("txt2img", "img2img", "inpaint")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
ATTENTION = ("sdpa", "xformers")


@dataclasses.dataclass
class ControlNetUnit:
    """One ControlNet applied to a request.

    Args:
        model: a ControlNet registry key, hub repo id or local folder (`nbkit.webui.controlnet`).
        image: the input picture (preprocessed unless `preprocessor` is `none`).
        preprocessor: `canny`, `depth` or `none` (the image already is a control map).
        weight: the conditioning scale.
        guidance_start: the fraction of the steps where the ControlNet starts acting.
        guidance_end: the fraction of the steps where it stops.
        low_threshold: Canny's low threshold.
        high_threshold: Canny's high threshold.
    """

    model: str
    image: Image.Image
    preprocessor: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    low_threshold: int = 100
    high_threshold: int = 200


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
        cfg_scale: classifier-free guidance (FLUX.1: true CFG, only above 1 with a negative prompt).
        distilled_cfg_scale: FLUX.1-dev's distilled guidance (Forge's "Distilled CFG Scale").
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
    distilled_cfg_scale: float = 3.5
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
        control_image: the ControlNet's control map, when one was used.
    """

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    paths: list[Any]
    request: GenerationRequest
    model: ModelEntry | None
    interrupted: bool = False
    seconds: float = 0.0
    control_image: Image.Image | None = None


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


def latent_preview(latents: Any, family: Family | str | None = None) -> Image.Image:
    """A1111's cheap live preview: the first image's latents mapped linearly to RGB (1/8 size) by the
    family's `preview_coefficients`.

    Args:
        latents: (batch, channels, height/8, width/8) latents.
        family: the model's family (None: the default one).
    """
    import torch

    from nbkit.generation.placement import as_family

    coefficients = torch.tensor(as_family(family).preview_coefficients, dtype=torch.float32)
    rows = coefficients.shape[0]
    rgb = torch.einsum("lxy,lr->rxy", latents[0].detach().float().cpu()[:rows], coefficients)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma `radius`, across then down (kernel 2*int(2.5r+0.5)+1)."""
    if radius <= 0:
        return mask
    import cv2
    import numpy as np

    size = 2 * int(2.5 * radius + 0.5) + 1
    pixels = cv2.GaussianBlur(np.asarray(mask), (size, 1), radius)
    return Image.fromarray(cv2.GaussianBlur(pixels, (1, size), radius))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area gets the colours around it, from ever finer blurs
    of the unmasked picture laid over each other."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def check_request(request: GenerationRequest) -> None:
    """Check a request's own fields before anything loads; raises ValueError naming the bad value.

    (Sizes, steps, seeds and samplers are checked by `nbkit.generation.generate.check_inputs`.)

    Args:
        request: the request.
    """

    def whole(name: str, low: int, high: int | None = None) -> None:
        value = getattr(request, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be an integer {span}, got {value!r}")

    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {request.mode!r}")
    whole("batch_size", 1)
    whole("n_iter", 1)
    whole("resize_mode", 0, 3)
    if request.mode != "txt2img":
        if not isinstance(request.init_image, Image.Image):
            raise ValueError(f"{request.mode} needs an init image")
        strength = request.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise ValueError(f"denoising_strength must be in (0, 1], got {strength!r}")
        if isinstance(request.steps, int) and int(request.steps * strength) < 1:
            raise ValueError(
                f"denoising_strength {strength} of {request.steps} steps leaves no step to run; "
                "raise the steps or the strength"
            )
    if request.mode == "inpaint":
        if not isinstance(request.mask, Image.Image):
            raise ValueError("inpaint needs a mask (white: repaint)")
        whole("mask_blur", 0, 256)
        whole("inpainting_fill", 0, 3)
    if request.controlnet is not None:
        unit = request.controlnet
        if not isinstance(unit.image, Image.Image):
            raise ValueError("the ControlNet unit needs an image")
        if unit.preprocessor.strip().lower() not in cn.PREPROCESSORS:
            raise ValueError(
                f"preprocessor must be one of {', '.join(cn.PREPROCESSORS)}, got {unit.preprocessor!r}"
            )
        if not 0 <= unit.guidance_start < unit.guidance_end <= 1:
            raise ValueError(
                f"ControlNet guidance must satisfy 0 <= start < end <= 1, got {unit.guidance_start}, "
                f"{unit.guidance_end}"
            )


class GenerationService:
    """One loaded checkpoint and the requests that run on it.

    Args:
        catalog: the checkpoints and LoRAs on offer.
        outputs: where images are saved (None: not saved).
        model: the checkpoint to load first (title, name, hash, path or registry key); None: the
            catalog's first, loaded on the first request.
        device: `cuda`/`cpu` (default: CUDA when available).
        low_vram: on a GPU, attention slicing, VAE tiling and model CPU offload.
        attention: `sdpa` (PyTorch's scaled dot-product attention, diffusers' default) or `xformers`
            (used only when it imports and runs with this torch; else SDPA, said in `notes`).
    """

    def __init__(
        self,
        catalog: ModelCatalog,
        outputs: OutputStore | None = None,
        *,
        model: str | None = None,
        device: str | None = None,
        low_vram: bool = False,
        attention: str = "sdpa",
    ):
        import torch

        from nbkit.generation.placement import generation_dtype

        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.catalog = catalog
        self.outputs = outputs
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = generation_dtype(None, self.device)  # the default family's (a model's: `_dtype_for`)
        self.low_vram = low_vram
        self.attention = attention
        self.pipeline: Any = None
        self.current: ModelEntry | None = None
        self.notes: list[str] = []
        self.preview_every = 5  # steps between live previews
        self.depth_model = cn.DEFAULT_DEPTH_MODEL  # what the depth preprocessor loads
        self._wanted = model
        self._progress = Progress()
        self._progress_lock = threading.Lock()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._passes = 1
        self._vae: tuple[str, Any] | None = None
        self._controlnet: tuple[str, Any] | None = None
        self._depth: cn.DepthEstimator | None = None
        self._lora_hashes: dict[tuple, str] = {}
        self._memory_option: Any = None  # the model's memory plan on a GPU (nbkit.models.memory)
        self._family: Family | None = None  # the loaded model's family

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
        from nbkit.families import family_of_pipeline
        from nbkit.generation.placement import plan_generation_memory

        family = entry.family or folder_family(entry.source)
        # A GPU that cannot run it (a T4 for FLUX.1) is refused before the old model is dropped.
        option = plan_generation_memory(family, self.device)
        self._set_progress(job="load model", textinfo=f"Loading {entry.title}")
        self.unload()
        from nbkit.models.loading import load_pipeline

        try:
            pipeline = load_pipeline(
                entry.source,
                family=entry.family,
                torch_dtype=self._dtype_for(family),
                quantization=option.quantization if option is not None else None,
            )
            loaded = get_family(family) if family is not None else family_of_pipeline(pipeline)
            if loaded is not None and family is None:  # a single file: known once loaded, still on the CPU
                if self.dtype != self._dtype_for(loaded):
                    pipeline = pipeline.to(dtype=self._dtype_for(loaded))
                option = plan_generation_memory(loaded, self.device)
                if option is not None and option.quantization is not None:
                    raise NbkitError(
                        f"this GPU runs {entry.title} only with {option.quantization} weights ({option.name}), "
                        "and quantized weights load from a diffusers folder, not a single-file checkpoint",
                        path=entry.source,
                        fix="convert it to a diffusers folder (`nbkit convert FILE FOLDER --dtype bf16`) and "
                        "open that folder, or use a GPU with more memory",
                    )
            pipeline.set_progress_bar_config(disable=True)
            self.pipeline = self._place(pipeline, option, loaded)
            self.current, self._family = entry, loaded
        finally:
            self._set_progress(job="", textinfo="")
        return entry

    def _dtype_for(self, family: Family | str | None) -> Any:
        """The weights' dtype: float16 on a GPU (bfloat16 for FLUX.1, which overflows float16), else float32."""
        from nbkit.generation.placement import generation_dtype

        return generation_dtype(family, self.device)

    @property
    def family(self) -> str | None:
        """The registry name of the loaded checkpoint's family (None: none loaded, or not one nbkit knows)."""
        return self._family.name if self._family is not None and self.pipeline is not None else None

    @property
    def _offload(self) -> bool:
        option = self._memory_option
        planned = option is not None and (option.offload or option.quantization is not None)
        return self.device.type == "cuda" and (self.low_vram or planned)

    def _place(self, pipeline: Any, option: Any = None, family: Family | None = None) -> Any:
        """Move a loaded pipeline where it runs; `option` is its family's memory plan (None: none)."""
        self._memory_option = option
        if option is not None:
            from nbkit.generation.placement import apply_memory_option, as_family

            if option.offload or option.quantization:
                from nbkit.models.quantization import describe_loaded

                weights = describe_loaded(pipeline)
                self.notes.append(
                    f"{as_family(family).title} runs as {option.name}: {option.description}"
                    + (f"; {weights}" if weights else "")
                )
            # Low VRAM offloads a plan that fits whole too: placement and `_offload` (which derived
            # pipelines follow) must agree.
            return apply_memory_option(pipeline, option, self.device, offload=self._offload)
        if self.device.type == "cuda" and self.attention == "xformers":
            try:
                pipeline.enable_xformers_memory_efficient_attention()
            except Exception as error:  # not installed, or built for another torch: SDPA stays
                self.notes.append(f"xformers is not usable here ({error}); using PyTorch SDPA attention")
        if self._offload:
            pipeline.enable_attention_slicing()
            pipeline.enable_vae_tiling()
            pipeline.enable_model_cpu_offload(device=self.device)
            return pipeline
        return pipeline.to(self.device)

    def unload(self) -> None:
        """Free the loaded weights (CUDA memory included), with the VAE and ControlNet loaded for them."""
        self.pipeline = self.current = self._memory_option = self._family = None
        self._vae = self._controlnet = None
        self._depth = None
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

    def _load_vae(self, source: str) -> Any:
        """The VAE at `source` (cached for the next request): a VAE folder, a pipeline folder with
        `vae/`, or a single file (diffusers or original layout, read with the model's VAE config).

        It loads in the dtype of the model's own VAE: FLUX.1 runs in bfloat16 on a GPU, not `self.dtype`,
        and its latents reach the VAE in the pipeline's dtype."""
        if self._vae is not None and self._vae[0] == source:
            return self._vae[1]
        from diffusers import AutoencoderKL

        path = Path(source).expanduser()
        self._vae = None
        dtype = self.pipeline.vae.dtype
        try:
            if path.is_dir():
                subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
                vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
            elif path.is_file():
                import tempfile

                with tempfile.TemporaryDirectory() as config:
                    self.pipeline.vae.save_config(config)
                    vae = AutoencoderKL.from_single_file(
                        str(path), config=config, torch_dtype=dtype, local_files_only=True
                    )
            else:
                raise NbkitError("no such VAE file or folder", path=path, fix="check the path")
        except (OSError, ValueError, KeyError) as error:
            raise NbkitError(
                f"could not load this VAE: {error}",
                path=path,
                fix="give a diffusers VAE folder or a VAE file",
            ) from error
        if vae.config.latent_channels != self.pipeline.vae.config.latent_channels:
            raise NbkitError(
                f"this VAE has {vae.config.latent_channels} latent channels, the model "
                f"{self.pipeline.vae.config.latent_channels}",
                path=path,
                fix="pick a VAE made for this model's family",
            )
        vae = vae if self._offload else vae.to(self.device)
        self._vae = (source, vae)
        return vae

    def _load_controlnet(self, unit: ControlNetUnit) -> tuple[cn.ControlNetSource, Any]:
        source = cn.find_controlnet(unit.model)
        cn.check_compatible(source, self.pipeline.unet.config, self.current.family if self.current else None)
        if self._controlnet is None or self._controlnet[0] != source.source:
            self._controlnet = None  # free the old one first
            model = cn.load_controlnet(source, torch_dtype=self.dtype)
            self._controlnet = (source.source, model if self._offload else model.to(self.device))
        return source, self._controlnet[1]

    def _depth_estimator(self) -> cn.DepthEstimator:
        if self._depth is None or self._depth.name != self.depth_model:
            self._depth = cn.DepthEstimator(self.depth_model, device=self.device)
        return self._depth

    def _derive(self, mode: str, **components: Any) -> Any:
        """A `mode` pipeline on the loaded pipeline's modules (plus a VAE or ControlNet override)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        components = {name: value for name, value in components.items() if value is not None}
        if mode == "txt2img" and not components and not self._offload:
            return self.pipeline
        auto = {
            "txt2img": AutoPipelineForText2Image,
            "img2img": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting,
        }[mode]
        pipeline = auto.from_pipe(self.pipeline, **components)
        pipeline.set_progress_bar_config(disable=True)
        if self._offload:
            # Offload hooks belong to one pipeline; the derived one (maybe with a ControlNet) gets its own.
            pipeline.enable_model_cpu_offload(device=self.device)
        return pipeline

    def _lora_hash(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._lora_hashes:
            self._lora_hashes[key] = lora_hash(path)
        return self._lora_hashes[key]

    def memory(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/memory: RAM, and CUDA memory (or why there is none)."""
        import psutil
        import torch

        ram = psutil.virtual_memory()
        result: dict[str, Any] = {
            "ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}
        }
        if not torch.cuda.is_available():
            result["cuda"] = {"error": "CUDA is not available"}
            return result
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name: str) -> dict[str, int]:
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        result["cuda"] = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
        return result

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Run one request on the loaded checkpoint (load it first if needed). Not thread-safe: call it
        through the `GpuQueue`."""
        from nbkit.generation.generate import GenerationSettings, HiresFix, generate_images, resolve_seeds
        from nbkit.generation.placement import as_family

        started = time.time()
        check_request(request)
        entry = self.ensure_model()
        family = as_family(self._family)
        if family.controlnet_group is None and request.controlnet is not None:
            raise NbkitError(
                f"ControlNet is not available for {entry.title}: nbkit offers ControlNet for the SD "
                f"families only, not {family.title}",
                fix="turn the ControlNet unit off, or pick an SD 1.5, SD 2.x or SDXL checkpoint",
            )
        self._interrupt.clear()
        self._skip.clear()
        count = request.batch_size * request.n_iter
        prompt, tags = parse_loras(request.prompt)
        loras = [(tag, self.catalog.find_lora(tag.name)) for tag in tags]
        extra: dict[str, Any] = {}
        vae = None
        if request.vae:
            vae = self._load_vae(request.vae)
            vae_path = Path(request.vae).expanduser()
            if vae_path.is_file():
                from nbkit.convert.hashes import model_hashes

                extra["VAE hash"] = model_hashes(vae_path)[1]
            extra["VAE"] = vae_path.name
        seeds = resolve_seeds(request.seed, count)
        inputs: dict[str, Any] = {}
        init = original = mask = None
        if request.mode != "txt2img":
            init = original = cn.resize_for_generation(
                request.init_image, request.width, request.height, request.resize_mode
            )
            inputs.update(image=init, strength=request.denoising_strength)
            extra["Denoising strength"] = request.denoising_strength
        if request.mode == "inpaint":
            mask = cn.resize_for_generation(
                request.mask.convert("RGB"), request.width, request.height, request.resize_mode
            ).convert("L")
            if request.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
            init = self._masked_content(init, mask, request.inpainting_fill, seeds[0])
            mask = blur_mask(mask, request.mask_blur)
            inputs.update(image=init, mask_image=mask)
            extra["Mask blur"] = request.mask_blur
        controlnet = control_image = None
        if request.controlnet is not None:
            unit = request.controlnet
            source, controlnet = self._load_controlnet(unit)
            depth = self._depth_estimator() if unit.preprocessor.strip().lower() == "depth" else None
            control_image = cn.preprocess(
                unit.image,
                unit.preprocessor,
                request.width,
                request.height,
                resize_mode=request.resize_mode,
                depth=depth,
                low_threshold=unit.low_threshold,
                high_threshold=unit.high_threshold,
            )
            inputs["image" if request.mode == "txt2img" else "control_image"] = control_image
            inputs.update(
                controlnet_conditioning_scale=unit.weight,
                control_guidance_start=unit.guidance_start,
                control_guidance_end=unit.guidance_end,
            )
            extra["ControlNet 0"] = (
                f"Module: {unit.preprocessor.strip().lower()}, Model: {source.name}, Weight: {unit.weight}, "
                f"Guidance Start: {unit.guidance_start}, Guidance End: {unit.guidance_end}"
            )
        hires = None
        if request.enable_hr and request.mode == "txt2img":  # A1111's img2img has no hires fix
            hires = HiresFix(
                scale=request.hr_scale,
                upscaler=request.hr_upscaler,
                steps=request.hr_second_pass_steps,
                denoising_strength=request.denoising_strength,
            )
        lora_text = lora_hashes_text([(tag.name, self._lora_hash(lora.path)) for tag, lora in loras])
        if lora_text:
            extra["Lora hashes"] = lora_text
        settings = GenerationSettings(
            prompts=[prompt] * count,
            negative_prompt=request.negative_prompt,
            seeds=seeds,
            steps=request.steps,
            width=request.width,
            height=request.height,
            guidance_scale=request.cfg_scale,
            sampler=request.sampler_name,
            schedule=request.scheduler,
            batch_size=request.batch_size,
            model_name=entry.model_name,
            model_hash=entry.hash,
            extra_parameters=extra,
            infotext_prompts=[request.prompt] * count,
            inputs=inputs,
            hires=hires,
            distilled_guidance=request.distilled_cfg_scale,
            family=family.name,
        )
        from nbkit.generation.generate import check_inputs

        check_inputs(settings)  # before the LoRAs load: an SD sampler on FLUX.1 is refused up front
        task = self._derive(request.mode, vae=vae, controlnet=controlnet)
        hires_pipeline = self._derive("img2img", vae=vae) if hires is not None else None
        self._passes = 2 if hires is not None else 1
        self._set_progress(
            job=request.mode,
            job_no=0,
            job_count=request.n_iter * self._passes,
            sampling_step=0,
            sampling_steps=request.steps,
            started=started,
            preview=None,
            textinfo="",
        )
        try:
            with applied_loras(self.pipeline, [(tag, lora.file_to_load) for tag, lora in loras]):
                result = generate_images(
                    task,
                    settings,
                    on_step=self._on_step,
                    interrupt=self._interrupt,
                    skip=self._skip,
                    hires_pipeline=hires_pipeline,
                )
        finally:
            del task, hires_pipeline
            self._set_progress(
                job="",
                job_count=0,
                sampling_step=0,
                sampling_steps=0,
                started=None,
                preview=None,
                textinfo="",
            )
        images = result.images
        if request.mode == "inpaint":
            # A1111 pastes the original back through the blurred mask: unmasked pixels stay exactly.
            images = [Image.composite(image.convert("RGB"), original, mask) for image in images]
        paths = []
        if request.save_images and self.outputs is not None and images:
            paths = self.outputs.save(images, result.infotexts, result.seeds)
        return GenerationOutput(
            images,
            result.infotexts,
            result.seeds,
            paths,
            request,
            entry,
            interrupted=result.interrupted,
            seconds=time.time() - started,
            control_image=control_image,
        )

    @staticmethod
    def _masked_content(image: Image.Image, mask: Image.Image, fill: int, seed: int) -> Image.Image:
        """The init image with A1111's "masked content" prepared in the (unblurred) masked area.

        0 fill (surrounding colours), 1 original (as it is); A1111's 2 latent noise and 3 latent
        nothing work in latent space, which the diffusers pipelines do not expose: they are
        approximated in pixels by seeded noise and by mid grey (which encodes to about zero latents).
        """
        import numpy as np

        if fill == 1:
            return image
        if fill == 0:
            return fill_masked(image, mask)
        if fill == 2:
            rng = np.random.default_rng(seed)
            noise = Image.fromarray(rng.integers(0, 256, (image.height, image.width, 3), dtype=np.uint8))
        else:
            noise = Image.new("RGB", image.size, (128, 128, 128))
        return Image.composite(noise, image, mask.point(lambda value: 255 if value >= 128 else 0))

    # --- progress -----------------------------------------------------------------------------------

    def _on_step(self, step) -> None:
        changes: dict[str, Any] = {
            "job_no": step.batch * self._passes + (1 if step.hires else 0),
            "job_count": step.batches * self._passes,
            "sampling_step": step.step,
            "sampling_steps": step.steps,
            "textinfo": f"Batch {step.batch + 1}/{step.batches}, {'hires ' if step.hires else ''}"
            f"step {step.step}/{step.steps}",
        }
        every = max(1, int(self.preview_every))
        if step.latents is not None and (step.step % every == 0 or step.step == step.steps):
            changes["preview"] = latent_preview(step.latents, self._family)
        self._set_progress(**changes)

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
