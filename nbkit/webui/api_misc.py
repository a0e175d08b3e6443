"""A1111's other API routes: embeddings, styles, interrogate, unload/reload, lists, flags, sysinfo.

Under `/sdapi/v1` (`misc_routes`), with A1111's paths and response shapes:
- `GET embeddings` (`{loaded, skipped}`: those that fit the loaded model and those that do not),
  `POST refresh-embeddings`; `GET prompt-styles` (`[{name, prompt, negative_prompt}]`).
- `POST interrogate` (`{image, model}` -> `{caption}`): `clip` captions with CLIP
  (`nbkit.vision.interrogate`); any other model (A1111's `deepdanbooru` too) is A1111's 404 "Model not
  found". It runs through the GPU queue.
- `POST unload-checkpoint` frees the model's memory; `POST reload-checkpoint` loads it again (a request
  does too); both through the queue, both answer `{}` as A1111.
- `GET sd-vae` and Forge's `GET sd-modules` list `<root>/vae/` (`nbkit.webui.vaes`), `POST refresh-vae`;
  `GET face-restorers`, `hypernetworks` and `extensions` are empty lists (nbkit has none of these:
  A1111 lists only extensions installed from a repository), `GET cmd-flags` is A1111's flag names with
  nbkit's values (never a credential).
- `POST create/embedding`, `create/hypernetwork`, `train/embedding`, `train/hypernetwork`: 501 saying
  what nbkit trains instead.
Under `/internal` (`internal_routes`): `GET ping` (`{}`) and `GET sysinfo` (A1111's JSON text, with
no secret in it: `nbkit.webui.sysinfo`).

`misc_router` makes one router of both for `nbkit.webui.server.create_app`.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from nbkit.webui.api import ApiState, current_title, run_queued
from nbkit.webui.api_types import STRICT, ApiError, Name, decode_image
from nbkit.webui.sysinfo import sysinfo_text, system_info
from nbkit.webui.vaes import list_vaes

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class InterrogateRequest(BaseModel):
    """POST /sdapi/v1/interrogate (A1111's fields and defaults)."""

    model_config = STRICT
    image: Annotated[str, Field(description="the image, base64 (raw or a data: URL)")] = ""
    model: Name = "clip"


def misc_router(state: ApiState) -> APIRouter:
    """The routes of this module: `misc_routes` under `/sdapi/v1`, `internal_routes` under `/internal`."""
    router = APIRouter()
    for prefix, add_routes in (("/sdapi/v1", misc_routes), ("/internal", internal_routes)):
        group = APIRouter(prefix=prefix)
        add_routes(group, state)
        router.include_router(group)
    return router


def misc_routes(router: APIRouter, state: ApiState) -> None:
    """A1111's `/sdapi/v1` routes listed in the module docstring."""
    _embedding_routes(router, state)
    _interrogate_route(router, state)
    _checkpoint_routes(router, state)
    _list_routes(router, state)
    _training_routes(router)


# A1111's routes that train textual inversions and hypernetworks. nbkit trains DreamBooth models and
# LoRAs from a session instead, so these answer 501 with the way to do it, not a bare 404.
TRAINING_ROUTES = ("/create/embedding", "/create/hypernetwork", "/train/embedding", "/train/hypernetwork")


def _training_routes(router: APIRouter) -> None:
    def not_offered() -> None:
        raise ApiError(
            501,
            "nbkit does not create or train textual inversions or hypernetworks; it trains DreamBooth "
            "models and LoRAs from a session (`nbkit train`, the fast-DreamBooth notebook)",
            "NotImplemented",
        )

    for path in TRAINING_ROUTES:
        # Not operations nbkit offers, so not in its schema (a client reading /openapi.json sees what works).
        router.add_api_route(
            path, not_offered, methods=["POST"], response_model=None, include_in_schema=False
        )


def _embedding_routes(router: APIRouter, state: ApiState) -> None:
    service = state.service

    @router.get("/embeddings")
    def embeddings() -> dict[str, dict[str, dict[str, Any]]]:
        return service.embedding_listing()

    @router.post("/refresh-embeddings")
    async def refresh_embeddings(http: Request) -> None:
        # In the queue, as A1111 holds its queue lock: never while a request loads embeddings.
        await run_queued(state, service.embeddings.refresh, http)

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, str]]:
        return [style.to_api() for style in service.styles.styles.values()]


