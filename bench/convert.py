"""Benchmark: convert a full-size SD 1.5-topology model (random weights) to one fp16 .safetensors file.

Builds UNet, VAE and text encoder from nbkit's shipped sd1 configs (about 1.07 B parameters), saves
them as an fp32 diffusers folder in a temporary directory (about 4.3 GB; check `df -h /tmp`), converts
it in a child process (so building the model does not count towards the conversion's memory), then
times a plain copy of the output file. The last line printed is one JSON object:

    seconds            the conversion, verification included (measured inside the child)
    process_seconds    the child process end to end (Python and torch start-up included)
    copy_seconds       shutil.copyfile of the output file (same size, page cache as warm)
    copy_fsync_seconds the same copy made durable with fsync, as the conversion's output is

Times are the best of `--repeat` runs (default 3) of each; every run's figure is listed too.
    ratio              seconds / copy_seconds (target: within about 1.5)
    ratio_vs_durable_copy  seconds / copy_fsync_seconds
    peak_rss_bytes     the child's peak resident memory (VmHWM)
    rss_ratio          peak_rss_bytes / output size (target: at most about 1.3)

Run: `.venv/bin/python bench/convert.py [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The child reports its own peak RSS from VmHWM: ru_maxrss would include the parent's memory, which a
# forked child inherits (and Linux keeps across exec) before it becomes the converter.
CHILD = """
import json, re, resource, sys
from nbkit.convert import convert_to_single_file
report = convert_to_single_file(sys.argv[1], sys.argv[2], dtype="fp16")
try:
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
except (OSError, AttributeError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": report.seconds, "parameters": report.parameter_count, "peak_rss": peak}))
"""


def build_sd1_folder(folder: Path) -> int:
    """Save a random-weight SD 1.5-topology diffusers folder (fp32); return its parameter count."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nbkit.convert.from_single_file import shipped_config_dir

    configs = shipped_config_dir("sd1")
    generator = torch.Generator().manual_seed(0)
    total = 0
    for name in ("unet", "vae", "text_encoder"):
        with init_empty_weights():
            if name == "text_encoder":
                model = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / name))
            else:
                cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
                model = cls.from_config(cls.load_config(configs / name))
        model.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02, generator=generator)  # random, like an untrained model
                total += parameter.numel()
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(configs / name, folder / name)
    return total


def timed_copy(source: Path, target: Path, *, fsync: bool) -> float:
    started = time.perf_counter()
    shutil.copyfile(source, target)
    if fsync:
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="build in (and keep) this folder")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="write the converted file (and the copies) here, e.g. /dev/shm to take the disk out of it",
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nbkit-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "sd15-random"
        output = (args.output_dir or work) / "sd15-random.safetensors"
        if not (source / "model_index.json").is_file():
            started = time.perf_counter()
            parameters = build_sd1_folder(source)
            print(
                f"built {parameters / 1e9:.3f} B parameters in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        conversions, copies, durable_copies = [], [], []
        for _ in range(args.repeat):
            # Like each copy below, each conversion writes where the previous file of its size was
            # just deleted, and nothing written earlier is still being flushed to disk.
            output.unlink(missing_ok=True)
            os.sync()
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(output)],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["process_seconds"] = time.perf_counter() - started
            conversions.append(result)
        for _ in range(args.repeat):
            os.sync()
            copies.append(timed_copy(output, output.with_name("copy.safetensors"), fsync=False))
            os.sync()
            durable_copies.append(timed_copy(output, output.with_name("copy.safetensors"), fsync=True))
        # Best of N: this machine's disk and page cache are shared and noisy; the minimum is the
        # run least disturbed, for the conversion and the copies alike.
        best = min(conversions, key=lambda result: result["seconds"])
        size = output.stat().st_size
        print(
            json.dumps(
                {
                    "parameters": best["parameters"],
                    "output_bytes": size,
                    "seconds": round(best["seconds"], 2),
                    "process_seconds": round(best["process_seconds"], 2),
                    "copy_seconds": round(min(copies), 2),
                    "copy_fsync_seconds": round(min(durable_copies), 2),
                    "ratio": round(best["seconds"] / min(copies), 2),
                    "ratio_vs_durable_copy": round(best["seconds"] / min(durable_copies), 2),
                    "peak_rss_bytes": max(result["peak_rss"] for result in conversions),
                    "rss_ratio": round(max(result["peak_rss"] for result in conversions) / size, 3),
                    "runs": args.repeat,
                    "all_seconds": [round(result["seconds"], 2) for result in conversions],
                    "all_copy_seconds": [round(value, 2) for value in copies],
                    "all_copy_fsync_seconds": [round(value, 2) for value in durable_copies],
                }
            )
        )
    finally:
        if args.output_dir is not None:
            (args.output_dir / "sd15-random.safetensors").unlink(missing_ok=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
