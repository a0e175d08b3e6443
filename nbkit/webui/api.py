"""AUTOMATIC1111's REST API under `/sdapi/v1`, on nbkit's generation service.

Field names, defaults and response shapes follow A1111 (see the compatibility notes), so its clients
(`webuiapi`, scripts written against A1111) work unchanged: `images` are raw base64 PNGs carrying
the `parameters` chunk, `parameters` echoes the request, `info` is a JSON *string*. Unknown request
fields are ignored. Errors are JSON `{"error", "detail", "body", "errors"}` with a status: 400 for a
bad value, 413 for an oversized body or image, 422 for a malformed request, 503 when the queue is
full or a training run holds the GPU.

Every generation (and every model switch) runs through the one `GpuQueue`; the handlers are async
and wait on the job's future, so a burst of waiting requests holds no threads.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import io
import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nbkit.errors import NbkitError
from nbkit.generation.infotext import PNG_KEY, parse_infotext, read_infotext
from nbkit.generation.samplers import list_samplers, list_schedulers, resolve
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.requests import (
    DISTILLED_CFG_SCALE,
    HR_UPSCALERS,
    ControlNetUnit,
    GenerationOutput,
    GenerationRequest,
)
from nbkit.webui.security import LimitError, Limits, check_request_caps, decode_base64_image_bytes
from nbkit.webui.service import GenerationService, cuda_memory


class ApiError(Exception):
    """An error answered as A1111 answers: JSON `{error, detail, body, errors}` with `status`."""

    def __init__(self, status: int, detail: str, error: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or type(self).__name__


# --- request models (A1111's fields and defaults; unknown fields are ignored) ------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = DISTILLED_CFG_SCALE  # Forge's field: FLUX.1-dev's distilled guidance
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    """POST /sdapi/v1/img2img (with `mask`: inpainting)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


# --- conversions -------------------------------------------------------------------------------------


def decode_image(text: str, limits: Limits, what: str) -> Image.Image:
    """A PIL image from base64 (raw or `data:` URL), refused above the byte and pixel caps."""
    data = decode_base64_image_bytes(text, limits, what)
    try:
        image = Image.open(io.BytesIO(data))
        # Check the header's size before decoding pixels: a small file can declare a huge image.
        if image.width * image.height > 4 * limits.max_pixels:
            raise LimitError(
                f"{what} is {image.width}x{image.height}, above this server's limit",
                fix="send a smaller image",
            )
        image.load()
    except LimitError:
        raise
    except Exception as error:  # PIL raises many types for a broken file
        raise LimitError(f"{what} is not a readable image: {error}", status=422) from None
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Raw base64 of a PNG carrying the infotext in its `parameters` chunk (no `data:` prefix)."""
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text(PNG_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _sampler(body: _Request) -> tuple[str, str]:
    name = body.sampler_name or body.sampler_index or "Euler"
    scheduler = body.scheduler or "Automatic"
    try:
        resolve(name, scheduler)
    except ValueError as error:
        raise ApiError(400, str(error), "SamplerNotFound") from None
    return name, scheduler


def _controlnet(body: _Request, limits: Limits) -> ControlNetUnit | None:
    """The first enabled unit of A1111's ControlNet extension arguments (`alwayson_scripts`)."""
    scripts = {key.lower(): value for key, value in (body.alwayson_scripts or {}).items()}
    args = (scripts.get("controlnet") or {}).get("args") or []
    for unit in args:
        if not isinstance(unit, dict) or unit.get("enabled", True) is False:
            continue
        model = unit.get("model") or "None"
        image = unit.get("input_image") or unit.get("image")
        if isinstance(image, dict):  # newer extension versions: {"image": ..., "mask": ...}
            image = image.get("image")
        if model == "None" or not image:
            continue
        module = str(unit.get("module") or "none").lower()
        preprocessor = "canny" if "canny" in module else "depth" if "depth" in module else "none"
        return ControlNetUnit(
            model=model,
            image=decode_image(image, limits, "the ControlNet input_image"),
            preprocessor=preprocessor,
            weight=float(unit.get("weight", 1.0)),
        )
    return None


