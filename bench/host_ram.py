"""Host RAM at real width: the peak resident memory (RSS) of nbkit's load, convert and export paths.

For each family named on the command line this builds a full-width random-weight diffusers folder
(`nbkit.realsize.random_models.save_random_model`, half precision; or reuses `<--models-dir>/<family>`),
then runs every measurement in its own fresh Python process and prints one row per measurement:

    family | what | source | peak RSS GiB | under 12.7 GB | seconds

- convert: the diffusers folder -> one .safetensors file (`nbkit.convert.convert_to_single_file`,
  fp16, verification on; FLUX.1: the transformer file `nbkit.convert.flux.save_flux_transformer`,
  bf16, which is what `nbkit convert` writes for it). The file it writes is the "single file" source
  of the rows below.
- train: `nbkit.train.components.load_components`, as `nbkit.train.trainer` calls it on a Colab GPU:
  frozen weights in float16 (bfloat16 for FLUX.1), no quantization.
- webui: what `nbkit.webui.loading.ModelLoading._load` does before it places the pipeline on the GPU:
  `load_pipeline` in the family's GPU generation dtype; a single file added by path has no known
  family, so it loads in the default family's dtype and is cast once its family is known.
- lora export: a training load (folder), rank-16 LoRA adapters on the denoiser and the trainable text
  encoders (float32, as `make_trainable` leaves them), then `nbkit.train.export.export_lora`. The
  process's peak is reported, and in `note` the peak of the export alone (VmHWM reset before it):
  on Colab the model sits on the GPU by then, so the export's own cost is what the host adds.
- build: writing the random folder itself (only when it is built here).

How the peak is read: each child reports its own VmHWM (/proc/self/status) on its last stdout line.
`getrusage(RUSAGE_CHILDREN).ru_maxrss` is not used: Linux carries the parent's high-water mark
into a child across fork and exec, so it reads at least the parent's size. While a child runs, the
parent also polls its VmHWM, so a child killed for memory still gets a (lower-bound) figure.
"Under 12.7 GB" compares VmHWM with 12.7e9 bytes (11.83 GiB), the stricter reading of Colab's figure.

Two columns, because most weights are never copied: safetensors files are mapped, and weights already in
the load dtype stay those mappings, so the touched file pages count in RSS (VmHWM) although the kernel can
drop them at any time (they are clean page cache). `anon GiB` is the largest anonymous RSS seen (polled
every 0.1 s, so a spike shorter than that can be missed): the memory that cannot be dropped, and what
runs a Colab kernel out of memory. A FLUX.1 load shows both: VmHWM stops at this machine's RAM while
the kernel drops mapped pages, and the anonymous part stays small.

Run (about 10 min for sd1 and sdxl on 2 cores; 2 GB + 7 GB of disk per family for folder and file):

    PYTHONPATH=$PWD .venv/bin/python bench/host_ram.py sd1 sdxl --models-dir /work/big
    PYTHONPATH=$PWD .venv/bin/python bench/host_ram.py flux --models-dir /work/big --only convert

`--only` takes a comma list of build, convert, train, webui, lora; `--json FILE` writes the rows too.
Without `--models-dir` the folders and files go to a temporary folder that is deleted at the end.
FLUX.1 needs about 33 GB (folder) + 24 GB (transformer file) of disk, and its unquantized training and
web UI loads hold the 12-billion-parameter transformer (24 GB in bf16), more than this machine's RAM:
they are refused here unless `--allow-over-ram` or `--quantization 8bit|4bit` is given (the
transformer loads quantized as training and the web UI do on smaller GPUs; `--only train,webui,lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 12.7e9
WHATS = ("build", "convert", "train", "webui", "lora")
LORA_RANK = 16  # what training_mode `auto` trains where the full model does not fit (SDXL on a T4)


def vmhwm(pid: int | str = "self") -> int | None:
    """The peak RSS (bytes) of process `pid` so far, from /proc; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else None


def rss_anon(pid: int | str = "self") -> int | None:
    """The anonymous (not file-backed) part of process `pid`'s RSS (bytes) now; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"RssAnon:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else None


def reset_vmhwm() -> None:
    """Start a new high-water mark at the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------------------------------------------
# The child side: one measurement, then its peak on the last line of stdout.


def _gpu_dtype(family: str | None) -> Any:
    from nbkit.generation.placement import generation_dtype

    return generation_dtype(family, "cuda")  # what a Colab GPU loads; nothing here touches CUDA


