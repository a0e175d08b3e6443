"""AUTOMATIC1111's REST API under `/sdapi/v1`, on nbkit's generation service.

Field names, defaults and response shapes follow A1111 (see the compatibility notes), so its clients
(`webuiapi`, scripts written against A1111) work unchanged: `images` are raw base64 PNGs carrying
the `parameters` chunk, `parameters` echoes the request, `info` is a JSON *string*. Unknown request
fields are ignored.

Defaults: a value the client sends is used as sent. A field it leaves out keeps A1111's declared
default (50 steps, CFG 7, Euler, the "Latent" hires upscaler), except where the loaded model has its
own settings (`Family.generation_defaults` with `own`): then `steps`, `cfg_scale`, `sampler_name` and
`scheduler` left out take the model's (Z-Image-Turbo: 8 steps at CFG 1; FLUX.2 [klein] distilled: 4
steps at CFG 1; their base models: 50 steps at CFG 5 and 4), and `hr_upscaler` left out is a pixel
upscaler (Lanczos) for a model whose latents cannot be upscaled (FLUX.1, Z-Image, FLUX.2). `info`
reports the values that ran. A 422 (a malformed request: a non-finite number, a value out of range, an
unknown option or always-on script, an unreadable image) has FastAPI's own body,
`{"detail": [{"type", "loc", "msg", "input", ...}]}` with each field's path in `loc`, as A1111 answers
its validation errors. Every other error is A1111's JSON `{"error", "detail", "body", "errors"}` with a
status: 400 for a bad value (a sampler, a size over the caps), 404 for what is not there (a checkpoint,
img2img's init images), 413 for an oversized body or image, 503 with `Retry-After` when the queue is
full or a training run holds the GPU, and 500 with a request id (in the body and the `X-Request-ID`
header, and logged with its traceback) for anything unexpected.

Images are sent (and saved) in the `samples_format` option (`png`, `jpg`, `webp`, with `jpeg_quality`,
`webp_lossless` and `enable_pnginfo`), set with POST /options or for one request in `override_settings`.

A queued request whose client disconnects is withdrawn before it starts (`run_queued`), so it never
holds the GPU; the running one is stopped only by `/interrupt` or `/skip`, as in A1111.

The request models and their translation to nbkit's `GenerationRequest` are in `nbkit.webui.api_models`;
this module has the routes and the error handlers. Every generation (and every model switch) runs through the one `GpuQueue`; the handlers are async
and wait on the job's future, so a burst of waiting requests holds no threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import json
import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nbkit.errors import NbkitError
from nbkit.generation.infotext import PNG_KEY, parse_infotext, read_infotext
from nbkit.generation.samplers import list_samplers, list_schedulers
from nbkit.webui import controlnet as cn
from nbkit.webui.api_extras import extras_routes
from nbkit.webui.api_models import (
    OPTION_DEFAULTS,
    OPTION_TYPES,
    ApiRequest,
    ErrorResponse,
    ImageResponse,
    Img2ImgRequest,
    MemoryResponse,
    Options,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
    build_info,
    echo_parameters,
    effective_options,
    image_format,
    known_overrides,
    to_generation_request,
)
from nbkit.webui.api_types import ApiError, close_names, encode_b64, encode_png, field_error, image_bytes
from nbkit.webui.controlnet_units import ALWAYSON_SCRIPTS
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.requests import GenerationOutput, GenerationRequest
from nbkit.webui.security import LimitError, Limits
from nbkit.webui.service import GenerationService, cuda_memory
from nbkit.webui.vaes import vae_source

logger = logging.getLogger(__name__)
# How often a waiting request checks whether its client is still there (a check is one receive() poll).
DISCONNECT_POLL_SECONDS = 0.25


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

    async def run(self, job: Callable[[], Any], request: Request | None = None) -> Any:
        """`run_queued` on this state (for route modules that `api` itself imports)."""
        return await run_queued(self, job, request)


async def run_queued(state: ApiState, job: Callable[[], Any], request: Request | None = None) -> Any:
    """Queue `job` on the GPU queue and wait for it without holding a thread.

    While it waits its turn, `request`'s client is checked every `DISCONNECT_POLL_SECONDS`: when it
    has gone, the job is withdrawn from the queue and never runs. Once running it runs to the end (or
    to `/interrupt`), as in A1111.

    Raises:
        ApiError: 499 when the client disconnected before the job started (nobody reads the answer).
    """
    future = state.queue.submit(job)
    waiting = asyncio.wrap_future(future)
    while request is not None and not future.running() and not future.done():
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            break
        if await request.is_disconnected() and state.queue.cancel(future):
            waiting.cancel()
            raise ApiError(499, "the client disconnected before its request started", "ClientDisconnected")
    return await waiting


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


# The error answers any API route may give besides its own (FastAPI documents a 422 where a route reads a
# body or parameters), in A1111's error body; `document_errors` adds them to every operation of the schema.
ERROR_STATUSES = {
    400: "a bad value (an unknown sampler, a size or step count over this server's caps)",
    401: "no or wrong login (HTTP Basic), when the server has one",
    404: "not found (a checkpoint, img2img's init images)",
    413: "a request body or image over this server's byte caps",
    500: "an unexpected error: the request id is in the detail and the X-Request-ID header",
    503: "busy: the queue is full or a training run holds the GPU (see Retry-After)",
}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (an OpenAPI document) with `ERROR_STATUSES` on every operation, whichever router added it."""
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = (
        ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses.setdefault(str(status), {"description": description, "content": content})
    return schema


def create_router(state: ApiState) -> APIRouter:
    """The `/sdapi/v1` routes on `state`."""
    router = APIRouter(prefix="/sdapi/v1")
    routes = (_generation_routes, _model_routes, _list_routes, _progress_routes, _info_routes, extras_routes)
    for add_routes in routes:
        add_routes(router, state)
    return router


def _checkpoint(service: GenerationService, key: Any) -> str:
    """The title of a listed checkpoint (A1111 accepts a title, a name or a hash; never a new path).

    Raises:
        ApiError: 404 for a checkpoint that is not listed.
    """
    if not isinstance(key, str) or not key.strip():
        raise ApiError(400, "sd_model_checkpoint must be a checkpoint title, name or hash")
    try:
        return service.catalog.find(key).title
    except NbkitError as error:
        raise ApiError(404, str(error), "CheckpointNotFound") from None


def _inside_storage(service: GenerationService, path: str) -> bool:
    """Whether `path` is inside the storage root or the session: a client names files there (A1111 takes
    names from its own folders); any other path would let it probe the server's files and make it
    parse them."""
    catalog = service.catalog
    folders = [catalog.storage_root, getattr(catalog.session, "path", None)]
    resolved = Path(path).expanduser().resolve()
    return any(folder is not None and resolved.is_relative_to(Path(folder).resolve()) for folder in folders)


def _where(service: GenerationService) -> Any:
    return service.catalog.storage_root if service.catalog.storage_root is not None else "the storage root"


def _check_vae_path(service: GenerationService, vae: str) -> None:
    """A client names a VAE inside the storage root or the session (`_inside_storage`)."""
    if not _inside_storage(service, vae):
        raise ApiError(
            400, f"sd_vae {vae!r}: the API opens VAE files and folders only inside {_where(service)}"
        )


def _check_controlnet_paths(service: GenerationService, request: GenerationRequest) -> None:
    """A unit names a ControlNet by name (the registry's, a hub repo id, a folder in `<root>/controlnet/`);
    a path is taken only inside the storage root or the session (`_inside_storage`)."""
    for unit in request.controlnet:
        model = unit.model.strip()
        if cn.is_registry_name(model) or not any(mark in model for mark in ("/", "\\", "~")):
            continue
        if not _inside_storage(service, model):
            raise ApiError(
                400,
                f"ControlNet model {model!r}: the API opens ControlNet folders "
                f"only inside {_where(service)}; put the folder in <root>/controlnet/ and give its name",
            )


def _generation_routes(router: APIRouter, state: ApiState) -> None:
    """txt2img and img2img (with `override_settings.sd_model_checkpoint`: on that checkpoint)."""
    service = state.service

    async def generate(body: ApiRequest, http: Request) -> dict[str, Any]:
        options = effective_options(state.options, body)
        request = await run_in_threadpool(to_generation_request, body, state.limits, options)
        if request.vae:
            request = dataclasses.replace(request, vae=vae_source(service.catalog.storage_root, request.vae))
            _check_vae_path(service, request.vae)
        _check_controlnet_paths(service, request)
        overrides = known_overrides(body)
        model = overrides.get("sd_model_checkpoint")
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

        output = await run_queued(state, job, http)
        if not restore:  # as A1111: the overrides stay set (the checkpoint already stays switched)
            state.options.update(
                {k: v for k, v in overrides.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
            )
        fmt = image_format(options)
        images = await run_in_threadpool(
            lambda: [
                encode_b64(image, text, fmt)
                for image, text in zip(output.images, output.infotexts, strict=True)
            ]
        )
        return {
            "images": images if body.send_images else [],
            "parameters": echo_parameters(body),
            # `output.request`: the request as it ran, with the model's defaults for what it left out.
            "info": json.dumps(build_info(body, output.request, output), ensure_ascii=False),
        }

    @router.post("/txt2img", response_model=ImageResponse)
    async def txt2img(body: Txt2ImgRequest, http: Request) -> dict[str, Any]:
        return await generate(body, http)

    @router.post("/img2img", response_model=ImageResponse)
    async def img2img(body: Img2ImgRequest, http: Request) -> dict[str, Any]:
        return await generate(body, http)


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
            **OPTION_DEFAULTS,
            **state.options,
            "sd_model_checkpoint": current_title(service),
            "sd_checkpoint_hash": current.sha256 if current is not None else None,
        }

    @router.post("/options")
    async def set_options(body: Options, http: Request) -> None:  # type: ignore[valid-type]
        # Only A1111's option names (`OPTION_TYPES`) with typed values get here, so the store is bounded.
        given = body.model_dump(exclude_unset=True)
        vae = given.get("sd_vae")
        if vae not in (None, "", "Automatic", "None"):
            # checked now, not at the next generation: a bad stored VAE would fail every request after it
            _check_vae_path(service, vae)
            if not Path(vae).expanduser().exists():
                raise ApiError(404, f"sd_vae {vae!r} does not exist", "VaeNotFound")
        key = given.get("sd_model_checkpoint")
        if key is not None:
            title = _checkpoint(service, key)
            await run_queued(state, lambda: service.select_model(title), http)
        state.options.update(
            {k: v for k, v in given.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
        )
        return None


def _list_routes(router: APIRouter, state: ApiState) -> None:
    """What there is to choose from: samplers, schedule types, LoRAs."""

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return list_samplers()

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return list_schedulers()

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [entry.to_api() for entry in state.service.catalog.loras]


def _progress_routes(router: APIRouter, state: ApiState) -> None:
    """The running job's progress (with a live preview), interrupt and skip."""
    service = state.service

    @router.get("/progress", response_model=ProgressResponse)
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

    @router.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        data = image_bytes(body.image, state.limits, "image")
        try:
            with Image.open(io.BytesIO(data)) as image:
                items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        except Exception as error:  # PIL raises many types; its messages name memory addresses
            raise field_error(
                ("image",),
                f"image is not a readable image ({type(error).__name__}): send a PNG, JPEG or WebP",
                value=body.image[:64],
            ) from None
        text = read_infotext(data)
        items.pop(PNG_KEY, None)
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        parameters = state.service.styles.infotext_parameters(parse_infotext(text).to_a1111())
        return {"info": text, "items": items, "parameters": parameters}

    @router.get("/memory", response_model=MemoryResponse)
    def memory() -> dict[str, Any]:
        return memory_info()


# --- errors ------------------------------------------------------------------------------------------


def _error(
    status: int,
    error: str,
    detail: Any,
    errors: Any = None,
    body: Any = "",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": error,
            "detail": detail,
            "body": body,
            "errors": errors if errors is not None else detail,
        },
        headers=headers,
    )


MAX_SHOWN_INPUT = 200  # characters of a refused string shown back in a 422 (a base64 image is megabytes)


def _shown_input(value: Any, depth: int = 0) -> Any:
    """A refused value as the 422 shows it: long strings cut, deep or large containers summarised."""
    if isinstance(value, str):
        return value if len(value) <= MAX_SHOWN_INPUT else value[:MAX_SHOWN_INPUT] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and Infinity are not JSON
    if isinstance(value, dict | list) and (depth > 2 or len(value) > 64):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, dict):
        return {str(key)[:MAX_SHOWN_INPUT]: _shown_input(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_shown_input(item, depth + 1) for item in value]
    return value if value is None or isinstance(value, bool | int | float) else str(value)


def _validation_item(item: dict[str, Any]) -> dict[str, Any]:
    """One validation error as FastAPI's 422 body lists it (`type`, `loc`, `msg`, `input`, `ctx`), with
    the refused input cut short and the close known names for an unknown one."""
    kept: dict[str, Any] = {
        "type": item.get("type", "value_error"),
        "loc": list(item.get("loc") or ()),
        "msg": str(item.get("msg", "")),
    }
    if "input" in item:
        kept["input"] = _shown_input(item["input"])
    if item.get("ctx"):
        kept["ctx"] = {str(key): _shown_input(value) for key, value in item["ctx"].items()}
    loc = kept["loc"]
    if kept["type"] == "extra_forbidden" and loc:
        name = loc[-1]
        if "alwayson_scripts" in loc:
            kept["msg"] = (
                f"always on script {name} not found (nbkit has: {', '.join(ALWAYSON_SCRIPTS)})"
                f"{close_names(str(name), ALWAYSON_SCRIPTS)}"
            )
        else:
            kept["msg"] = f"unknown option {name!r}{close_names(str(name), OPTION_TYPES)}"
    return kept


def validation_response(items: list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    """A 422 in FastAPI's own shape, `{"detail": [{"type", "loc", "msg", "input", ...}]}`."""
    detail = [_validation_item(item) for item in items]
    return JSONResponse(status_code=422, content=jsonable_encoder({"detail": detail}), headers=headers)


def _unplaced(message: Any) -> list[dict[str, Any]]:
    """A 422 that names no field (raised as an error with a status): one item on the body as a whole."""
    return [{"type": "value_error", "loc": ("body",), "msg": str(message)}]


def unexpected_error_response(error: BaseException, method: str, path: str) -> JSONResponse:
    """A 500 for an error nothing else handled: logged with its traceback under a request id that the
    body and the `X-Request-ID` header carry (the body holds no traceback and no message)."""
    request_id = uuid.uuid4().hex[:16]
    logger.error(
        "request %s (%s %s) failed: %s", request_id, method, path, type(error).__name__, exc_info=error
    )
    return _error(
        500,
        "InternalServerError",
        f"unexpected {type(error).__name__} (request id {request_id}); the server log has the details",
        headers={"X-Request-ID": request_id},
    )


class LastResortMiddleware:
    """ASGI middleware that turns any exception escaping the app into `unexpected_error_response`.

    Starlette's own last-resort handler answers and then re-raises (so the server logs the error a
    second time without the request id); this one answers and stops there. An error after the response
    started cannot be answered: it is logged and re-raised.

    Args:
        app: the ASGI app.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            if started:
                logger.error("request %s %s failed mid-response", scope.get("method"), scope.get("path"))
                raise
            response = unexpected_error_response(error, scope.get("method", ""), scope.get("path", ""))
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of the API routes in A1111's JSON error shape (gradio's mount keeps its own)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        if error.status == 422:
            return validation_response(_unplaced(error.detail))
        return _error(error.status, error.error, error.detail)

    @app.exception_handler(QueueFull)
    async def _queue_full(_request: Request, error: QueueFull) -> JSONResponse:
        return _error(503, "QueueFull", f"busy: {error}", headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(LimitError)
    async def _limit(_request: Request, error: LimitError) -> JSONResponse:
        if error.status == 422:
            return validation_response(_unplaced(error))
        return _error(error.status, "LimitExceeded", str(error))

    @app.exception_handler(NbkitError)
    async def _nbkit(_request: Request, error: NbkitError) -> JSONResponse:
        return _error(400, type(error).__name__, str(error))

    @app.exception_handler(ValueError)
    async def _value(_request: Request, error: ValueError) -> JSONResponse:
        return _error(400, "ValueError", str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer (A1111 keeps it), each refused input cut short
        return validation_response(list(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = getattr(error, "headers", None) or None
        if error.status_code == 422:
            return validation_response(_unplaced(error.detail), headers)
        # A1111's answer to an HTTPException: `errors` is the exception as text ("404: Not Found")
        return _error(
            error.status_code,
            "HTTPException",
            error.detail,
            f"{error.status_code}: {error.detail}",
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # Reached only without `LastResortMiddleware` (which answers first); the same answer.
        return unexpected_error_response(error, request.method, request.url.path)
