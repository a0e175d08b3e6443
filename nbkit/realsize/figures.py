"""Compute a family's memory figures (the traces the planner reads) and write them beside its adapter.

    python -m nbkit.realsize.figures FAMILY [FAMILY ...]     # writes nbkit/families/figures/FAMILY.json

What is traced, at the family's native resolution and batch 1, in its training precision (bf16 for
families that need it, else fp16 mixed precision), with 8-bit Adam (bitsandbytes' states, modelled):

- training, per stage nbkit runs (stage 1 `text_encoder` where the family trains its text encoders,
  stage 2 `denoiser`) x full fine-tuning (where the family allows it) or a rank-16 LoRA of the
  adapter's LoRA targets x gradient checkpointing on / off (stage 1: on only);
- generation, phase by phase (`text`, `denoise` with classifier-free guidance where the family uses
  it, `decode`), so the planner can add the phases up for a resident pipeline or take the largest one
  for model CPU offload.

Each row is traced at batch 1 and 2 and keeps the breakdown at batch 1's peak (parameters,
gradients, optimizer, activations, temporaries, inputs), batch 2's peak (how the peak grows with the
batch or the pixels) and the number of parameters that train, so the planner can scale activations to another
size or batch and swap 8-bit Adam for AdamW's float32 states (`nbkit.models.memory`). Text encoders
that a family keeps on the CPU while training (`offloads_text_encoders`) are not resident in its
training rows. A full set takes minutes to an hour of one CPU core (SDXL and FLUX.1 are the long ones;
Z-Image and FLUX.2 [klein] about a minute each, LoRA rows only: their families train no full model).

The planner reads one document per family, traced from its shipped configs (FLUX.2 [klein]: the 4B).
`--config nbkit/configs/flux2-klein-9b --out DIR` traces another folder of a family for reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path
from typing import Any

from nbkit.families import FAMILIES, get_family
from nbkit.families.base import Family
from nbkit.fsio import atomic_write_json
from nbkit.realsize.memory_trace import (
    GenerateSettings,
    MemoryFigure,
    TrainSettings,
    _trace_models,
    generation_phases,
    prepare_generation,
    prepare_training,
    track_peak,
)

FIGURES_DIR = Path(__file__).resolve().parents[1] / "families" / "figures"
LORA_RANK = 16


def training_rows(family: Family) -> list[TrainSettings]:
    """The training settings traced for `family` (module docstring)."""
    precision = "bf16" if family.needs_bf16 else "fp16"
    rows = []
    stages = ("text_encoder", "denoiser") if family.trains_text_encoders else ("denoiser",)
    for stage in stages:
        for rank in (0, LORA_RANK) if family.trains_full_denoiser else (LORA_RANK,):
            for checkpointing in (True, False) if stage == "denoiser" else (True,):
                rows.append(
                    TrainSettings(
                        family.native_resolution,
                        precision=precision,
                        optimizer="adamw8bit",
                        gradient_checkpointing=checkpointing,
                        lora_rank=rank,
                        lora_targets=family.lora_target_modules(family.denoiser),
                        stage=stage,
                        text_cached=family.offloads_text_encoders,
                    )
                )
    return rows


def _row(settings: TrainSettings, figure: MemoryFigure, double: MemoryFigure, trained: int) -> dict[str, Any]:
    return {
        "stage": settings.stage,
        "mode": "lora" if settings.lora_rank else "full",
        "lora_rank": settings.lora_rank,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "optimizer": settings.optimizer,
        "trained_parameters": trained,
        "peak": figure.peak_bytes,
        "peak_batch_2": double.peak_bytes,
        "breakdown": figure.breakdown,
    }


def _trace_step(
    name: str, settings: TrainSettings, folder: Path | None = None
) -> tuple[MemoryFigure, dict[str, dict[str, int]], int]:
    family = get_family(name)
    models, fake_mode = _trace_models(name, folder)
    components = {
        key: {"parameters": sum(p.numel() for p in model.parameters())} for key, model in models.items()
    }
    with fake_mode:
        step = prepare_training(models, settings, family)
    trained = sum(p.numel() for model in models.values() for p in model.parameters() if p.requires_grad)
    # Text encoders the trainer keeps on the CPU while training are not resident.
    offloaded = family.offloads_text_encoders
    tracked = {
        key: model for key, model in models.items() if not (offloaded and key.startswith("text_encoder"))
    }
    return track_peak(step, tracked, fake_mode=fake_mode, cuda_rounding=True), components, trained


def _trace_generation(
    name: str, settings: GenerateSettings, folder: Path | None = None
) -> dict[str, tuple[tuple[str, ...], MemoryFigure]]:
    family = get_family(name)
    models, fake_mode = _trace_models(name, folder)
    with fake_mode:
        prepare_generation(models, settings, family)  # casts the models
        phases = generation_phases(models, settings, family)
    return {
        phase: (
            names,
            track_peak(step, {key: models[key] for key in names}, fake_mode=fake_mode, cuda_rounding=True),
        )
        for phase, (names, step) in phases.items()
    }


def compute_figures(name: str, *, folder: Path | None = None, log=print) -> dict[str, Any]:
    """Trace every row of family `name`, at batch 1 and 2, and return the figures document (module
    docstring).

    Args:
        name: the family.
        folder: another config folder of the family than the one its figures are traced from (the
            planner reads one document per family: the others' figures are for reading).
        log: where each row's line goes.
    """
    import diffusers
    import torch

    family = get_family(name)
    precision = "bf16" if family.needs_bf16 else "fp16"
    train = []
    for settings in training_rows(family):
        figure, components, trained = _trace_step(name, settings, folder)
        double, _, _ = _trace_step(name, dataclasses.replace(settings, batch=2), folder)
        train.append(_row(settings, figure, double, trained))
        log(
            f"{name} train {settings.stage} rank {settings.lora_rank} ckpt {settings.gradient_checkpointing}: "
            f"{figure.describe()}, batch 2 {double.peak_gib:.2f} GiB [{figure.seconds + double.seconds:.0f} s]"
        )
    settings = GenerateSettings(family.native_resolution, precision=precision, vae_upcast=False)
    single = _trace_generation(name, settings, folder)
    double = _trace_generation(name, dataclasses.replace(settings, batch=2), folder)
    generate = {}
    for phase, (names, figure) in single.items():
        generate[phase] = {
            "components": list(names),
            "peak": figure.peak_bytes,
            "peak_batch_2": double[phase][1].peak_bytes,
            "breakdown": figure.breakdown,
        }
        log(f"{name} generate {phase}: {figure.describe()}, batch 2 {double[phase][1].peak_gib:.2f} GiB")
    return {
        "family": name,
        "resolution": family.native_resolution,
        "batch": 1,
        "precision": precision,
        "lora_rank": LORA_RANK,
        "components": components,
        "train": train,
        "generate": generate,
        "computed_with": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "method": "FakeTensorMode + MemTracker, 512-byte rounding (nbkit.realsize.memory_trace)",
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    parser.add_argument("--out", type=Path, default=FIGURES_DIR)
    parser.add_argument(
        "--config",
        type=Path,
        help="trace this config folder of the (one) family instead (e.g. nbkit/configs/flux2-klein-9b), "
        "written as <out>/<folder name>.json",
    )
    args = parser.parse_args(argv)
    if args.config is not None and (len(args.families) != 1 or args.out == FIGURES_DIR):
        parser.error("--config traces one family into another --out folder than the shipped figures")
    for name in args.families:
        document = compute_figures(name, folder=args.config, log=lambda line: print(line, flush=True))
        if args.config is not None:
            document["config"] = args.config.name
        path = args.out / f"{args.config.name if args.config else name}.json"
        atomic_write_json(path, document)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
