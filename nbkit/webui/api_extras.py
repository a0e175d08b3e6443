"""A1111's extras routes and upscaler lists under `/sdapi/v1`.

`POST /extra-single-image` and `POST /extra-batch-images` take A1111's `ExtrasSingleImageRequest` /
`ExtrasBatchImagesRequest` fields (`nbkit.generation.extras.ExtrasSettings`) and answer
`{"html_info", "image"}` / `{"html_info", "images"}`: raw base64 images in the `samples_format` option
(PNG by default, keeping the input's text chunks and adding A1111's `postprocessing` chunk, as A1111
sends them). The work runs through the one `GpuQueue`, one picture at a time (each decoded only when
its turn comes); a known model upscaler not downloaded yet is fetched before the job queues, so a
download never holds the queue. The result's size is capped by
`Limits.max_pixels`, the batch's length by `Limits.max_images`. A field sent as `null` takes its default.

`GET /upscalers` lists "None" first, then "Lanczos", "Nearest" and every model upscaler (A1111's
`UpscalerItem`s), `GET /latent-upscale-modes` the hires fix's latent modes, `GET /realesrgan-models`
the Real-ESRGAN models nbkit knows.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Request
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from nbkit.generation.extras import FACE_RESTORATION_NOTE, ExtrasSettings, run_extras, uses_face_restoration
from nbkit.generation.hires import LATENT_UPSCALERS
from nbkit.generation.infotext import PNG_KEY, format_parameters
from nbkit.generation.upscalers import KNOWN_UPSCALERS
from nbkit.webui.api_models import OPTION_DEFAULTS, image_format
from nbkit.webui.api_types import MAX_LIST_ITEMS, STRICT, ApiError, Fraction, Name, decode_image
from nbkit.webui.outputs import PNG, ImageFormat, encode_image
from nbkit.webui.security import LimitError, Limits, check_size, decode_base64_image_bytes

if TYPE_CHECKING:
    from nbkit.webui.api import ApiState

POSTPROCESSING_KEY = "postprocessing"  # A1111's PNG chunk of the extras' info
INT32 = 2**31 - 1


class _NullIsDefault(BaseModel):
    """A field sent as `null` takes its default, as for the generation requests."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class ExtrasBaseRequest(_NullIsDefault):
    """A1111's `ExtrasBaseRequest` (`modules/api/models.py`)."""

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: Fraction = 0.0
    codeformer_visibility: Fraction = 0.0
    codeformer_weight: Fraction = 0.0
    upscaling_resize: Annotated[float, Field(gt=0, le=1024)] = 2.0
    upscaling_resize_w: Annotated[int, Field(ge=1, le=INT32)] = 512
    upscaling_resize_h: Annotated[int, Field(ge=1, le=INT32)] = 512
    upscaling_crop: bool = True
    upscaler_1: Name = "None"
    upscaler_2: Name = "None"
    extras_upscaler_2_visibility: Fraction = 0.0
    upscale_first: bool = False

    def settings(self) -> ExtrasSettings:
        return ExtrasSettings(
            resize_mode=self.resize_mode,
            upscaling_resize=self.upscaling_resize,
            upscaling_resize_w=self.upscaling_resize_w,
            upscaling_resize_h=self.upscaling_resize_h,
            upscaling_crop=self.upscaling_crop,
            upscaler_1=self.upscaler_1,
            upscaler_2=self.upscaler_2,
            extras_upscaler_2_visibility=self.extras_upscaler_2_visibility,
            gfpgan_visibility=self.gfpgan_visibility,
            codeformer_visibility=self.codeformer_visibility,
            codeformer_weight=self.codeformer_weight,
        )


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(_NullIsDefault):
    data: str
    name: Name = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: Annotated[list[FileData], Field(max_length=MAX_LIST_ITEMS)]  # A1111's name


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscalerItem(BaseModel):
    model_config = {"protected_namespaces": ()}
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class RealesrganItem(BaseModel):
    name: str
    path: str | None = None
    scale: int | None = None


