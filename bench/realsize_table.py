"""Print the computed GPU memory of each family and what the planner picks on a T4, an L4 and an A100.

Reads the figures shipped with each family (`nbkit/families/figures/*.json`, traced at full width by
`python -m nbkit.realsize.figures FAMILY`) and asks the planner (`nbkit.models.memory`) what a new
session's settings get on each GPU: training (stage 1 and stage 2 at the native resolution, batch 1,
8-bit Adam, gradient checkpointing, `training_mode` auto) and generation (one image at the native
size). Figures include `OVERHEAD_FACTOR`; the planner keeps `HEADROOM_GIB` free besides.

    PYTHONPATH=. python bench/realsize_table.py [--markdown] [FAMILY ...]

`--trace FAMILY RESOLUTION BATCH` traces one more training step (stage 2, the family's default mode)
at another size and prints it beside the planner's scaled estimate, to check the scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, get_family
from nbkit.models.memory import (
    HEADROOM_GIB,
    OVERHEAD_FACTOR,
    DeviceFacts,
    TrainingRun,
    generation_options,
    plan_memory,
    plan_training,
    training_options,
)
from nbkit.session.settings import TrainConfig

GPUS = {
    "T4 15 GB": DeviceFacts("Tesla T4", 15.0, bf16=False),
    "L4 24 GB": DeviceFacts("NVIDIA L4", 22.5, bf16=True),
    "A100 40 GB": DeviceFacts("NVIDIA A100-SXM4-40GB", 39.6, bf16=True),
}
QUANTIZERS = ("bitsandbytes",)


def _config(name: str) -> TrainConfig:
    family = get_family(name)
    return TrainConfig(resolution=family.native_resolution).replace(**family.training_defaults)


def _refusal(error: NbkitError) -> str:
    if "no bfloat16" in error.message:
        return "no (no bf16)"
    needs = re.search(r"needs about ([\d.]+) GiB", error.message)
    return f"no (needs {needs.group(1)})" if needs else "no"


def _training_cell(name: str, device: DeviceFacts) -> str:
    try:
        plan = plan_training(name, _config(name), device, quantizers=QUANTIZERS)
    except NbkitError as error:
        return _refusal(error)
    rank = plan.changes.get("lora_rank") or _config(name).lora_rank
    mode = f"LoRA r{rank}" if rank else "full"
    way = f" {plan.option.name}" if plan.option.name != "resident" else ""
    return f"{mode}{way}, {plan.option.peak_gib:.1f}"


def _generation_cell(name: str, device: DeviceFacts) -> str:
    try:
        option = plan_memory(name, "generate", device, quantizers=QUANTIZERS)
    except NbkitError as error:
        return _refusal(error)
    return f"{option.name}, {option.peak_gib:.1f}"


def _stage_figures(name: str) -> str:
    family = get_family(name)
    cells = []
    modes = (True, False) if family.trains_full_denoiser else (False,)
    for full in modes:
        for stage in ("text_encoder", "denoiser") if family.trains_text_encoders else ("denoiser",):
            run = TrainingRun(full=full, stages=(stage,))
            options = training_options(family, run)
            label = ("full" if full else "LoRA") + (" TE" if stage == "text_encoder" else "")
            cells.append(f"{label} {options[0].peak_gib:.1f}")
            if not full:
                fp32 = dataclasses.replace(run, eight_bit_adam=True, gradient_checkpointing=False)
                cells.append(f"{label} no-ckpt {training_options(family, fp32)[0].peak_gib:.1f}")
        if full:
            adamw = TrainingRun(full=True, eight_bit_adam=False)
            cells.append(f"full AdamW {training_options(family, adamw)[0].peak_gib:.1f}")
    return "; ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--trace", nargs=3, metavar=("FAMILY", "RESOLUTION", "BATCH"))
    args = parser.parse_args()
    names = args.families or [name for name in FAMILIES if get_family(name).memory_figures() is not None]
    print(f"GiB, computed (x{OVERHEAD_FACTOR} overhead; {HEADROOM_GIB} GiB kept free for the CUDA context)\n")
    header = ["family", "task", *GPUS]
    rows = []
    for name in names:
        title = get_family(name).title
        rows.append([title, "train (new session)", *(_training_cell(name, gpu) for gpu in GPUS.values())])
        rows.append([title, "generate", *(_generation_cell(name, gpu) for gpu in GPUS.values())])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    for name in names:
        print(
            f"{get_family(name).title} stages at {get_family(name).native_resolution} px: {_stage_figures(name)}"
        )
        options = generation_options(name, precision="bf16" if get_family(name).needs_bf16 else "fp16")
        print("  generation ways: " + "; ".join(f"{o.name} {o.peak_gib:.1f}" for o in options))
    if args.trace:
        _check_scaling(args.trace[0], int(args.trace[1]), int(args.trace[2]))


def _check_scaling(name: str, resolution: int, batch: int) -> None:
    from nbkit.realsize.memory_trace import TrainSettings, trace_training

    family = get_family(name)
    full = family.trains_full_denoiser
    precision = "bf16" if family.needs_bf16 else "fp16"
    settings = TrainSettings(
        resolution,
        batch=batch,
        precision=precision,
        optimizer="adamw8bit",
        lora_rank=0 if full else 16,
        lora_targets=family.lora_target_modules(family.denoiser),
        text_cached=family.offloads_text_encoders,
    )
    figure = trace_training(name, settings)
    run = TrainingRun(full=full, resolution=resolution, batch=batch)
    from nbkit.models.memory_figures import training_estimate

    estimate = training_estimate(family, stage="denoiser", full=full, resolution=resolution, batch=batch)
    traced = figure.peak_gib * OVERHEAD_FACTOR
    print(
        f"\n{family.title} stage 2 at {resolution} px, batch {batch} ({run.describe(family)}): traced "
        f"{traced:.2f} GiB, scaled from the native figures {estimate.step:.2f} GiB "
        f"(ratio {estimate.step / traced:.3f})"
    )


if __name__ == "__main__":
    main()
