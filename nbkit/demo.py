"""`nbkit demo`: the whole flow on the embedded tiny model, in a few minutes on a laptop CPU.

It creates a fresh session, builds the tiny model, imports a handful of generated "photos", trains both
DreamBooth stages for a few steps, exports a single-file checkpoint, and prints where each artifact
went. A family with its own demo settings (`Family.demo_training_overrides`; FLUX.1, which has no full
fine-tune) trains a LoRA of its tiny denoiser instead and reloads that LoRA onto the base model. Every
stage calls the same code the notebooks call; nothing here is demo-only logic.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nbkit.families import DEFAULT_FAMILY, get_family
from nbkit.session.core import Session

DEMO_TOKEN = "zwx"


@dataclasses.dataclass
class DemoResult:
    session: Session
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def make_demo_photos(count: int = 4, size: int = 160, seed: int = 0) -> dict[str, bytes]:
    """Draw `count` deterministic pictures of one "subject" (a striped ball) on varied backgrounds.

    Named the fast-DreamBooth way, `zwx (1).png`, so captions come from the file names; returned as
    uploads (name -> PNG bytes), as a notebook's upload widget gives them, so the session records no
    temporary folder as their source.
    """
    rng = np.random.default_rng(seed)
    photos = {}
    for index in range(1, count + 1):
        background = tuple(int(v) for v in rng.integers(40, 220, size=3))
        image = Image.new("RGB", (size + 32 * (index % 2), size), background)
        draw = ImageDraw.Draw(image)
        centre_x, centre_y = rng.integers(size // 3, 2 * size // 3, size=2)
        radius = int(rng.integers(size // 5, size // 3))
        box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
        draw.ellipse(box, fill=(200, 40, 40))
        for offset in range(-radius, radius, max(4, radius // 3)):
            draw.line(
                (centre_x + offset, centre_y - radius, centre_x + offset, centre_y + radius),
                fill=(250, 250, 250),
                width=3,
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        photos[f"{DEMO_TOKEN} ({index}).png"] = buffer.getvalue()
    return photos


def run_demo(
    *,
    family: str = DEFAULT_FAMILY,
    root: Path | None = None,
    session_name: str | None = None,
    text_encoder_steps: int = 4,
    unet_steps: int = 8,
    web_ui: bool = True,
    keep_ui: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage on the tiny model of `family` and return what was made.

    Args:
        family: the tiny model's family (a key of `nbkit.families.FAMILIES`).
        root: the storage root (default: the runtime's, e.g. `~/nbkit`).
        session_name: defaults to `demo-<family>-<timestamp>`.
        text_encoder_steps: stage 1 steps (none where the family's demo settings say so: FLUX.1's).
        unet_steps: stage 2 steps.
        web_ui: end by starting the web UI on loopback with the trained model and making one A1111 API
            request to it.
        keep_ui: keep the web UI running (until Ctrl+C) instead of shutting it down.
        log: where progress lines go.
    """
    from nbkit.env import describe_runtime
    from nbkit.images import import_images
    from nbkit.models.registry import get_model
    from nbkit.models.sources import tiny_model_path
    from nbkit.session.manifest import BaseModelRef
    from nbkit.train import train

    spec = get_model(f"tiny-{family}")
    log(f"runtime: {describe_runtime()}")
    name = session_name or f"demo-{family}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    timings: dict[str, float] = {}

    def timed(stage: str, fn):
        start = time.perf_counter()
        value = fn()
        timings[stage] = time.perf_counter() - start
        log(f"[{stage}] done in {timings[stage]:.1f} s")
        return value

    cache_root = Path(root) / "models-cache" if root is not None else None
    model_dir = timed("tiny model", lambda: tiny_model_path(family, cache_root=cache_root))
    base = BaseModelRef(source=spec.key, family=spec.family, prediction_type=spec.prediction_type)
    session = timed("session", lambda: Session.create(name, root=root, base_model=base))
    result = DemoResult(session=session, timings=timings)
    result.artifacts["session"] = session.path
    result.artifacts["base model"] = Path(model_dir)

    report = timed("images", lambda: import_images(session, make_demo_photos()))
    log(str(report))
    result.artifacts["contact sheet"] = report.contact_sheet

    overrides = {
        "text_encoder_steps": text_encoder_steps,
        "text_encoder_lr": 1e-4,
        "unet_steps": unet_steps,
        "unet_lr": 1e-4,
        "checkpoint_every": max(1, unet_steps // 2),
        "seed": 1234,
        "sample_prompts": [f"photo of {DEMO_TOKEN}"],
        "sample_steps": 2,
    }
    overrides.update(get_family(family).demo_training_overrides)
    trained = timed("train", lambda: train(session, overrides))
    for label, path in [
        ("diffusers model", trained.model_dir),
        ("single file", trained.single_file),
        ("loss plot", trained.loss_plot),
        *((f"samples {index + 1}", sample) for index, sample in enumerate(trained.samples)),
        ("checkpoint", trained.last_checkpoint),
        *((f"LoRA ({kind})", path) for kind, path in trained.lora_files.items()),
    ]:
        if path is not None:
            result.artifacts[label] = Path(path)

    if trained.single_file is not None:
        check = timed(
            "reload", lambda: render_from_single_file(trained.single_file, session, spec.native_resolution)
        )
        result.artifacts["from single file"] = check
    if "diffusers" in trained.lora_files:
        check = timed(
            "reload",
            lambda: render_with_lora(
                trained.lora_files["diffusers"], model_dir, session, spec.native_resolution
            ),
        )
        result.artifacts["with the LoRA"] = check

    if web_ui:
        result.artifacts["web UI answer"] = timed(
            "web UI", lambda: try_web_ui(session, spec.native_resolution, keep_running=keep_ui, log=log)
        )

    log("")
    log(f"Session {session.name} is at {session.path}")
    for label, path in result.artifacts.items():
        log(f"  {label:<18} {path}")
    log(f"Total {sum(timings.values()):.1f} s")
    return result


def render_from_single_file(single_file: Path, session: Session, resolution: int) -> Path:
    """Load the exported single file the way A1111/ComfyUI users would and render one sample from it."""
    from nbkit.convert import load_single_file, model_hashes
    from nbkit.train.samples import render_samples

    pipeline = load_single_file(single_file)
    pipeline.set_progress_bar_config(disable=True)
    _, short_hash, _ = model_hashes(single_file)
    return render_samples(
        pipeline,
        [f"photo of {DEMO_TOKEN}"],
        seed=1234,
        steps=2,
        resolution=resolution,
        out_path=session.dir("outputs") / f"from-single-file-{short_hash}.png",
        model_name=single_file.stem,
    )


def render_with_lora(lora_file: Path, base_dir: Path, session: Session, resolution: int) -> Path:
    """Load the base model, apply the exported diffusers-format LoRA as diffusers users would, and
    render one sample with it."""
    from nbkit.models.loading import load_pipeline
    from nbkit.train.samples import render_samples

    pipeline = load_pipeline(base_dir)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(lora_file.parent, weight_name=lora_file.name)
    return render_samples(
        pipeline,
        [f"photo of {DEMO_TOKEN}"],
        seed=1234,
        steps=2,
        resolution=resolution,
        out_path=session.dir("outputs") / f"with-lora-{lora_file.parent.name}.png",
        model_name=lora_file.parent.name,
    )


def try_web_ui(session: Session, resolution: int, *, keep_running: bool, log: Callable[[str], None]) -> Path:
    """Serve the session's model on loopback, ask the A1111 API for one image, and shut down (or keep
    serving until Ctrl+C). Returns the saved image."""
    import requests

    from nbkit.webui import launch

    ui = launch(session=session, host="127.0.0.1")
    # A LoRA session's model is its base model with the LoRA, asked for as A1111 asks: <lora:name:1>.
    lora = f" {session.manifest.models[-1].prompt_tag()}".rstrip()
    try:
        response = requests.post(
            f"{ui.local_url.rstrip('/')}/sdapi/v1/txt2img",
            json={
                "prompt": f"photo of {DEMO_TOKEN}{lora}",
                "steps": 2,
                "width": resolution,
                "height": resolution,
                "seed": 1234,
                "save_images": True,
            },
            timeout=600,
        )
        response.raise_for_status()
        images = response.json()["images"]
        day_folders = [
            path for path in session.dir("outputs").iterdir() if path.is_dir() and path.name[:1].isdigit()
        ]
        saved = max(
            (png for folder in day_folders for png in folder.glob("*.png")),
            key=lambda path: path.stat().st_mtime,
        )
        log(
            f"web UI at {ui.local_url}: POST /sdapi/v1/txt2img answered with {len(images)} image ({saved.name})"
        )
        # Extras: the picture upscaled 2x by a tiny random ESRGAN in the upscalers folder (a model upscaler
        # through spandrel, as a real one would run; its texture is random).
        from nbkit.generation.upscalers import save_tiny_esrgan

        tiny = save_tiny_esrgan(ui.service.upscalers.folder)
        upscaled = requests.post(
            f"{ui.local_url.rstrip('/')}/sdapi/v1/extra-single-image",
            json={"image": images[0], "upscaler_1": tiny.stem, "upscaling_resize": 2},
            timeout=600,
        )
        upscaled.raise_for_status()
        extras = saved.with_name(f"{saved.stem}-extras-2x.png")
        extras.write_bytes(base64.b64decode(upscaled.json()["image"]))
        log(f"POST /sdapi/v1/extra-single-image upscaled it 2x with {tiny.stem} ({extras.name})")
        if keep_running:
            log("The web UI keeps running; press Ctrl+C (or interrupt the cell) to stop it.")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return saved
    finally:
        ui.close()
