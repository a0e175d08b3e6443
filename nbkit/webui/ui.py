"""The gradio Blocks UI, shaped like AUTOMATIC1111's so its users feel at home.

Tabs txt2img, img2img, inpaint (the mask is drawn in the browser), ControlNet, Extras, PNG Info, Outputs
and Settings; a checkpoint dropdown with refresh on top. Every generation goes through the `GpuQueue`
(the API's queue): the Generate handler submits the job and, while it waits, streams a progress bar.
Errors (a bad value, a full queue, "training in progress") appear as messages in the page
(`gr.Warning` / `gr.Error`), never as a dead page.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home, offline or not

import gradio as gr
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.placement import as_family
from nbkit.generation.samplers import SAMPLERS, sampler_tables
from nbkit.webui.extras_tab import extras_tab
from nbkit.webui.models import folder_family
from nbkit.webui.panel import Panel, progress_html
from nbkit.webui.prompt_tools import wire_prompt_tools
from nbkit.webui.queue import GpuQueue, QueueFull
from nbkit.webui.requests import (
    DISTILLED_CFG_SCALE,
    PIXEL_UPSCALER,
    ControlNetUnit,
    GenerationRequest,
    make_request,
)
from nbkit.webui.security import LimitError, Limits
from nbkit.webui.service import GenerationService
from nbkit.webui.tabs import outputs_tab, png_info_tab, settings_tab

POLL_SECONDS = 0.25

CSS = """
.nbkit-progress {position: relative; height: 22px; border-radius: 6px; background: var(--neutral-200);
  overflow: hidden; margin: 4px 0;}
.nbkit-progress > div {height: 100%; background: var(--color-accent); transition: width 0.2s;}
.nbkit-progress > span {position: absolute; left: 8px; top: 2px; font-size: 13px;}
#nbkit-generate button, .nbkit-generate {min-height: 80px; font-size: 1.2em;}
.nbkit-tool {max-width: 44px; min-width: 44px !important;}
"""


def theme() -> Any:
    """gradio's default theme with system fonts: nothing is fetched from Google Fonts."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def _mask_from_editor(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(picture, mask) from an ImageMask value: the mask is white where the user painted."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        if alpha.size != mask.size:
            alpha = alpha.resize(mask.size)
        mask.paste(255, (0, 0), alpha)
    return background, mask


def _gallery_items(paths: list, images: list) -> list:
    """Saved files when there are (downloads then keep the parameters chunk), else the images."""
    return [str(path) for path in paths] if paths else list(images)


