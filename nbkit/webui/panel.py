"""One generation tab's form (txt2img, img2img, inpaint, ControlNet), laid out as in AUTOMATIC1111.

`Panel` makes the gradio components of a tab's settings, its Generate, Interrupt and Skip buttons and
its gallery; `nbkit.webui.ui` wires them to the service.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from nbkit.generation.samplers import SAMPLERS, SCHEDULES
from nbkit.webui.controlnet import CONTROL_MODES, CONTROLNETS, PREPROCESSORS
from nbkit.webui.prompt_tools import prompt_tools
from nbkit.webui.requests import DISTILLED_CFG_SCALE, HR_UPSCALERS, MASKED_CONTENT, RESIZE_MODES
from nbkit.webui.security import Limits


def progress_html(fraction: float, text: str) -> str:
    """A progress bar at `fraction` (0..1) with `text` on it."""
    percent = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="nbkit-progress" data-progress="{percent:.0f}"><div style="width:{percent:.1f}%"></div>'
        f"<span>{html.escape(text)}</span></div>"
    )


class Panel:
    """The generation settings of one tab (each tab has its own, as in A1111)."""

    def __init__(self, mode: str, limits: Limits):
        self.mode = mode
        self.fields: dict[str, Any] = {}
        f = self.fields
        with gr.Row():
            with gr.Column(scale=6):
                f["prompt"] = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    placeholder="Prompt (Ctrl+Enter to generate)",
                    elem_id=f"{mode}-prompt",
                )
                f["negative_prompt"] = gr.Textbox(
                    label="Negative prompt", lines=2, elem_id=f"{mode}-negative"
                )
                self.embedding_picker = prompt_tools(mode, f)
            with gr.Column(scale=1, min_width=160):
                self.generate = gr.Button(
                    "Generate", variant="primary", elem_id=f"{mode}-generate", elem_classes="nbkit-generate"
                )
                with gr.Row():
                    self.interrupt = gr.Button("Interrupt", size="sm", elem_id=f"{mode}-interrupt")
                    self.skip = gr.Button("Skip", size="sm", elem_id=f"{mode}-skip")
        with gr.Row():
            with gr.Column(scale=1):
                if mode == "img2img":
                    f["init_image"] = gr.Image(
                        label="Image for img2img", type="pil", image_mode="RGB", height=360
                    )
                elif mode == "inpaint":
                    f["mask_editor"] = gr.ImageMask(
                        label="Image and mask (paint over what to repaint)",
                        type="pil",
                        height=420,
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                        layers=False,
                        transforms=(),
                    )
                    with gr.Row():
                        f["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur")
                        f["inpainting_mask_invert"] = gr.Radio(
                            ["Inpaint masked", "Inpaint not masked"],
                            value="Inpaint masked",
                            label="Mask mode",
                        )
                    f["inpainting_fill"] = gr.Radio(
                        list(MASKED_CONTENT), value="original", label="Masked content", type="index"
                    )
                elif mode == "controlnet":
                    f["control_image"] = gr.Image(
                        label="Control image", type="pil", image_mode="RGB", height=300
                    )
                    with gr.Row():
                        f["cn_preprocessor"] = gr.Dropdown(
                            list(PREPROCESSORS), value="canny", label="Preprocessor"
                        )
                        f["cn_model"] = gr.Dropdown(
                            sorted(CONTROLNETS), label="ControlNet model", allow_custom_value=True
                        )
                    f["cn_weight"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control weight")
                    with gr.Row():
                        f["cn_guidance_start"] = gr.Slider(
                            0, 1, value=0.0, step=0.01, label="Starting control step"
                        )
                        f["cn_guidance_end"] = gr.Slider(
                            0, 1, value=1.0, step=0.01, label="Ending control step"
                        )
                    f["cn_control_mode"] = gr.Radio(
                        list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode", type="index"
                    )
                if mode in ("img2img", "inpaint"):
                    f["resize_mode"] = gr.Radio(
                        list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode", type="index"
                    )
                with gr.Row():
                    f["sampler_name"] = gr.Dropdown(
                        list(SAMPLERS), value="Euler a", label="Sampling method", elem_id=f"{mode}-sampler"
                    )
                    f["scheduler"] = gr.Dropdown(
                        list(SCHEDULES), value="Automatic", label="Schedule type", elem_id=f"{mode}-scheduler"
                    )
                f["steps"] = gr.Slider(1, limits.max_steps, value=20, step=1, label="Sampling steps")
                if mode == "txt2img":
                    with gr.Accordion("Hires. fix", open=False):
                        f["enable_hr"] = gr.Checkbox(label="Enable hires. fix", value=False)
                        with gr.Row():
                            f["hr_upscaler"] = gr.Dropdown(
                                list(HR_UPSCALERS), value="Latent", label="Upscaler"
                            )
                            f["hr_second_pass_steps"] = gr.Slider(
                                0, limits.max_steps, value=0, step=1, label="Hires steps"
                            )
                        with gr.Row():
                            f["denoising_strength"] = gr.Slider(
                                0, 1, value=0.7, step=0.01, label="Denoising strength"
                            )
                            f["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by")
                side = min(2048, int(limits.max_pixels**0.5) * 2)
                with gr.Row():
                    with gr.Column():
                        f["width"] = gr.Slider(
                            64, side, value=512, step=8, label="Width", elem_id=f"{mode}-width"
                        )
                        f["height"] = gr.Slider(
                            64, side, value=512, step=8, label="Height", elem_id=f"{mode}-height"
                        )
                    with gr.Column():
                        f["n_iter"] = gr.Slider(1, limits.max_images, value=1, step=1, label="Batch count")
                        f["batch_size"] = gr.Slider(
                            1, min(8, limits.max_images), value=1, step=1, label="Batch size"
                        )
                f["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{mode}-cfg")
                # Forge's slider: a guidance-distilled model's embedded guidance (FLUX.1-dev's); shown
                # only while such a model is loaded (`Family.distilled_guidance_default`).
                f["distilled_cfg_scale"] = gr.Slider(
                    0,
                    30,
                    value=DISTILLED_CFG_SCALE,
                    step=0.1,
                    label="Distilled CFG Scale (FLUX.1)",
                    visible=False,
                )
                if mode in ("img2img", "inpaint"):
                    f["denoising_strength"] = gr.Slider(
                        0, 1, value=0.75, step=0.01, label="Denoising strength"
                    )
                with gr.Row():
                    f["seed"] = gr.Number(
                        value=-1, precision=0, label="Seed", scale=4, elem_id=f"{mode}-seed"
                    )
                    self.dice = gr.Button(
                        "⚄", elem_classes="nbkit-tool", scale=0, elem_id=f"{mode}-random-seed"
                    )
                    self.reuse = gr.Button(
                        "♻", elem_classes="nbkit-tool", scale=0, elem_id=f"{mode}-reuse-seed"
                    )
            with gr.Column(scale=1):
                self.progress = gr.HTML(progress_html(0, "Idle"), elem_id=f"{mode}-progress")
                self.gallery = gr.Gallery(
                    label="Output",
                    columns=2,
                    height=480,
                    format="png",
                    elem_id=f"{mode}-gallery",
                    interactive=False,
                )
                self.infotext = gr.Textbox(
                    label="Generation parameters", lines=4, interactive=False, elem_id=f"{mode}-info"
                )
        self.seeds = gr.State([])
        self.infotexts = gr.State([])
        self.selected = gr.State(0)

    @property
    def names(self) -> list[str]:
        """The fields' names, in the order of `inputs`."""
        return list(self.fields)

    @property
    def inputs(self) -> list[Any]:
        """The fields' components (a handler's inputs)."""
        return list(self.fields.values())
