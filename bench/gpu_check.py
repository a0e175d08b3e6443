"""GPU check: nbkit's training step and txt2img against diffusers-example-style loops on real-width models.

    bench/gpu.sh                                   # on a CUDA GPU (>= 40 GB; an H200 takes ~5 min)
    python bench/gpu_check.py --device cpu --tiny  # the same code paths on nbkit's tiny models (CPU smoke test;
                                                   # its figures check the code runs, they measure nothing)

Parts, each on a random-weight model of the real width (`nbkit.realsize.random_models.save_random_model`,
written once to local disk, or to /dev/shm when it has room):

- `sd1`: SD 1.5 full DreamBooth (stage 2, the UNet) at 512 px with the T4 settings: fp16 mixed precision,
  8-bit AdamW where bitsandbytes is installed, gradient checkpointing, SDPA attention;
- `sdxl`: SDXL rank-16 LoRA of the UNet at 1024 px, same settings;
- `flux-bf16`: FLUX.1 [dev] rank-16 LoRA of the transformer at 512 px, bf16, base in bf16;
- `flux-nf4`: the same on an NF4 (bitsandbytes 4-bit, bf16 compute) base.

Each training row is it/s over `--steps` optimizer steps after `--warmup` steps, with the steady-state
and whole-run CUDA memory peaks, for:

- nbkit: its own stage code, set up as `nbkit.train.trainer` does minus the session (bench/gpu_models.py);
- baseline: a loop written like diffusers' DreamBooth (LoRA) example scripts, with the same settings
  (bench/gpu_baselines.py).

Beside each row, the computed peak from `nbkit/families/figures/<family>.json`. Generation rows (`sd1`,
`sdxl`, `flux-bf16`): txt2img it/s through the web UI's service against a bare diffusers pipeline call on
the same loaded pipeline (bench/gpu_models.py: the models, their shortcuts, the measurements).

Each part runs in its own process with a time limit (`--budget` for all, shared out by PART_BUDGET, time a
part leaves unused going to the next); a part that runs out is killed and reported with the rows it
finished. The table is printed at the end; with `$OUT` set (or `--json PATH`) it is also written as JSON.

This module is the driver: the parts' settings (`make_case`), running each part (`run_part`, in a worker
process or in this one), the budgets, the JSON rows and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The sibling modules, however this file is run (as a script its folder is already on sys.path).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_baselines import BASELINES
from gpu_models import (
    REPO,
    Case,
    GiB,
    computed_train,
    describe_error,
    make_images,
    measure_generation,
    prepare_model,
    release_memory,
    train_nbkit,
)

PARTS = ("sd1", "sdxl", "flux-bf16", "flux-nf4")
# Seconds per part on an H200 (model writing, three loads, two step loops, generation); scaled down
# to fit `--budget` when it is smaller than their sum.
PART_BUDGET = {"sd1": 55, "sdxl": 80, "flux-bf16": 125, "flux-nf4": 80}
FAMILY_OF_PART = {"sd1": "sd1", "sdxl": "sdxl", "flux-bf16": "flux", "flux-nf4": "flux"}


def make_case(part: str, args: argparse.Namespace) -> Case:
    from nbkit.families import get_family

    family = get_family(FAMILY_OF_PART[part])
    cuda = args.device.startswith("cuda")
    native = family.tiny_native_resolution if args.tiny else family.native_resolution
    # The T4 settings; FLUX.1 overflows in fp16, and the CPU has no fp16 autocast nbkit accepts.
    precision = ("bf16" if family.needs_bf16 else "fp16") if cuda else "no"
    flux = part.startswith("flux")
    quantization = None
    if part == "flux-nf4":
        # bitsandbytes needs CUDA: the CPU smoke test takes the same path with torchao's int8.
        quantization = "4bit" if cuda else "8bit"
    return Case(
        part=part,
        family=family.name,
        resolution=native if not flux else (args.flux_resolution if not args.tiny else native),
        lora_rank=0 if part == "sd1" else 16,
        precision=precision,
        use_8bit_adam=cuda and _has("bitsandbytes"),
        quantization=quantization,
        learning_rate=2e-6 if part == "sd1" else 1e-4,
        max_sequence_length=32 if args.tiny else 512,
        generation_resolution=None if part == "flux-nf4" else native,
    )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --- parts ------------------------------------------------------------------------------------------


def run_part(part: str, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """Prepare the part's model and measure its rows; each measurement's failure becomes its row."""
    case = make_case(part, args)
    folder, written_s = prepare_model(case.family, args)
    if written_s:
        emit({"part": part, "task": "write model", "side": "-", "what": str(folder), "setup_s": written_s})
    images = make_images(Path(args.work_dir) / f"images-{case.resolution}", case.resolution)
    computed, computed_note = computed_train(case, args)
    attention = "sdpa"
    for side in ("nbkit", "baseline"):
        row = {"part": part, "task": "train", "side": side, "what": case.describe()}
        row.update(computed_gib=computed, computed_note=computed_note)
        leftover = release_memory()
        try:
            if side == "nbkit":
                figures = train_nbkit(case, folder, images, args)
                attention = figures.pop("attention")
            else:
                figures = BASELINES[case.family](case, folder, images, args, attention)
            row.update(figures)
        except Exception as error:
            row["error"] = describe_error(error)
            traceback.print_exc()
        if leftover > 0.25:
            row.setdefault("notes", []).append(f"{leftover:.1f} GiB left allocated before it")
        emit(row)
    release_memory()
    if case.generation_resolution is not None and not args.no_generation:
        try:
            measure_generation(case, folder, args, emit)
        except Exception as error:
            emit({"part": part, "task": "txt2img", "side": "both", "error": describe_error(error)})
            traceback.print_exc()
        release_memory()


def environment() -> dict[str, Any]:
    import importlib.metadata

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{properties.name}, {properties.total_memory / GiB:.0f} GiB"
    return info


def worker(args: argparse.Namespace) -> None:
    """One part in this process; rows go to `args.results` as JSON lines as they are measured."""
    from nbkit.quiet import quiet_libraries

    quiet_libraries()
    results = Path(args.results)

    def emit(row: dict) -> None:
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{row.get('part')}] {format_row(row)}", file=sys.__stdout__, flush=True)

    if not results.exists() or '"part": "environment"' not in results.read_text():
        emit({"part": "environment", **environment()})
    run_part(args.part, args, emit)


# --- the parent: budgets, the table ------------------------------------------------------------------


def part_timeout(part: str, later: list[str], scale: float, left: float) -> float:
    """Seconds part `part` may run: what is left of the budget less half the shares of the parts after it
    (a part that finishes early leaves its time to the next ones), at most 2.5 times its own share.

    Args:
        part: the part about to run.
        later: the parts after it.
        scale: the budget over the sum of all parts' `PART_BUDGET` (at most 1).
        left: the seconds left of the budget.
    """
    reserved = sum(0.5 * PART_BUDGET[name] * scale for name in later)
    return min(left - reserved, 2.5 * PART_BUDGET[part] * scale)


def run_parts(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "rows.jsonl"
    results.unlink(missing_ok=True)
    parts = args.parts
    deadline = time.monotonic() + args.budget if args.budget > 0 else None
    scale = min(1.0, args.budget / sum(PART_BUDGET[part] for part in parts))
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "NBKIT_HOME": str(work / "home")}
    child_env.setdefault("NBKIT_SCRATCH", str(work / "scratch"))
    for index, part in enumerate(parts, 1):
        if args.in_process:
            _run_in_process(part, args, results)
        else:
            timeout = None
            if deadline is not None:
                timeout = part_timeout(part, parts[index:], scale, deadline - time.monotonic())
                if timeout < 10:
                    _append(results, {"part": part, "error": "skipped: the time budget is spent"})
                    continue
            _run_subprocess(part, argv, results, work, timeout, child_env)
        write_json(args, _read_rows(results))  # after each part: a run killed later keeps what it had
        if not args.keep_models:
            still_needed = {FAMILY_OF_PART[later] for later in parts[index:]}
            for family in {FAMILY_OF_PART[p] for p in parts} - still_needed:
                shutil.rmtree(work / "models" / family, ignore_errors=True)
    return _read_rows(results)


def _read_rows(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def write_json(args: argparse.Namespace, rows: list[dict]) -> Path | None:
    """Write the rows to `--json`, else $OUT/gpu_check.json when OUT is set; returns the path."""
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if not out:
        return None
    settings = {key: value for key, value in vars(args).items() if key not in ("part", "results")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"args": settings, "rows": rows}, indent=2, default=str))
    return Path(out)


def _append(results: Path, row: dict) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"[{row.get('part')}] {format_row(row)}", flush=True)


def _run_in_process(part: str, args: argparse.Namespace, results: Path) -> None:
    log = Path(args.work_dir) / f"{part}.log"
    started = time.monotonic()
    with log.open("w") as handle, contextlib.redirect_stderr(handle):
        try:
            worker(argparse.Namespace(**{**vars(args), "part": part, "results": str(results)}))
        except Exception as error:  # outside the measurements (writing the model, say): the part's row
            traceback.print_exc()
            _append(results, {"part": part, "error": describe_error(error)})
    print(f"  ({part}: {time.monotonic() - started:.0f} s, log {log})", flush=True)


def _run_subprocess(part, argv, results: Path, work: Path, timeout, env) -> None:
    log = work / f"{part}.log"
    # The work dir as the parent resolved it (/dev/shm's free space changes once models are written).
    command = [sys.executable, __file__, *argv, "--work-dir", str(work), "--part", part]
    command += ["--results", str(results)]
    started = time.monotonic()
    with log.open("w") as handle:
        # Rows print to the console as they come; library output goes to the log.
        process = subprocess.Popen(command, stderr=handle, env=env, cwd=REPO)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            _append(
                results,
                {
                    "part": part,
                    "error": f"timed out after {timeout:.0f} s (its share of --budget; rows it finished are kept)",
                },
            )
            return
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        _append(results, {"part": part, "error": f"exit status {code}: {' | '.join(tail)}"})
    print(f"  ({part}: {time.monotonic() - started:.0f} s, log {log})", flush=True)


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_row(row: dict) -> str:
    if row.get("part") == "environment":
        return ", ".join(f"{key} {value}" for key, value in row.items() if key != "part" and value)
    if "error" in row and "it_s" not in row:
        return f"{row.get('task', '')} {row.get('side', '')}: ERROR {row['error']}"
    fields = [row.get("task", ""), row.get("side", ""), row.get("what", "")]
    if "it_s" in row:
        fields.append(f"{_number(row['it_s'])} it/s")
    if row.get("alloc_gib") is not None:
        fields.append(f"alloc {row['alloc_gib']:.2f} GiB, reserved {row['reserved_gib']:.2f} GiB")
    if row.get("setup_s") is not None:
        fields.append(f"{row['setup_s']:.0f} s setup")
    return " | ".join(str(field) for field in fields if field != "")


COLUMNS = (
    ("part", 9),
    ("task", 13),
    ("side", 12),
    ("it/s", 7),
    ("x base", 6),
    ("alloc", 6),
    ("reserv", 6),
    ("run res", 7),
    ("computed", 8),
    ("setup s", 7),
)


def table(rows: list[dict]) -> str:
    """The rows as one table (GiB for memory); ratios are nbkit / baseline it/s within a part and task."""
    base = {
        (row["part"], row.get("task")): row.get("it_s")
        for row in rows
        if row.get("side") in ("baseline", "diffusers")
    }
    lines = [
        " ".join(
            f"{name:>{width}}" if i > 2 else f"{name:<{width}}" for i, (name, width) in enumerate(COLUMNS)
        )
    ]
    lines.append(" " * 0 + "-" * (sum(width for _, width in COLUMNS) + len(COLUMNS) - 1) + "  what / notes")
    for row in rows:
        if row.get("part") == "environment":
            continue
        reference = base.get((row["part"], row.get("task")))
        ratio = None
        if row.get("side") in ("nbkit", "nbkit web UI") and reference and row.get("it_s"):
            ratio = row["it_s"] / reference
        computed = _number(row.get("computed_gib"))
        values = [
            row.get("part", ""),
            row.get("task", ""),
            row.get("side", ""),
            _number(row.get("it_s")),
            _number(ratio),
            _number(row.get("alloc_gib")),
            _number(row.get("reserved_gib")),
            _number(row.get("run_reserved_gib")),
            computed,
            _number(row.get("setup_s"), 0),
        ]
        cells = [
            f"{value:<{width}}" if i <= 2 else f"{value:>{width}}"
            for i, (value, (_, width)) in enumerate(zip(values, COLUMNS, strict=True))
        ]
        notes = [row.get("what", "")]
        if row.get("computed_note") and row.get("computed_gib") is None:
            notes.append(f"computed n/a: {row['computed_note']}")
        notes += row.get("notes", [])
        if row.get("image_s") is not None:
            notes.append(f"{row['image_s']:.2f} s/image")
        if row.get("error"):
            notes.append(f"ERROR {row['error']}")
        lines.append(" ".join(cells) + "  " + "; ".join(note for note in notes if note))
    return "\n".join(lines)


def default_work_dir(tiny: bool) -> Path:
    """/dev/shm when it holds the FLUX.1 folder with room to spare (no disk writes), else the temp dir."""
    shm = Path("/dev/shm")
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 48 * GiB:
        return shm / "nbkit-gpu-check"
    return Path(tempfile.gettempdir()) / ("nbkit-gpu-check-tiny" if tiny else "nbkit-gpu-check")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="nbkit's tiny models instead of real-width ones")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10; tiny 2)")
    parser.add_argument(
        "--gen-steps", type=int, default=None, help="txt2img steps of the long call (default 20; tiny 2)"
    )
    parser.add_argument("--flux-resolution", type=int, default=512, help="FLUX.1 training size")
    parser.add_argument(
        "--flux-t5-layers", type=int, default=2, help="T5 stand-in depth (24: the real T5-XXL)"
    )
    parser.add_argument(
        "--flux-guidance", type=float, default=1.0, help="FLUX.1-dev's training guidance input"
    )
    parser.add_argument("--no-generation", action="store_true", help="training rows only")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for all parts (330 on a GPU; 0: none)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="models and logs (default: /dev/shm or the temp dir)"
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the written models for another run")
    parser.add_argument(
        "--in-process", action="store_true", help="no process per part, no budget (default with --tiny)"
    )
    parser.add_argument("--isolate", action="store_true", help="a process per part even with --tiny")
    parser.add_argument(
        "--json", default=None, help="also write the rows here (default: $OUT/gpu_check.json)"
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    many = args.gen_steps if args.gen_steps is not None else (2 if args.tiny else 20)
    args.gen_steps_pair = (max(1, many // 4), many)
    if args.warmup < 1 or args.steps < 2 or many < 2:
        parser.error("--warmup must be at least 1, --steps and --gen-steps at least 2")
    if args.budget is None:
        args.budget = 0 if args.tiny else 330
    args.in_process = (args.in_process or args.tiny) and not args.isolate
    args.work_dir = str(args.work_dir or default_work_dir(args.tiny))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.part:
        worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NBKIT_HOME", str(Path(args.work_dir) / "home"))
    started = time.monotonic()
    print(
        f"nbkit GPU check: parts {', '.join(args.parts)} on {args.device}{' (tiny)' if args.tiny else ''}, "
        f"work dir {args.work_dir}",
        flush=True,
    )
    rows = run_parts(args, argv)
    print()
    env = next((row for row in rows if row.get("part") == "environment"), {})
    print(format_row(env))
    print(
        f"train it/s: {args.steps} steps after {args.warmup} warmup; txt2img it/s: (N2 - N1) / (t(N2) - t(N1)); "
        "x base: nbkit it/s / baseline it/s\nmemory in GiB: alloc/reserv = CUDA peaks over the measured steps "
        "or the long txt2img call, run res = peak reserved over the whole run (load, caching, steps), computed = "
        "nbkit/families/figures; setup s: start to the end of the first step (or the model load)"
    )
    print(table(rows))
    print(f"({time.monotonic() - started:.0f} s in all)")
    out = write_json(args, rows)
    if out is not None:
        print(f"wrote {out}")
    if not args.keep_models:
        shutil.rmtree(Path(args.work_dir) / "models", ignore_errors=True)


if __name__ == "__main__":
    main()