def build_request(mode: str, values: dict[str, Any], limits: Limits) -> GenerationRequest:
    """A `GenerationRequest` from one tab's values, after the caps are checked.

    Args:
        mode: `txt2img`, `img2img`, `inpaint` or `controlnet` (txt2img with a ControlNet unit).
        values: the tab's field values by name.
        limits: the request caps.
    """
    hires = bool(values.get("enable_hr"))
    fields: dict[str, Any] = dict(
        prompt=values["prompt"] or "",
        negative_prompt=values["negative_prompt"] or "",
        seed=int(values["seed"] if values["seed"] is not None else -1),
        batch_size=int(values["batch_size"]),
        n_iter=int(values["n_iter"]),
        steps=int(values["steps"]),
        cfg_scale=float(values["cfg_scale"]),
        distilled_cfg_scale=float(values.get("distilled_cfg_scale", DISTILLED_CFG_SCALE)),
        width=int(values["width"]),
        height=int(values["height"]),
        sampler_name=values["sampler_name"] or "Euler a",
        scheduler=values["scheduler"] or "Automatic",
        styles=list(values.get("styles") or []),
        save_images=True,
        enable_hr=hires,
        hr_scale=float(values.get("hr_scale") or 2),
        hr_second_pass_steps=int(values.get("hr_second_pass_steps") or 0),
    )
    if hires:
        fields.update(
            hr_upscaler=values["hr_upscaler"] or "Latent",
            denoising_strength=float(values["denoising_strength"]),
        )
    if mode in ("img2img", "inpaint"):
        fields.update(
            denoising_strength=float(values["denoising_strength"]),
            resize_mode=int(values["resize_mode"] or 0),
        )

    def read_inputs() -> dict[str, Any]:
        if mode == "img2img":
            if values.get("init_image") is None:
                raise NbkitError("img2img needs an image", fix="drop a picture into the image box first")
            return {"init_image": values["init_image"]}
        if mode == "inpaint":
            image, mask = _mask_from_editor(values.get("mask_editor"))
            if image is None:
                raise NbkitError("inpaint needs an image", fix="drop a picture into the image box first")
            if mask is None or mask.getbbox() is None:
                raise NbkitError("inpaint needs a mask", fix="paint over the part of the picture to repaint")
            fill = values["inpainting_fill"]
            return dict(
                init_image=image,
                mask=mask,
                mask_blur=int(values["mask_blur"]),
                inpainting_fill=int(fill if fill is not None else 1),
                inpainting_mask_invert=values["inpainting_mask_invert"] == "Inpaint not masked",
            )
        if mode == "controlnet":
            if values.get("control_image") is None:
                raise NbkitError(
                    "ControlNet needs a control image", fix="drop a picture into the control image box"
                )
            if not values.get("cn_model"):
                raise NbkitError(
                    "pick a ControlNet model", fix="choose one that matches the checkpoint's family"
                )
            control_mode = values.get("cn_control_mode")
            unit = ControlNetUnit(
                model=values["cn_model"],
                image=values["control_image"],
                preprocessor=values["cn_preprocessor"] or "none",
                weight=float(values["cn_weight"]),
                guidance_start=float(values.get("cn_guidance_start") or 0.0),
                guidance_end=float(values.get("cn_guidance_end", 1.0)),
                control_mode=int(control_mode) if control_mode is not None else 0,
                pixel_perfect=True,  # the map is made at the generation size
            )
            return {"controlnet": [unit]}
        return {}

    return make_request(
        mode if mode in ("img2img", "inpaint") else "txt2img", fields, limits, read_inputs=read_inputs
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, NbkitError | ValueError):
        return str(error)
    return f"generation failed: {type(error).__name__}: {error}"


def _generate_handler(
    mode: str, panel: Panel, service: GenerationService, queue: GpuQueue, limits: Limits
) -> Callable[..., Iterator[tuple]]:
    names = panel.names

    def run(*values: Any) -> Iterator[tuple]:
        fields = dict(zip(names, values, strict=True))
        try:
            request = build_request(mode, fields, limits)
            future = queue.submit(lambda: service.generate(request))
        except QueueFull as error:
            gr.Warning(f"Busy: {error}")
            yield gr.skip(), gr.skip(), progress_html(0, f"Busy: {error.message}"), gr.skip(), gr.skip()
            return
        except (NbkitError, ValueError) as error:
            raise gr.Error(_describe(error)) from None
        waited = queue.pending
        while not future.done():
            snapshot = service.progress()
            if snapshot.job_count:
                text = snapshot.textinfo or f"Step {snapshot.sampling_step}/{snapshot.sampling_steps}"
                yield gr.skip(), gr.skip(), progress_html(snapshot.fraction, text), gr.skip(), gr.skip()
            else:
                text = snapshot.textinfo or (
                    f"Waiting in the queue ({waited} ahead)" if waited else "Starting"
                )
                yield gr.skip(), gr.skip(), progress_html(0, text), gr.skip(), gr.skip()
            time.sleep(POLL_SECONDS)
        try:
            output = future.result()
        except Exception as error:
            yield gr.skip(), gr.skip(), progress_html(0, "Failed"), gr.skip(), gr.skip()
            raise gr.Error(_describe(error)) from None
        done = "Interrupted" if output.interrupted else f"Done in {output.seconds:.1f} s"
        first = output.infotexts[0] if output.infotexts else ""
        yield (
            _gallery_items(output.paths, output.images),
            first,
            progress_html(1 if output.images else 0, done),
            list(output.seeds),
            list(output.infotexts),
        )

    return run