def _hires_size(body: Txt2ImgRequest) -> tuple[int, int] | None:
    if not body.enable_hr:
        return None
    if body.hr_resize_x or body.hr_resize_y:
        width = body.hr_resize_x or round(body.width * body.hr_resize_y / body.height)
        height = body.hr_resize_y or round(body.height * body.hr_resize_x / body.width)
        return width, height
    return int(body.width * body.hr_scale), int(body.height * body.hr_scale)


def to_generation_request(body: _Request, limits: Limits) -> GenerationRequest:
    """An A1111 request as nbkit's `GenerationRequest`, after the caps are checked.

    Raises:
        ApiError: an unknown sampler or schedule type (400).
        LimitError: a request above the caps (400/413), or an unreadable image (422).
    """
    hires = body.enable_hr if isinstance(body, Txt2ImgRequest) else False
    final = _hires_size(body) if isinstance(body, Txt2ImgRequest) else None
    check_request_caps(
        width=body.width,
        height=body.height,
        steps=body.steps,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        limits=limits,
        final_size=final,
        second_pass_steps=getattr(body, "hr_second_pass_steps", 0),
    )
    sampler, scheduler = _sampler(body)
    vae = (body.override_settings or {}).get("sd_vae")
    fields: dict[str, Any] = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        distilled_cfg_scale=body.distilled_cfg_scale,
        width=body.width,
        height=body.height,
        sampler_name=sampler,
        scheduler=scheduler,
        vae=None if vae in (None, "", "Automatic", "None") else vae,
        controlnet=_controlnet(body, limits),
        save_images=body.save_images,
    )
    if isinstance(body, Txt2ImgRequest):
        fields.update(mode="txt2img", enable_hr=hires)
        if hires:
            upscaler = body.hr_upscaler or "Latent"
            fields.update(
                hr_scale=(final[0] / body.width) if final else body.hr_scale,
                hr_upscaler=upscaler,
                hr_second_pass_steps=body.hr_second_pass_steps,
                denoising_strength=body.denoising_strength if body.denoising_strength is not None else 0.7,
            )
    else:
        assert isinstance(body, Img2ImgRequest)
        if not body.init_images:
            raise ApiError(
                422, "img2img needs init_images: a list with at least one base64 image", "ValidationError"
            )
        fields.update(
            mode="inpaint" if body.mask else "img2img",
            init_image=decode_image(body.init_images[0], limits, "init_images[0]"),
            mask=decode_image(body.mask, limits, "mask") if body.mask else None,
            mask_blur=body.mask_blur
            if body.mask_blur is not None
            else max(body.mask_blur_x, body.mask_blur_y),
            inpainting_fill=body.inpainting_fill,
            inpainting_mask_invert=bool(body.inpainting_mask_invert),
            resize_mode=body.resize_mode,
            denoising_strength=body.denoising_strength,
        )
    return GenerationRequest(**fields)


def build_info(body: _Request, request: GenerationRequest, output: GenerationOutput) -> dict[str, Any]:
    """The `info` dict of A1111's txt2img/img2img response (sent as a JSON string)."""
    seeds = output.seeds
    model = output.model
    count = len(output.images)
    sampler, _schedule = resolve(request.sampler_name, request.scheduler)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": list(seeds),
        "subseed": body.subseed if body.subseed != -1 else (seeds[0] if seeds else -1),
        "all_subseeds": [body.subseed] * count if body.subseed != -1 else list(seeds),
        "subseed_strength": body.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler.name,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.model_name if model else None,
        "sd_model_hash": model.hash if model else None,
        "sd_vae_name": request.vae,
        "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": request.denoising_strength
        if request.mode != "txt2img" or request.enable_hr
        else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(output.infotexts),
        "styles": list(body.styles),
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": _version(),
        "interrupted": output.interrupted,
    }


def _version() -> str:
    from nbkit.generation.generate import VERSION

    return VERSION


def _parameters(body: _Request) -> dict[str, Any]:
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None  # as A1111: the images are not echoed unless asked for
        parameters["mask"] = None
    return parameters


