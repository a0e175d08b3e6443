"""The web UI's Extras tab, as A1111's: upscale a picture with one or two upscalers.

The picture, Upscaler 1 and 2 (with the second's visibility), "Scale by" a factor or "Scale to" a size
(with "Crop to fit"), and the result with its info. The job runs through the `GpuQueue` like a
generation (`nbkit.generation.extras.run_extras`), capped by the server's `Limits`. The upscaler menus
(and the hires fix's) list the upscalers folder afresh when the page opens and on ↻.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.extras import FACE_RESTORATION_NOTE, ExtrasSettings, run_extras
from nbkit.generation.hires import LATENT_UPSCALERS
from nbkit.generation.infotext import format_parameters
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.security import LimitError, Limits, check_size
from nbkit.webui.service import GenerationService


def _upscale(service: GenerationService, queue: GpuQueue, limits: Limits) -> Any:
    def run(
        image: Image.Image | None,
        upscaler_1: str,
        upscaler_2: str,
        visibility: float,
        resize_mode: int,
        scale: float,
        width: float,
        height: float,
        crop: bool,
    ) -> tuple[Any, str]:
        if image is None:
            raise gr.Error("Drop a picture into the Source box first")
        settings = ExtrasSettings(
            resize_mode=int(resize_mode or 0),
            upscaling_resize=float(scale),
            upscaling_resize_w=int(width),
            upscaling_resize_h=int(height),
            upscaling_crop=bool(crop),
            upscaler_1=upscaler_1 or "None",
            upscaler_2=upscaler_2 or "None",
            extras_upscaler_2_visibility=float(visibility or 0),
        )
        upscalers = service.upscalers
        try:
            settings.check(upscalers)
            for size in settings.output_sizes(image.width, image.height):
                check_size(*size, limits, what="the upscaled picture")
            for name in {settings.upscaler_1, settings.upscaler_2} - {"None"}:
                info = upscalers.find(name)
                if info.known is not None and not info.downloaded:
                    gr.Info(f"Downloading {info.name} (first use)")
                    upscalers.fetch(info.known)  # before queueing: the queue never waits on a download
            result, info = queue.run(
                lambda: run_extras(image, settings, upscalers, max_pixels=limits.max_pixels)
            )
        except QueueFull as error:
            raise gr.Error(f"Busy: {error}") from None
        except (NbkitError, ValueError, LimitError) as error:
            raise gr.Error(str(error)) from None
        text = format_parameters(info) or "No upscaler chosen: the picture is unchanged"
        return result, f"<p>{html.escape(text)}</p>"

    return run


def extras_tab(
    blocks: gr.Blocks, service: GenerationService, queue: GpuQueue, limits: Limits, panels: dict[str, Any]
) -> dict[str, Any]:
    """The Extras tab; returns its components (`image`: the source, for PNG Info's "Send to extras").

    Args:
        blocks: the UI's Blocks (the menus are filled when a page opens).
        service: the generation service (its `upscalers`).
        queue: the GPU queue.
        limits: the request caps.
        panels: the generation panels (the txt2img hires fix's upscaler menu is refreshed with these).
    """
    names = service.upscalers.names()
    side = int(limits.max_pixels**0.5)
    with gr.Tab("Extras", id="extras"), gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", image_mode="RGB", height=360, elem_id="extras-image")
            with gr.Row():
                upscaler_1 = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id="extras-upscaler-1")
                refresh = gr.Button("↻", elem_classes="nbkit-tool", scale=0, elem_id="extras-refresh")
            with gr.Row():
                upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras-upscaler-2")
                visibility = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility")
            resize_mode = gr.State(0)
            with gr.Tabs():
                with gr.Tab("Scale by", id="extras-scale-by") as scale_by:
                    scale = gr.Slider(1, 8, value=2, step=0.05, label="Resize", elem_id="extras-scale")
                with gr.Tab("Scale to", id="extras-scale-to") as scale_to:
                    with gr.Row():
                        width = gr.Slider(64, side, value=512, step=8, label="Width")
                        height = gr.Slider(64, side, value=512, step=8, label="Height")
                    crop = gr.Checkbox(value=True, label="Crop to fit")
            go = gr.Button("Generate", variant="primary", elem_id="extras-generate")
        with gr.Column():
            result = gr.Image(
                label="Result", type="pil", interactive=False, height=360, elem_id="extras-result"
            )
            info = gr.HTML(elem_id="extras-info")
            gr.Markdown(f"*{FACE_RESTORATION_NOTE}.*")
    scale_by.select(lambda: 0, outputs=resize_mode)
    scale_to.select(lambda: 1, outputs=resize_mode)
    go.click(
        _upscale(service, queue, limits),
        inputs=[image, upscaler_1, upscaler_2, visibility, resize_mode, scale, width, height, crop],
        outputs=[result, info],
        concurrency_limit=None,
    )

    hires = [panel.fields["hr_upscaler"] for panel in panels.values() if "hr_upscaler" in panel.fields]

    def menus() -> list[Any]:
        offered = service.upscalers.names()
        return [gr.Dropdown(choices=offered)] * 2 + [
            gr.Dropdown(choices=[*LATENT_UPSCALERS, *offered]) for _ in hires
        ]

    refresh.click(menus, outputs=[upscaler_1, upscaler_2, *hires], concurrency_limit=None)
    blocks.load(menus, outputs=[upscaler_1, upscaler_2, *hires])
    return {"image": image, "upscaler_1": upscaler_1, "result": result, "info": info}