def _wire_panel(panel: Panel, mode: str, service: GenerationService, queue: GpuQueue, limits: Limits) -> None:
    handler = _generate_handler(mode, panel, service, queue, limits)
    outputs = [panel.gallery, panel.infotext, panel.progress, panel.seeds, panel.infotexts]
    panel.generate.click(handler, inputs=panel.inputs, outputs=outputs, concurrency_limit=None)
    panel.fields["prompt"].submit(handler, inputs=panel.inputs, outputs=outputs, concurrency_limit=None)
    panel.interrupt.click(service.interrupt, concurrency_limit=None)
    panel.skip.click(service.skip, concurrency_limit=None)
    panel.dice.click(lambda: -1, outputs=panel.fields["seed"], concurrency_limit=None)

    def reuse(seeds: list, index: int) -> Any:
        if not seeds:
            gr.Info("Generate an image first; its seed is reused from there")
            return gr.skip()
        return seeds[min(index or 0, len(seeds) - 1)]

    panel.reuse.click(
        reuse, inputs=[panel.seeds, panel.selected], outputs=panel.fields["seed"], concurrency_limit=None
    )

    def select(texts: list, event: gr.SelectData) -> tuple:
        index = event.index if isinstance(event.index, int) else 0
        return (texts[index] if index < len(texts) else gr.skip()), index

    panel.gallery.select(select, inputs=[panel.infotexts], outputs=[panel.infotext, panel.selected])


def _titles(service: GenerationService) -> list[str]:
    return [entry.title for entry in service.catalog.checkpoints]


def _current(service: GenerationService) -> str | None:
    from nbkit.webui.api import current_title

    return current_title(service)


def fitted_fields(
    panels: dict[str, Panel], family: str | None, defaults: Any, *, set_values: bool, opened: bool = False
) -> list[tuple[Any, Any]]:
    """(component, update dict) for every panel's fields that follow the loaded model: the sampler and
    schedule menus take its family's tables, the distilled CFG slider shows only for a family with
    distilled guidance, and the hires upscaler is a pixel one for a family that packs its latents.

    Args:
        panels: the UI's panels.
        family: the loaded model's family (None: the default one's tables).
        defaults: the model's `GenerationDefaults` (`Family.generation_defaults`).
        set_values: also set steps, CFG, sampler and schedule to `defaults` (else they keep their values,
            unless the family does not take them: an SD sampler on a flow model moves to its default).
        opened: the page has just opened, its fields at their first values: only values that differ
            are sent (one sent late would overwrite what someone typed meanwhile).
    """
    from nbkit.generation.hires import LATENT_UPSCALERS

    samplers, schedules = sampler_tables(family)
    known = as_family(family)
    distilled = family is not None and known.distilled_guidance_default is not None
    flow = samplers is not SAMPLERS
    moved = set_values or flow  # a flow model's menus hold none of the SD names

    def value(component: Any, wanted: Any, send: bool) -> dict[str, Any]:
        return {"value": wanted} if send and not (opened and component.value == wanted) else {}

    updates: list[tuple[Any, Any]] = []
    for panel in panels.values():
        fields = panel.fields
        steps = value(fields["steps"], defaults.steps, set_values)
        cfg = value(fields["cfg_scale"], defaults.cfg_scale, moved)
        updates += [
            (
                fields["sampler_name"],
                gr.update(choices=list(samplers), **value(fields["sampler_name"], defaults.sampler, moved)),
            ),
            (
                fields["scheduler"],
                gr.update(choices=list(schedules), **value(fields["scheduler"], defaults.schedule, moved)),
            ),
            (fields["steps"], gr.update(**steps) if steps else gr.skip()),
            (fields["cfg_scale"], gr.update(**cfg) if cfg else gr.skip()),
            (fields["distilled_cfg_scale"], gr.update(visible=distilled)),
        ]
        if "hr_upscaler" in fields:
            pixels = not known.latent_hires
            wanted = PIXEL_UPSCALER if pixels else next(iter(LATENT_UPSCALERS))
            upscaler = value(fields["hr_upscaler"], wanted, pixels or set_values)
            updates.append(
                (
                    fields["hr_upscaler"],
                    gr.update(**upscaler) if upscaler else gr.skip(),
                )
            )
    return updates


def _model_defaults(service: GenerationService, family: str | None = None) -> Any:
    """The loaded model's `GenerationDefaults` (or, none loaded yet, its family's with no pipeline)."""
    family = family if service.pipeline is None else service.family
    return as_family(family).generation_defaults(service.pipeline)