def memory_info() -> dict[str, Any]:
    """A1111's GET /memory: RAM from psutil, CUDA from torch when a GPU is there."""
    import psutil

    vm = psutil.virtual_memory()
    process = psutil.Process()
    ram = {"free": vm.available, "used": process.memory_info().rss, "total": vm.total}
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        cuda = cuda_memory()
    except Exception as error:  # no torch, no GPU: A1111 reports the reason the same way
        cuda = {"error": str(error)}
    return {"ram": ram, "cuda": cuda}


# --- the router --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ApiState:
    """What the API handlers share: the service, its queue, the caps and A1111's option values."""

    service: GenerationService
    queue: GpuQueue
    limits: Limits = dataclasses.field(default_factory=Limits)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


async def run_queued(state: ApiState, job: Any) -> Any:
    """Queue `job` on the GPU queue and wait for it without holding a thread."""
    return await asyncio.wrap_future(state.queue.submit(job))


def current_title(service: GenerationService) -> str | None:
    """The loaded checkpoint's title, else the one that will load first."""
    if service.current is not None:
        return service.current.title
    wanted = getattr(service, "_wanted", None)
    if wanted:
        try:
            return service.catalog.find(wanted).title
        except NbkitError:
            return wanted
    return service.catalog.checkpoints[0].title if service.catalog.checkpoints else None


def create_router(state: ApiState) -> APIRouter:
    """The `/sdapi/v1` routes on `state`."""
    router = APIRouter(prefix="/sdapi/v1")
    for add_routes in (_generation_routes, _model_routes, _list_routes, _progress_routes, _info_routes):
        add_routes(router, state)
    return router


def _checkpoint(service: GenerationService, key: Any) -> str:
    """The title of a listed checkpoint (A1111 accepts a title, a name or a hash; never a new path)."""
    if not isinstance(key, str) or not key.strip():
        raise ApiError(400, "sd_model_checkpoint must be a checkpoint title, name or hash")
    try:
        return service.catalog.find(key).title
    except NbkitError as error:
        raise ApiError(400, str(error), "CheckpointNotFound") from None


def _generation_routes(router: APIRouter, state: ApiState) -> None:
    """txt2img and img2img (with `override_settings.sd_model_checkpoint`: on that checkpoint)."""
    service = state.service

    async def generate(body: _Request) -> dict[str, Any]:
        request = await run_in_threadpool(to_generation_request, body, state.limits)
        model = (body.override_settings or {}).get("sd_model_checkpoint")
        if model is not None:
            model = _checkpoint(service, model)
        restore = body.override_settings_restore_afterwards

        def job() -> GenerationOutput:
            previous = service.current.title if service.current is not None else None
            if model:
                service.select_model(model)
            try:
                return service.generate(request)
            finally:
                if model and restore and previous and previous != service.current.title:
                    service.select_model(previous)

        output = await run_queued(state, job)
        images = await run_in_threadpool(
            lambda: [
                encode_png(image, text) for image, text in zip(output.images, output.infotexts, strict=True)
            ]
        )
        return {
            "images": images if body.send_images else [],
            "parameters": _parameters(body),
            "info": json.dumps(build_info(body, request, output), ensure_ascii=False),
        }

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        return await generate(body)

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        return await generate(body)


def _model_routes(router: APIRouter, state: ApiState) -> None:
    """The checkpoints, and A1111's options (`sd_model_checkpoint` switches the model)."""
    service = state.service

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [entry.to_api() for entry in service.catalog.checkpoints]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        service.catalog.refresh()

    @router.post("/refresh-loras")
    def refresh_loras() -> None:
        service.catalog.refresh()

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        current = service.current
        return {
            "samples_save": True,
            "samples_format": "png",
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            **state.options,
            "sd_model_checkpoint": current_title(service),
            "sd_checkpoint_hash": current.sha256 if current is not None else None,
        }

    @router.post("/options")
    async def set_options(body: dict[str, Any]) -> None:
        key = body.get("sd_model_checkpoint")
        if key is not None:
            title = _checkpoint(service, key)
            await run_queued(state, lambda: service.select_model(title))
        state.options.update(
            {k: v for k, v in body.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
        )
        return None


def _list_routes(router: APIRouter, state: ApiState) -> None:
    """What there is to choose from: samplers, schedule types, upscalers, LoRAs, VAEs, scripts."""

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return list_samplers()

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return list_schedulers()

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in HR_UPSCALERS
        ]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": "Latent"}]

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [entry.to_api() for entry in state.service.catalog.loras]

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return []

    @router.get("/scripts")
    def scripts() -> dict[str, list]:
        # webuiapi asks for this on connect to learn which extensions are there: none.
        return {"txt2img": [], "img2img": []}