def _interrogate_route(router: APIRouter, state: ApiState) -> None:
    from nbkit.vision.interrogate import MODELS

    service = state.service
    loaded: dict[str, Any] = {}  # the interrogator, once loaded

    def caption(image: Any) -> str:
        from nbkit.vision.interrogate import load_interrogator

        if "clip" not in loaded:
            loaded["clip"] = load_interrogator(device=str(service.device))
        interrogator = loaded["clip"]
        model = interrogator.backbone.model
        model.to(service.device)
        try:
            return interrogator.caption(image)
        finally:
            if service.device.type == "cuda":
                model.to("cpu")  # as A1111: kept in RAM between uses, the GPU left to the checkpoint

    @router.post("/interrogate")
    async def interrogate(body: InterrogateRequest, http: Request) -> dict[str, str]:
        if not body.image:
            raise ApiError(404, "Image not found")
        if body.model not in MODELS:
            raise ApiError(404, f"Model not found: nbkit interrogates with {', '.join(MODELS)}")
        image = await run_in_threadpool(decode_image, body.image, state.limits, "image")
        return {"caption": await run_queued(state, lambda: caption(image), http)}


def _checkpoint_routes(router: APIRouter, state: ApiState) -> None:
    service = state.service

    @router.post("/unload-checkpoint")
    async def unload_checkpoint(http: Request) -> dict:
        await run_queued(state, service.unload_checkpoint, http)
        return {}

    @router.post("/reload-checkpoint")
    async def reload_checkpoint(http: Request) -> dict:
        await run_queued(state, service.ensure_model, http)
        return {}

    @router.get("/cmd-flags")
    def cmd_flags(http: Request) -> dict[str, Any]:
        return command_flags(state, http)


def _list_routes(router: APIRouter, state: ApiState) -> None:
    service = state.service

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, str]]:
        return [entry.to_api() for entry in list_vaes(service.catalog.storage_root)]

    @router.get("/sd-modules")
    def sd_modules() -> list[dict[str, str]]:
        # Forge's list of separate VAEs and text encoders: nbkit's VAEs (text encoders come with models).
        return [entry.to_api() for entry in list_vaes(service.catalog.storage_root)]

    @router.post("/refresh-vae")
    def refresh_vae() -> None:
        return None  # the folder is read on every listing

    @router.get("/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @router.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return []

    @router.get("/extensions")
    def extensions() -> list[dict[str, Any]]:
        return []


def command_flags(state: ApiState, http: Request) -> dict[str, Any]:
    """A1111's command-line flags (`vars(cmd_opts)`) with nbkit's values; A1111's defaults for the
    ones nbkit has no counterpart of. Credentials are never given (A1111 would echo `--api-auth`)."""
    service = state.service
    root = service.catalog.storage_root
    cpu = service.device.type == "cpu"
    server = http.scope.get("server") or (None, None)

    def folder(name: str) -> str | None:
        return str(root / name) if root is not None else None

    return {
        "data_dir": str(root) if root is not None else None,
        "models_dir": folder("models"),
        "ckpt": current_title(service),
        "ckpt_dir": folder("models"),
        "vae_dir": folder("vae"),
        "vae_path": None,
        "embeddings_dir": folder("embeddings"),
        "hypernetwork_dir": None,
        "lora_dir": folder("loras"),
        "styles_file": [folder("styles.csv")] if root is not None else [],
        "esrgan_models_path": folder("upscalers"),
        "realesrgan_models_path": folder("upscalers"),
        "no_half": cpu,
        "no_half_vae": cpu,
        "precision": "full" if cpu else "autocast",
        "upcast_sampling": False,
        "lowvram": service.low_vram,
        "medvram": False,
        "medvram_sdxl": False,
        "lowram": False,
        "use_cpu": ["all"] if cpu else [],
        "xformers": service.attention == "xformers",
        "opt_sdp_attention": service.attention == "sdpa",
        "listen": server[0] not in (*LOOPBACK, None),  # the address this request reached
        "port": server[1],
        "server_name": None,
        "share": False,
        "ngrok": None,
        "api": True,
        "nowebui": False,
        "api_auth": None,
        "gradio_auth": None,
        "api_log": False,
        "api_server_stop": False,
        "skip_torch_cuda_test": cpu,
        "no_hashing": False,
        "no_download_sd_model": True,
        "disable_safe_unpickle": False,
        "freeze_settings": False,
        "hide_ui_dir_config": False,
        "enable_insecure_extension_access": False,
        "allow_code": False,
        "device_id": None,
        "subpath": None,
        "tls_keyfile": None,
        "tls_certfile": None,
        "cors_allow_origins": None,
        "cors_allow_origins_regex": None,
    }


def internal_routes(router: APIRouter, state: ApiState) -> None:
    """A1111's `/internal/ping` and `/internal/sysinfo`."""

    @router.get("/ping")
    def ping() -> dict:
        return {}

    @router.get("/sysinfo", response_class=PlainTextResponse)
    def sysinfo() -> PlainTextResponse:
        service = state.service
        root = service.catalog.storage_root
        config = {**state.options, "sd_model_checkpoint": current_title(service)}
        info = system_info(data_path=str(root) if root is not None else None, config=config)
        name = f"sysinfo-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d-%H-%M')}.json"
        return PlainTextResponse(
            sysinfo_text(info), headers={"Content-Disposition": f'inline; filename="{name}"'}
        )
