"""Benchmark: convert a full-size SD 1.5-topology model (random weights) to one fp16 .safetensors file.

Builds UNet, VAE and text encoder from nbkit's shipped sd1 configs (about 1.07 B parameters), saves
them as an fp32 diffusers folder in a temporary directory (about 4.3 GB; check `df -h /tmp`), converts
it in a child process (so building the model does not count towards the conversion's memory), then
times copies of the output file. The last line printed is one JSON object:

    seconds            the conversion, verification included (measured inside the child)
    process_seconds    the child process end to end (Python and torch start-up included)
    copy_seconds       shutil.copyfile of the output file (same size)
    copy_fsync_seconds the same copy made durable with fsync, as the conversion's output is
    ratio              seconds / copy_seconds (the issue's target: within about 1.5)
    ratio_vs_durable_copy  seconds / copy_fsync_seconds (the fair one: the conversion fsyncs)
    peak_rss_bytes     the child's peak resident memory (VmHWM)
    rss_ratio          peak_rss_bytes / output size (target: at most about 1.3)
    cold               the same figures with the page cache dropped before every run (the source, or
                       the file copied, read from disk), when this machine lets us drop it (root)

Times are the best of `--repeat` runs (default 3) of each, after one untimed warm-up run of each; every
run's figure is listed too. Every timed run, conversion or copy, starts the same way: the previous
output deleted, everything synced, then a pause of SETTLE_SECONDS. The pause matters on VMs with free
page reporting (virtio-balloon): memory freed a moment ago is still backed by the host and cheap to
reuse, memory freed seconds ago costs a host fault per page (about 1.4 s per GB here). A conversion,
which starts a child process first, always gets the expensive kind; without the pause a copy run just
after the previous copy was deleted gets the cheap kind, and looks several times faster than it is.

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


SETTLE_SECONDS = 5.0  # longer than free page reporting's 2 s delay (see the module docstring)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle(output: Path, *, cold: bool) -> None:
    """Start a timed run the same way every time: no previous output, nothing dirty, memory settled."""
    output.unlink(missing_ok=True)
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")
    time.sleep(SETTLE_SECONDS)


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def warm_up(target: Path) -> None:
    """Read the file (or every file of the folder) once, so that a warm run finds it in the page cache."""
    buffer = bytearray(16 << 20)
    for path in [target] if target.is_file() else sorted(target.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def timed_conversion(source: Path, output: Path) -> dict:
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(output)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def timed_copy(source: Path, target: Path, *, fsync: bool) -> float:
    started = time.perf_counter()
    shutil.copyfile(source, target)
    if fsync:
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - started


def measure(source: Path, output: Path, repeat: int, *, cold: bool) -> dict:
    """Best-of-`repeat` conversion and copy times (after an untimed warm-up of each), and their ratios."""
    copy = output.with_name("copy.safetensors")
    conversions, copies, durable_copies = [], [], []
    for run in range(repeat + 1):
        settle(output, cold=cold)
        if not cold:
            warm_up(source)
        result = timed_conversion(source, output)
        if run:
            conversions.append(result)
    for run in range(repeat + 1):
        for fsync, times in ((False, copies), (True, durable_copies)):
            settle(copy, cold=cold)
            if not cold:
                warm_up(output)
            elapsed = timed_copy(output, copy, fsync=fsync)
            if run:
                times.append(elapsed)
    copy.unlink(missing_ok=True)
    # Best of N: this machine's disk and memory are shared and noisy; the minimum is the run least
    # disturbed, for the conversion and the copies alike.
    best = min(conversions, key=lambda result: result["seconds"])
    size = output.stat().st_size
    peak = max(result["peak_rss"] for result in conversions)
    return {
        "parameters": best["parameters"],
        "output_bytes": size,
        "seconds": round(best["seconds"], 2),
        "process_seconds": round(best["process_seconds"], 2),
        "copy_seconds": round(min(copies), 2),
        "copy_fsync_seconds": round(min(durable_copies), 2),
        "ratio": round(best["seconds"] / min(copies), 2),
        "ratio_vs_durable_copy": round(best["seconds"] / min(durable_copies), 2),
        "peak_rss_bytes": peak,
        "rss_ratio": round(peak / size, 3),
        "runs": repeat,
        "all_seconds": [round(result["seconds"], 2) for result in conversions],
        "all_copy_seconds": [round(value, 2) for value in copies],
        "all_copy_fsync_seconds": [round(value, 2) for value in durable_copies],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="build in (and keep) this folder")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    parser.add_argument("--no-cold", action="store_true", help="skip the runs with the page cache dropped")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="write the converted file (and the copies) here, e.g. /dev/shm to take the disk out of it",
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nbkit-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    output = (args.output_dir or work) / "sd15-random.safetensors"
    try:
        source = work / "sd15-random"
        if not (source / "model_index.json").is_file():
            started = time.perf_counter()
            parameters = build_sd1_folder(source)
            print(
                f"built {parameters / 1e9:.3f} B parameters in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        result = measure(source, output, args.repeat, cold=False)
        print(json.dumps(result), flush=True)
        if not args.no_cold and can_drop_caches():
            cold = measure(source, output, args.repeat, cold=True)
            result["cold"] = {
                key: value for key, value in cold.items() if key not in ("parameters", "output_bytes")
            }
        print(json.dumps(result))
    finally:
        output.unlink(missing_ok=True)
        output.with_name("copy.safetensors").unlink(missing_ok=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
