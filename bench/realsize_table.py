"""Print the computed peak GPU memory of training and generation per family at its native resolution.

T4-friendly settings: fp16 mixed precision (bf16 for FLUX.1, which overflows in fp16), gradient
checkpointing, 8-bit Adam (bitsandbytes' states, modelled), full fine-tuning for SD 1.5 / SD 2.1 and a
rank-16 LoRA for SDXL and FLUX.1; generation holds every component on the GPU. Figures are MemTracker
peaks under FakeTensorMode, 512-byte rounded, before `GPU_OVERHEAD_FACTOR`.

    PYTHONPATH=. python bench/realsize_table.py [FAMILY ...]
"""

from __future__ import annotations

import sys

from nbkit.families import FAMILIES
from nbkit.families.flux1 import LORA_TARGETS as FLUX_LORA_TARGETS
from nbkit.realsize.memory_trace import (
    GPU_OVERHEAD_FACTOR,
    GenerateSettings,
    TrainSettings,
    trace_generation,
    trace_training,
)

ROWS = {
    "sd1": dict(lora_rank=0, precision="fp16"),
    "sd2-v": dict(lora_rank=0, precision="fp16"),
    "sdxl": dict(lora_rank=16, precision="fp16", vae_upcast=True),
    "flux": dict(lora_rank=16, precision="bf16", lora_targets=FLUX_LORA_TARGETS),
}


def main(families: list[str]) -> None:
    print(
        f"{'family':8} {'task':9} {'px':>5} {'peak GiB':>9} {'x' + str(GPU_OVERHEAD_FACTOR):>7} {'trace s':>8}  breakdown"
    )
    for name in families:
        family, row = FAMILIES[name], ROWS[name]
        resolution = family.native_resolution
        train = TrainSettings(resolution, optimizer="adamw8bit", gradient_checkpointing=True, **row)
        generate = GenerateSettings(
            resolution,
            precision="bf16" if family.needs_bf16 else "fp16",
            vae_upcast=row.get("vae_upcast", False),
        )
        mode = f"lora{row['lora_rank']}" if row["lora_rank"] else "full"
        for task, figure in (
            (f"train-{mode}", trace_training(name, train)),
            ("generate", trace_generation(name, generate)),
        ):
            print(
                f"{name:8} {task:9} {resolution:5} {figure.peak_gib:9.2f} {figure.peak_gib * GPU_OVERHEAD_FACTOR:7.2f}"
                f" {figure.seconds:8.0f}  {figure.describe()}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or list(ROWS))
