"""What the web UI adds to a generation: the A1111 API versus a bare diffusers pipeline call.

Usage: `python bench/ui.py [--steps 20] [--size 64] [--repeats 5] [--family sd1]`

Both sides render the same txt2img request (one image, the same prompt, seed, sampler and step count)
on the same tiny random-weight model, on the CPU:

- bare: `StableDiffusionPipeline(...)(prompt, num_inference_steps=..., generator=...)` in this
  process, with the scheduler A1111's "Euler" maps to;
- api: `POST /sdapi/v1/txt2img` to `nbkit.webui.launch(...)` on loopback (HTTP Basic auth on), which
  goes through the request parsing, the GPU queue, the generation service, the PNG with its
  infotext, saving into the outputs folder, and base64 in JSON.

Each side is warmed up once and timed as the best of `--repeats` runs, alternating sides so both see
the same machine load. The last line is one JSON object with both times and the ratio (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPT = "photo of zwx toy on a table"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sd2-v", "sdxl"])
    args = parser.parse_args()

    import requests
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    from nbkit.models.tiny import save_tiny_pipeline
    from nbkit.webui import launch

    with tempfile.TemporaryDirectory() as scratch:
        folder = save_tiny_pipeline(args.family, Path(scratch) / "tiny")
        bare = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        bare.scheduler = EulerDiscreteScheduler.from_config(bare.scheduler.config)
        bare.set_progress_bar_config(disable=True)

        def run_bare() -> None:
            bare(
                PROMPT,
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                guidance_scale=7.0,
                generator=torch.Generator("cpu").manual_seed(1234),
            )

        os.environ["NBKIT_HOME"] = str(Path(scratch) / "home")  # outputs land in the scratch folder
        ui = launch(model=str(folder), auth="bench:bench-password")
        try:
            payload = {
                "prompt": PROMPT,
                "seed": 1234,
                "steps": args.steps,
                "width": args.size,
                "height": args.size,
                "cfg_scale": 7.0,
                "sampler_name": "Euler",
                "scheduler": "Automatic",
            }

            def run_api() -> None:
                response = requests.post(
                    f"{ui.local_url.rstrip('/')}/sdapi/v1/txt2img",
                    json=payload,
                    auth=("bench", "bench-password"),
                    timeout=600,
                )
                response.raise_for_status()
                assert len(response.json()["images"]) == 1

            run_bare()
            run_api()  # loads the model
            times: dict[str, list[float]] = {"bare": [], "api": []}
            for _ in range(args.repeats):
                for name, run in (("bare", run_bare), ("api", run_api)):
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
        finally:
            ui.close()
    bare_s, api_s = min(times["bare"]), min(times["api"])
    print(
        f"bare diffusers call: {bare_s:.3f} s   A1111 API through nbkit: {api_s:.3f} s (best of {args.repeats})"
    )
    print(
        json.dumps(
            {
                "family": args.family,
                "steps": args.steps,
                "size": args.size,
                "bare_seconds": round(bare_s, 4),
                "api_seconds": round(api_s, 4),
                "ratio": round(api_s / bare_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
