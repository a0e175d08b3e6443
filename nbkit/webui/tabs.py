"""The web UI's tabs besides the generation panels and Extras: PNG Info (send to any tab), Outputs and
Settings."""

from __future__ import annotations

import html
import os
import tempfile
from typing import Any

import gradio as gr

from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.generation.samplers import SAMPLERS, SCHEDULES
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.requests import HR_UPSCALERS
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


# What PNG Info's send buttons set in a generation panel, in this order, where the panel has the field.
SENT_FIELDS = (
    "prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width", "height",
    "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "init_image",
    "mask_editor",
)  # fmt: skip


def _sent_values(text: str, image: str | None) -> dict[str, Any]:
    """The panel fields an infotext (and its picture) sets; a value the panels cannot take is left out."""
    info = parse_infotext(text)
    values: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    if info.sampler in SAMPLERS:
        values["sampler_name"] = info.sampler
    if info.schedule in {s.label for s in SCHEDULES.values()}:
        values["scheduler"] = info.schedule
    for name, value in (
        ("steps", info.steps), ("cfg_scale", info.cfg_scale), ("seed", info.seed),
        ("denoising_strength", info.denoising_strength),
    ):  # fmt: skip
        if value is not None:
            values[name] = value
    if info.size:
        values["width"], values["height"] = info.size
    hires_scale = _number(info.parameters.get("Hires upscale"))
    if hires_scale is not None:
        values.update(enable_hr=True, hr_scale=hires_scale)
        if info.parameters.get("Hires upscaler") in HR_UPSCALERS:
            values["hr_upscaler"] = info.parameters["Hires upscaler"]
        steps = _number(info.parameters.get("Hires steps"))
        if steps is not None:
            values["hr_second_pass_steps"] = int(steps)
    if image:
        values["init_image"] = values["mask_editor"] = image
    return values


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _send(mode: str, fields: list[str]) -> Any:
    """The handler of one "Send to" button: the tab, then `fields`' values (skipped where none)."""

    def send(text: str, image: str | None) -> tuple:
        if not text:
            gr.Warning("Drop an image with generation parameters first")
            return (gr.skip(),) * (1 + len(fields))
        values = _sent_values(text, image)
        return (gr.Tabs(selected=mode), *(values.get(name, gr.skip()) for name in fields))

    return send


def png_info_tab(panels: dict[str, Any], tabs: gr.Tabs, extras: dict[str, Any] | None = None) -> None:
    """The PNG Info tab: read an image's infotext, and send it (with the picture where a tab takes one)
    to any generation tab, or the picture to Extras.

    Args:
        panels: the generation panels by mode (`txt2img`, `img2img`, `inpaint`, `controlnet`).
        tabs: the UI's tabs (a send selects its tab).
        extras: the Extras tab's components (`image`), or None for no "Send to extras".
    """
    labels = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "inpaint", "controlnet": "ControlNet"}
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
                with gr.Row():
                    buttons = {
                        mode: gr.Button(
                            f"Send to {labels.get(mode, mode)}",
                            size="sm",
                            # txt2img's keeps its first id, which scripts and tests know
                            elem_id="pnginfo-send" if mode == "txt2img" else f"pnginfo-send-{mode}",
                        )
                        for mode in panels
                    }
                    if extras is not None:
                        to_extras = gr.Button("Send to extras", size="sm", elem_id="pnginfo-send-extras")
        png_image.change(_png_info, inputs=png_image, outputs=[png_text, png_table])
        for mode, button in buttons.items():
            fields = [name for name in SENT_FIELDS if name in panels[mode].fields]
            button.click(
                _send(mode, fields),
                inputs=[png_text, png_image],
                outputs=[tabs, *(panels[mode].fields[name] for name in fields)],
            )
        if extras is not None:

            def send_picture(image: str | None) -> tuple:
                if not image:
                    gr.Warning("Drop an image first")
                    return gr.skip(), gr.skip()
                return gr.Tabs(selected="extras"), image

            to_extras.click(send_picture, inputs=png_image, outputs=[tabs, extras["image"]])


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
