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
through the blurred mask, so the unmasked area keeps its pixels exactly (`nbkit.webui.inpaint`).

The request types are in `nbkit.webui.requests`, their checks in `nbkit.webui.validation`, and loading
the checkpoint, VAE and ControlNet in `nbkit.webui.loading`; this module runs the request.

Every family's checkpoints (diffusers folders, registry models, session exports) run on the same paths;
what differs the loaded model's family says (`nbkit.families`, through `nbkit.generation.generate`): its
samplers, guidance (FLUX.1's `distilled_cfg_scale`, Z-Image's CFG), size steps, live preview, whether it
takes ControlNets, the pipeline classes of img2img and inpainting (`Family.image_pipeline_class`), and the
settings an API request leaves to the model (`Family.generation_defaults`). Before a model loads on a
GPU, `nbkit.models.memory.plan_memory` refuses a GPU that cannot run it (a T4 for the bf16-only
families) and picks how to place it (bf16 on the GPU, or CPU offload, with the transformer and its big
text encoder in 8 or 4 bits where the GPU is small: `nbkit.models.quantization`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from nbkit.device import default_device
from nbkit.errors import NbkitError
from nbkit.families import Family
from nbkit.generation.cache import PipelineCache
from nbkit.generation.upscalers import FOLDER_NAME, Upscalers
from nbkit.webui import controlnet as cn
from nbkit.webui.inpaint import blur_mask, masked_content, paste_back
from nbkit.webui.loading import ModelLoading
from nbkit.webui.lora import applied_loras, lora_hash, lora_hashes_text, parse_loras
from nbkit.webui.models import ModelCatalog
from nbkit.webui.outputs import OutputStore
from nbkit.webui.requests import (
    PIXEL_UPSCALER,
    ControlNetUnit,
    GenerationOutput,
    GenerationRequest,
    Progress,
)
from nbkit.webui.validation import check_request

ATTENTION = ("sdpa", "xformers")
__all__ = [
    "ControlNetUnit",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationService",
    "Progress",
    "check_request",
    "latent_preview",
]


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


def cuda_memory() -> dict[str, Any]:
    """The CUDA memory figures of A1111's /sdapi/v1/memory (`cuda`), on a machine with a GPU."""
    import torch

    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


class GenerationService(ModelLoading):
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
        from nbkit.generation.placement import generation_dtype

        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.catalog = catalog
        self.outputs = outputs
        self.device = default_device(device)
        self.dtype = generation_dtype(None, self.device)  # the default family's (a model's: `_dtype_for`)
        self.low_vram = low_vram
        self.attention = attention
        self._models = PipelineCache()  # the loaded checkpoint (`pipeline`, `current`)
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
        self._controlnets: dict[str, Any] = {}  # the loaded ControlNets (`ModelLoading._load_controlnets`)
        self._depth: cn.DepthEstimator | None = None
        self._lora_hashes: dict[tuple, str] = {}
        self._memory_option: Any = None  # the model's memory plan on a GPU (nbkit.models.memory)
        self._family: Family | None = None  # the loaded model's family
        # The extras routes' and the hires fix's upscalers: `<storage root>/upscalers` and known downloads.
        root = catalog.storage_root
        self.upscalers = Upscalers(root / FOLDER_NAME if root is not None else None, device=self.device)

    # --- models -------------------------------------------------------------------------------------

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
        result["cuda"] = cuda_memory() if torch.cuda.is_available() else {"error": "CUDA is not available"}
        return result

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Run one request on the loaded checkpoint (load it first if needed). Not thread-safe: call it
        through the `GpuQueue`."""
        from nbkit.generation.generate import GenerationSettings, generate_images, resolve_seeds
        from nbkit.generation.hires import HiresFix
        from nbkit.generation.placement import as_family

        started = time.time()
        check_request(request)
        entry = self.ensure_model()
        family = as_family(self._family)
        request = self._with_model_defaults(request, family)
        request = self._with_styles(request)
        if family.controlnet_group is None and request.controlnet:
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
            init = masked_content(init, mask, request.inpainting_fill, seeds[0])
            mask = blur_mask(mask, request.mask_blur)
            inputs.update(image=init, mask_image=mask)
            extra["Mask blur"] = request.mask_blur
        control = self._controlnet_run(request)
        inputs.update(control.inputs)
        extra.update(control.infotext)
        hires = None
        if request.enable_hr and request.mode == "txt2img":  # A1111's img2img has no hires fix
            hires = HiresFix(
                scale=request.hr_scale,
                upscaler=request.hr_upscaler,
                steps=request.hr_second_pass_steps,
                denoising_strength=request.denoising_strength,
                upscalers=self.upscalers,
            )
        lora_text = lora_hashes_text([(tag.name, self._lora_hash(lora.path)) for tag, lora in loras])
        if lora_text:
            extra["Lora hashes"] = lora_text
        prompt, negative_prompt = self._with_embeddings(prompt, request.negative_prompt, extra)
        settings = GenerationSettings(
            prompts=[prompt] * count,
            negative_prompt=negative_prompt,
            infotext_negative_prompt=request.negative_prompt,
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
            clip_skip=request.clip_skip,
            family=family.name,
        )
        from nbkit.generation.generate import check_inputs

        check_inputs(settings)  # before the LoRAs load: a bad value is refused up front
        task = self._derive(request.mode, vae=vae, controlnet=control.stack)
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
            images = [paste_back(image, original, mask) for image in images]
        paths = []
        if request.save_images and self.outputs is not None and images:
            paths = self.outputs.save(images, result.infotexts, result.seeds, request.save_format)
        return GenerationOutput(
            images,
            result.infotexts,
            result.seeds,
            paths,
            request,
            entry,
            interrupted=result.interrupted,
            seconds=time.time() - started,
            control_images=control.maps,
            warnings=result.warnings,
        )

    def _with_model_defaults(self, request: GenerationRequest, family: Family) -> GenerationRequest:
        """`request` with the fields it left to the model (`GenerationRequest.model_defaults`) filled in:
        the model's own steps, CFG scale, sampler and schedule where its family has them, and a pixel
        upscaler for the hires fix of a model whose latents are packed."""
        left = set(request.model_defaults)
        if not left:
            return request
        changes: dict[str, Any] = {}
        defaults = family.generation_defaults(self.pipeline)
        if defaults.own:
            own = {
                "steps": defaults.steps,
                "cfg_scale": defaults.cfg_scale,
                "sampler_name": defaults.sampler,
                "scheduler": defaults.schedule,
            }
            changes.update({name: value for name, value in own.items() if name in left})
        if "hr_upscaler" in left and not family.latent_hires:
            changes["hr_upscaler"] = PIXEL_UPSCALER
        if not changes:
            return request
        request = dataclasses.replace(request, **changes)
        check_request(request)  # the steps changed: the denoising strength must still leave one
        return request

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