def _progress_routes(router: APIRouter, state: ApiState) -> None:
    """The running job's progress (with a live preview), interrupt and skip."""
    service = state.service

    @router.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        snapshot = service.progress()
        job_count = snapshot.job_count
        if not job_count and state.queue.busy:
            job_count = 1  # a job is queued or loading: not idle yet (clients poll for job_count 0)
        preview = None
        if snapshot.preview is not None and not skip_current_image:
            preview = encode_png(snapshot.preview, None)
        textinfo = snapshot.textinfo or None
        if state.queue.pending:
            textinfo = f"{textinfo or 'Busy'}; {state.queue.pending} waiting in the queue"
        return {
            "progress": snapshot.fraction,
            "eta_relative": snapshot.eta,
            "state": {
                "skipped": snapshot.skipped,
                "interrupted": snapshot.interrupted,
                "stopping_generation": False,
                "job": snapshot.job,
                "job_count": job_count,
                "job_timestamp": datetime.datetime.fromtimestamp(snapshot.started).strftime("%Y%m%d%H%M%S")
                if snapshot.started
                else "0",
                "job_no": snapshot.job_no,
                "sampling_step": snapshot.sampling_step,
                "sampling_steps": snapshot.sampling_steps,
                "queue_pending": state.queue.pending,
            },
            "current_image": preview,
            "textinfo": textinfo,
            "current_task": None,
        }

    @router.post("/interrupt")
    def interrupt() -> dict:
        service.interrupt()
        return {}

    @router.post("/skip")
    def skip() -> None:
        service.skip()


def _info_routes(router: APIRouter, state: ApiState) -> None:
    """PNG info (an image's infotext) and memory."""

    @router.post("/png-info")
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        data = decode_base64_image_bytes(body.image, state.limits, "image")
        try:
            with Image.open(io.BytesIO(data)) as image:
                items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        except Exception as error:
            raise ApiError(422, f"image is not a readable image: {error}") from None
        text = read_infotext(data)
        items.pop(PNG_KEY, None)
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        return {"info": text, "items": items, "parameters": parse_infotext(text).to_a1111()}

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return memory_info()


# --- errors ------------------------------------------------------------------------------------------


def _error(status: int, error: str, detail: Any, errors: Any = None, body: Any = "") -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": error,
            "detail": detail,
            "body": body,
            "errors": errors if errors is not None else detail,
        },
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of the API routes in A1111's JSON error shape (gradio's mount keeps its own)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.error, error.detail)

    @app.exception_handler(QueueFull)
    async def _queue_full(_request: Request, error: QueueFull) -> JSONResponse:
        return _error(503, "QueueFull", f"busy: {error}")

    @app.exception_handler(LimitError)
    async def _limit(_request: Request, error: LimitError) -> JSONResponse:
        return _error(error.status, "LimitExceeded" if error.status != 422 else "ValidationError", str(error))

    @app.exception_handler(NbkitError)
    async def _nbkit(_request: Request, error: NbkitError) -> JSONResponse:
        return _error(400, type(error).__name__, str(error))

    @app.exception_handler(ValueError)
    async def _value(_request: Request, error: ValueError) -> JSONResponse:
        return _error(400, "ValueError", str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {key: value for key, value in item.items() if key in ("loc", "msg", "type")}
            for item in error.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in errors)
        return _error(422, "RequestValidationError", detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        response = _error(error.status_code, "HTTPException", error.detail, str(error.detail))
        response.headers.update(getattr(error, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        return _error(500, type(error).__name__, str(error))
