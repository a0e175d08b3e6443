"""The web UI's tabs besides the generation panels: PNG Info, Outputs and Settings."""

from __future__ import annotations

import html
import os
import tempfile
from typing import Any

import gradio as gr

from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.generation.samplers import SAMPLERS, SCHEDULES
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.security import Limits
from nbkit.webui.service import GenerationService


def _png_info(path: str | None) -> tuple[str, str]:
    if not path:
        return "", ""
    try:
        text = read_infotext(path)
    except Exception as error:
        gr.Warning(f"Cannot read that file: {error}")
        return "", ""
    if not text:
        return "", "<p>This image has no generation parameters.</p>"
    info = parse_infotext(text)
    rows = "".join(
        f"<tr><td><b>{html.escape(key)}</b></td><td>{html.escape(str(value))}</td></tr>"
        for key, value in info.to_a1111().items()
    )
    return text, f"<table>{rows}</table>"


def _send_to_txt2img(text: str) -> tuple:
    """The txt2img fields an infotext sets (prompt, negative, steps, sampler, schedule, CFG, seed, size)."""
    if not text:
        gr.Warning("Drop an image with generation parameters first")
        return (gr.skip(),) * 10
    info = parse_infotext(text)
    size = info.size
    sampler = info.sampler if info.sampler in SAMPLERS else gr.skip()
    schedule = info.schedule if info.schedule in {s.label for s in SCHEDULES.values()} else gr.skip()
    return (
        gr.Tabs(selected="txt2img"),
        info.prompt,
        info.negative_prompt,
        info.steps if info.steps is not None else gr.skip(),
        sampler,
        schedule,
        info.cfg_scale if info.cfg_scale is not None else gr.skip(),
        info.seed if info.seed is not None else gr.skip(),
        size[0] if size else gr.skip(),
        size[1] if size else gr.skip(),
    )


def png_info_tab(panels: dict[str, Any], tabs: gr.Tabs) -> None:
    """The PNG Info tab: read an image's infotext, and send it to the txt2img panel."""
    with gr.Tab("PNG Info", id="pnginfo"):
        with gr.Row():
            with gr.Column():
                png_image = gr.Image(
                    label="Source",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=400,
                )
            with gr.Column():
                png_text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo-text")
                png_table = gr.HTML()
                send = gr.Button("Send to txt2img", elem_id="pnginfo-send")
        png_image.change(_png_info, inputs=png_image, outputs=[png_text, png_table])
        t2i = panels["txt2img"].fields
        send.click(
            _send_to_txt2img,
            inputs=png_text,
            outputs=[
                tabs,
                t2i["prompt"],
                t2i["negative_prompt"],
                t2i["steps"],
                t2i["sampler_name"],
                t2i["scheduler"],
                t2i["cfg_scale"],
                t2i["seed"],
                t2i["width"],
                t2i["height"],
            ],
        )


def outputs_tab(blocks: gr.Blocks, service: GenerationService) -> None:
    """The Outputs tab: browse the outputs folder with each image's parameters, or download it as a zip."""
    with gr.Tab("Outputs", id="outputs"):
        with gr.Row():
            outputs_refresh = gr.Button("Refresh", size="sm")
            zip_button = gr.Button("Download all as zip", size="sm")
        outputs_gallery = gr.Gallery(label="Outputs (newest first)", columns=6, height=520, interactive=False)
        outputs_info = gr.Textbox(label="Parameters", lines=4, interactive=False)
        zip_file = gr.File(label="Zip", visible=True, interactive=False)
        outputs_texts = gr.State([])

        def list_outputs() -> tuple[list, list]:
            saved = service.outputs.list()
            return [(str(item.path), item.relative) for item in saved], [
                item.infotext or "" for item in saved
            ]

        def make_zip() -> str:
            data = service.outputs.zip_bytes()
            if not data or len(data) <= 22:
                gr.Warning("There are no images in the outputs folder yet")
            handle, path = tempfile.mkstemp(
                suffix=".zip", prefix="outputs-", dir=os.environ.get("GRADIO_TEMP_DIR")
            )
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            return path

        def pick(texts: list, event: gr.SelectData) -> str:
            index = event.index if isinstance(event.index, int) else 0
            return texts[index] if index < len(texts) else ""

        outputs_refresh.click(list_outputs, outputs=[outputs_gallery, outputs_texts])
        zip_button.click(make_zip, outputs=zip_file)
        outputs_gallery.select(pick, inputs=outputs_texts, outputs=outputs_info)
        blocks.load(list_outputs, outputs=[outputs_gallery, outputs_texts])


def settings_tab(blocks: gr.Blocks, service: GenerationService, queue: GpuQueue, limits: Limits) -> None:
    """The Settings tab: what is loaded and where, the queue and the caps; unload the checkpoint."""
    with gr.Tab("Settings", id="settings"):
        settings = gr.Markdown(elem_id="nbkit-settings")
        with gr.Row():
            unload = gr.Button("Unload checkpoint (free memory)", size="sm")

        def describe() -> str:
            entry = service.current
            return "\n".join(
                [
                    f"- **Checkpoint:** {entry.title if entry else '(none loaded yet)'}",
                    f"- **Device:** {service.device} ({'low-VRAM mode' if service.low_vram else 'normal'})",
                    f"- **Outputs folder:** `{service.outputs.folder if service.outputs else '(not saved)'}`",
                    f"- **Queue:** {queue.pending} waiting, at most {queue.max_pending}",
                    f"- **Limits:** {limits.max_pixels} pixels, {limits.max_steps} steps, "
                    f"{limits.max_images} images per request, {limits.max_image_bytes // 2**20} MB per image",
                ]
            )

        def do_unload() -> str:
            try:
                queue.run(service.unload_checkpoint)
            except QueueFull as error:
                gr.Warning(f"Busy: {error}")
            return describe()

        unload.click(do_unload, outputs=settings)
        blocks.load(describe, outputs=settings)