def _wire_model_picker(
    blocks: gr.Blocks,
    model: gr.Dropdown,
    refresh: gr.Button,
    status: gr.Markdown,
    panels: dict[str, Panel],
    service: GenerationService,
    queue: GpuQueue,
) -> None:
    """The checkpoint dropdown: switching loads the model (through the queue), and every panel's sampler,
    schedule, steps, CFG, distilled CFG and hires upscaler fields follow the loaded model
    (`fitted_fields`): a page opens with the model's defaults (`Family.generation_defaults`: A1111's for
    SD, Z-Image-Turbo's 8 steps at CFG 1, ...), and a switch sets them when they differ from the last
    model's (from one SD model to another, the values people set stay)."""
    catalog = service.catalog
    fitted = [
        component for component, _ in fitted_fields(panels, None, _model_defaults(service), set_values=True)
    ]

    def fitting(family: str | None, defaults: Any, set_values: bool, opened: bool = False) -> list[Any]:
        updates = fitted_fields(panels, family, defaults, set_values=set_values, opened=opened)
        return [update for _, update in updates]

    def switch(title: str) -> list[Any]:
        if not title or (service.current is not None and service.current.title == title):
            return [gr.skip()] * (1 + len(fitted))
        before = _model_defaults(service) if service.pipeline is not None else None
        try:
            entry = queue.run(lambda: service.select_model(title))
        except QueueFull as error:
            gr.Warning(f"Busy: {error}")
            return [gr.skip()] * (1 + len(fitted))
        except Exception as error:
            raise gr.Error(_describe(error)) from None
        gr.Info(f"Loaded {entry.title}")
        after = _model_defaults(service)
        return [f"Loaded **{html.escape(entry.title)}**", *fitting(service.family, after, after != before)]

    def on_load() -> list[Any]:
        if service.current is not None:
            return fitting(service.family, _model_defaults(service), True, opened=True)
        # Still loading (launch queues the first load): the family its configs name.
        try:
            entry = catalog.find(_current(service) or "")
        except NbkitError:
            return fitting(None, _model_defaults(service), True, opened=True)
        family = entry.family or folder_family(entry.source)
        return fitting(family, _model_defaults(service, family), True, opened=True)

    def do_refresh() -> Any:
        catalog.refresh()
        return gr.Dropdown(choices=_titles(service), value=_current(service))

    model.input(switch, inputs=model, outputs=[status, *fitted])
    blocks.load(on_load, outputs=fitted)
    refresh.click(do_refresh, outputs=model)


def build_ui(
    service: GenerationService, queue: GpuQueue, *, limits: Limits | None = None, share_outputs: bool = True
) -> gr.Blocks:
    """The web UI's Blocks.

    Args:
        service: the generation service.
        queue: the GPU queue (shared with the API).
        limits: the request caps (slider ranges follow them).
        share_outputs: show the Outputs tab (browse and download the outputs folder).
    """
    limits = limits or Limits()
    with gr.Blocks(title="nbkit web UI", analytics_enabled=False) as blocks:
        with gr.Row():
            model = gr.Dropdown(
                _titles(service),
                value=_current(service),
                label="Stable Diffusion checkpoint",
                scale=6,
                allow_custom_value=True,
                elem_id="nbkit-model",
            )
            refresh = gr.Button("↻", elem_classes="nbkit-tool", scale=0, elem_id="nbkit-refresh")
            status = gr.Markdown("", elem_id="nbkit-status")
        panels: dict[str, Panel] = {}
        with gr.Tabs(elem_id="nbkit-tabs") as tabs:
            for mode, label in (
                ("txt2img", "txt2img"),
                ("img2img", "img2img"),
                ("inpaint", "Inpaint"),
                ("controlnet", "ControlNet"),
            ):
                with gr.Tab(label, id=mode):
                    panels[mode] = Panel(mode, limits)
                    _wire_panel(panels[mode], mode, service, queue, limits)
            extras = extras_tab(blocks, service, queue, limits, panels)
            png_info_tab(panels, tabs, extras)
            if share_outputs and service.outputs is not None:
                outputs_tab(blocks, service)
            settings_tab(blocks, service, queue, limits)

        _wire_model_picker(blocks, model, refresh, status, panels, service, queue)
        wire_prompt_tools(blocks, panels, service)
    # gradio embeds the API description (labels, defaults, checkpoint titles) in every page, the login
    # page included; the UI is for people and /sdapi/v1 is the API, so gradio's own is kept private.
    for function in blocks.fns.values():
        function.api_visibility = "private"
    return blocks


__all__ = ["CSS", "LimitError", "build_request", "build_ui", "theme"]