def _offline_tokenizers(source: str) -> None:
    """A single file carries no tokenizer and this machine cannot fetch the real one from the hub:
    use nbkit's tiny offline tokenizer (a few MB either way; what matters here is the weights)."""
    if not Path(source).is_file():
        return
    import nbkit.convert.from_single_file as from_single_file
    from nbkit.families import get_family
    from nbkit.tokenizers import EOS_TOKEN, make_clip_tokenizer

    def tiny(name: str, family: str, folder: Path, vocab_size: int) -> Any:
        pad = "!" if get_family(family).open_clip_tokenizer(name) else EOS_TOKEN
        return make_clip_tokenizer(pad_token=pad)

    from_single_file.load_tokenizer = tiny


def touch(pipeline: Any) -> None:
    """Read every weight once, as moving the pipeline to the GPU does: weights still mapped from the
    file count in RSS only once read (as page-cache pages, which the kernel can drop, unlike copies)."""
    import torch

    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in (*module.parameters(), *module.buffers()):
                torch.count_nonzero(tensor.detach())


def _child_build(spec: dict) -> dict:
    from nbkit.realsize.random_models import save_random_model

    save_random_model(spec["family"], spec["folder"])
    return {}


def _child_convert(spec: dict) -> dict:
    from nbkit.families import get_family

    if get_family(spec["family"]).single_file is None:  # FLUX.1: the transformer file `nbkit convert` writes
        from nbkit.convert.flux import save_flux_transformer

        save_flux_transformer(spec["folder"], spec["single"], dtype="bf16")
    else:
        from nbkit.convert import convert_to_single_file

        convert_to_single_file(spec["folder"], spec["single"], dtype="fp16")
    return {}


def _load_for_training(spec: dict):
    """The family and the components of `spec`'s model, loaded as the trainer loads them, every weight read."""
    from nbkit.families import get_family
    from nbkit.train.components import load_components

    family = get_family(spec["family"])
    _offline_tokenizers(spec["source"])
    components = load_components(
        spec["source"],
        family.name,
        family.prediction_type,
        _gpu_dtype(family),
        quantization=spec.get("quantization"),
    )
    touch(components.pipeline)
    return family, components


def _child_train(spec: dict) -> dict:
    _, components = _load_for_training(spec)
    return {"dtype": str(components.unet.dtype).removeprefix("torch.")}


def _child_webui(spec: dict) -> dict:
    from nbkit.families import family_of_pipeline
    from nbkit.models.loading import load_pipeline
    from nbkit.webui.models import folder_family

    # ModelLoading._load up to `_place`: a folder's family comes from its configs, a file's once loaded.
    _offline_tokenizers(spec["source"])
    family = folder_family(spec["source"])
    pipeline = load_pipeline(
        spec["source"], family=family, torch_dtype=_gpu_dtype(family), quantization=spec.get("quantization")
    )
    if family is None:
        loaded = family_of_pipeline(pipeline)
        if _gpu_dtype(None) != _gpu_dtype(loaded):
            pipeline = pipeline.to(dtype=_gpu_dtype(loaded))
    touch(pipeline)
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    return {"dtype": str(denoiser.dtype).removeprefix("torch.")}


def _child_lora(spec: dict) -> dict:
    from nbkit.train.components import add_lora, make_trainable
    from nbkit.train.export import export_lora

    family, components = _load_for_training(spec)
    roles = [components.denoiser_role]
    if family.trains_text_encoders:
        roles += components.text_encoder_roles
    for role in roles:
        model = components.model(role)
        add_lora(model, rank=LORA_RANK, alpha=None, targets=components.lora_targets(role), seed=0)
        make_trainable(model, lora=True)
    before = vmhwm()
    reset_vmhwm()
    started = time.perf_counter()
    files = export_lora(
        components,
        dict.fromkeys(roles, "lora"),
        Path(spec["out"]),
        "bench",
        metadata={},
        resolution=family.native_resolution,
    )
    return {
        "load_peak": before,
        "export_peak": vmhwm(),
        "export_seconds": time.perf_counter() - started,
        "sizes": {kind: path.stat().st_size for kind, path in files.items()},
    }


CHILDREN = {
    "build": _child_build,
    "convert": _child_convert,
    "train": _child_train,
    "webui": _child_webui,
    "lora": _child_lora,
}


def child_main(spec: dict) -> None:
    result = CHILDREN[spec["what"]](spec)
    print(json.dumps({**result, "peak_rss": vmhwm(), "end_anon": rss_anon()}), flush=True)


# ---------------------------------------------------------------------------------------------------
# The parent side: runs the children and prints the table. It imports nothing heavy, so it stays small.