def encode_result(image: Image.Image, chunks: dict[str, str], fmt: ImageFormat = PNG) -> str:
    """Raw base64 of the result in the `samples_format`, as A1111's extras send it.

    A PNG carries `chunks` as text chunks (A1111 keeps the input's and adds its own); a JPEG or WebP
    carries only the generation's `parameters`, in the EXIF UserComment, as A1111 writes them.

    Args:
        image: the processed picture.
        chunks: its text chunks.
        fmt: the format from the server's options.
    """
    if fmt.kind != "png":
        return base64.b64encode(encode_image(image, chunks.get(PNG_KEY), fmt)).decode("ascii")
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_info(text: str, settings: ExtrasSettings) -> str:
    """A1111's `html_info`: the info text as an HTML paragraph (plus the face restoration note)."""
    lines = [text] if text else []
    if uses_face_restoration(settings):
        lines.append(FACE_RESTORATION_NOTE)
    return "<p>" + "<br>\n".join(html.escape(line) for line in lines) + "</p>"


def _check(settings: ExtrasSettings, state: ApiState) -> None:
    try:
        settings.check(state.service.upscalers)
    except ValueError as error:
        raise ApiError(400, str(error), "UpscalerNotFound" if "no upscaler" in str(error) else None) from None


def _check_sizes(image: Image.Image, settings: ExtrasSettings, limits: Limits, what: str) -> None:
    for width, height in settings.output_sizes(image.width, image.height):
        check_size(width, height, limits, what=f"the upscaled {what}")


def _process(state: ApiState, settings: ExtrasSettings, encoded: str, what: str) -> tuple[str, str]:
    """One picture's extras inside the GPU job: (base64 image in the samples_format, info text)."""
    image = decode_image(encoded, state.limits, what)
    _check_sizes(image, settings, state.limits, what)
    chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
    result, info = run_extras(image, settings, state.service.upscalers, max_pixels=state.limits.max_pixels)
    text = format_parameters(info)
    if text:
        chunks[POSTPROCESSING_KEY] = text
    return encode_result(result, chunks, image_format({**OPTION_DEFAULTS, **state.options})), text


async def _fetch_models(state: ApiState, settings: ExtrasSettings) -> None:
    """Download the known upscalers a job names before it queues (the queue never waits on a download)."""
    upscalers = state.service.upscalers
    for name in {settings.upscaler_1, settings.upscaler_2} - {"None"}:
        info = upscalers.find(name)
        if info.known is not None and not info.downloaded:
            await run_in_threadpool(upscalers.fetch, info.known)


def extras_routes(router: APIRouter, state: ApiState) -> None:
    """A1111's extras (single and batch), and the upscaler lists."""
    upscalers = state.service.upscalers

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(body: ExtrasSingleImageRequest, http: Request) -> dict[str, Any]:
        settings = body.settings()
        _check(settings, state)
        decode_base64_image_bytes(body.image, state.limits, "image")  # a bad body fails before queueing
        await _fetch_models(state, settings)
        image, text = await state.run(lambda: _process(state, settings, body.image, "image"), http)
        return {"html_info": html_info(text, settings), "image": image}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(body: ExtrasBatchImagesRequest, http: Request) -> dict[str, Any]:
        settings = body.settings()
        _check(settings, state)
        if len(body.imageList) > state.limits.max_images:
            raise LimitError(
                f"imageList has {len(body.imageList)} images, above this server's limit of "
                f"{state.limits.max_images} per request",
                fix="split the batch into several requests",
            )
        for index, item in enumerate(body.imageList):
            decode_base64_image_bytes(item.data, state.limits, f"imageList[{index}]")
        await _fetch_models(state, settings)

        def job() -> list[tuple[str, str]]:
            return [
                _process(state, settings, item.data, f"imageList[{index}]")
                for index, item in enumerate(body.imageList)
            ]

        results = await state.run(job, http)
        text = results[-1][1] if results else ""  # A1111 reports the last picture's info
        return {"html_info": html_info(text, settings), "images": [image for image, _ in results]}

    @router.get("/upscalers", response_model=list[UpscalerItem])
    def list_upscalers() -> list[dict[str, Any]]:
        return [info.to_api() for info in upscalers.list()]

    @router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/realesrgan-models", response_model=list[RealesrganItem])
    def realesrgan_models() -> list[dict[str, Any]]:
        listed = {info.name: info for info in upscalers.list()}
        return [
            {
                "name": known.name,
                "path": listed[known.name].to_api()["model_path"] if known.name in listed else known.source,
                "scale": known.scale,
            }
            for known in KNOWN_UPSCALERS.values()
            if known.name.startswith("R-ESRGAN")
        ]