def run_child(spec: dict, log: Path) -> dict:
    """Run one measurement in a fresh process; its result with `peak_rss`, `seconds` and `ok`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        polled = [0, 0]  # VmHWM, the largest RssAnon seen

        def poll() -> None:
            while process.poll() is None:
                polled[0] = max(polled[0], vmhwm(process.pid) or 0)
                polled[1] = max(polled[1], rss_anon(process.pid) or 0)
                time.sleep(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        out, _ = process.communicate()
        watcher.join()
    seconds = time.perf_counter() - started
    lines = out.decode().strip().splitlines()
    if process.returncode == 0 and lines:
        result = json.loads(lines[-1])
        return {**result, "peak_anon": polled[1], "seconds": seconds, "ok": True}
    return {
        "peak_rss": polled[0],
        "peak_anon": polled[1],
        "seconds": seconds,
        "ok": False,
        "rc": process.returncode,
    }


def gib(value: float | None) -> str:
    return "-" if not value else f"{value / 2**30:.2f}"


def _note(result: dict) -> str:
    if not result.get("ok"):
        return f"FAILED rc={result.get('rc')} (peak polled so far); see the log"
    parts = []
    if "dtype" in result:
        parts.append(result["dtype"])
    if "export_peak" in result:
        parts.append(
            f"load+LoRA {gib(result['load_peak'])} GiB, export alone {gib(result['export_peak'])} GiB"
        )
    return "; ".join(parts)


def print_table(rows: list[dict]) -> None:
    header = ["family", "what", "source", "peak RSS GiB", "under 12.7 GB", "anon GiB", "seconds", "note"]
    table = [header] + [
        [
            row["family"],
            row["what"],
            row["source"],
            gib(row["peak_rss"]),
            "yes" if row["ok"] and row["peak_rss"] < LIMIT_BYTES else "no",
            gib(row["peak_anon"]),
            f"{row['seconds']:.0f}",
            _note(row),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for number, line in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)), flush=True)
        if number == 0:
            print("-|-".join("-" * width for width in widths), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="sd1, sd2, sd2-v, sdxl, flux")
    parser.add_argument("--models-dir", type=Path, help="keep and reuse the random folders and files here")
    parser.add_argument("--only", default=",".join(WHATS), help="comma list of " + ", ".join(WHATS))
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--allow-over-ram", action="store_true", help="run loads bigger than this machine")
    parser.add_argument(
        "--quantization",
        choices=("8bit", "4bit"),
        help="FLUX.1 loads with this (bitsandbytes needs a CUDA GPU; torchao 8-bit runs on the CPU)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    if not args.families:
        parser.error("name at least one family")
    only = set(args.only.split(","))
    if only - set(WHATS):
        parser.error(f"--only takes {', '.join(WHATS)}")
    temporary = None
    if args.models_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="nbkit-host-ram-", dir=os.environ.get("NBKIT_BIG_TMP"))
        root = Path(temporary.name)
    else:
        root = args.models_dir
    root.mkdir(parents=True, exist_ok=True)
    log = root / "host_ram.log"
    print(f"children's stderr: {log}", flush=True)
    rows: list[dict] = []

    def measure(family: str, what: str, source: str, spec: dict) -> dict:
        result = run_child({"family": family, "what": what, **spec}, log)
        rows.append({"family": family, "what": what, "source": source, **result})
        print_table(rows[-1:])
        return result

    try:
        for family in args.families:
            folder = root / family
            single = root / f"{family}.safetensors"
            # FLUX.1's transformer alone is 24 GB in bf16, more than this machine's RAM, unless quantized.
            quantization = args.quantization if family == "flux" else None
            too_big = family == "flux" and not (args.allow_over_ram or quantization)
            if not (folder / "model_index.json").is_file():
                if folder.exists():
                    raise SystemExit(f"{folder} is incomplete: delete it to build it again")
                partial = folder.with_name(folder.name + ".partial")
                if partial.exists():
                    raise SystemExit(f"{partial} is left from an interrupted build: delete it")
                result = measure(family, "build", "-", {"folder": str(partial)})
                if not result["ok"]:
                    raise SystemExit(f"building {family} failed; see {log}")
                partial.rename(folder)
            if "convert" in only or not single.is_file():
                if single.exists():
                    single.unlink()
                measure(family, "convert", "folder", {"folder": str(folder), "single": str(single)})
            sources = {"folder": folder, "single file": single}
            if family == "flux":
                sources.pop("single file")  # the FLUX.1 file is a transformer, not a model to open alone
            for what in ("train", "webui"):
                for name, source in sources.items():
                    if what in only and not too_big:
                        measure(family, what, name, {"source": str(source), "quantization": quantization})
            if "lora" in only and not too_big:
                with tempfile.TemporaryDirectory(dir=root) as out:
                    spec = {"source": str(folder), "out": out, "quantization": quantization}
                    measure(family, "lora", "folder", spec)
    finally:
        if temporary is not None:
            temporary.cleanup()
    print(flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
