"""Host RAM at real width: a full-size SD 1.5 loads for training and runs its UNet within Colab's 12.7 GB.

The model is random-weight but full width (`nbkit model random`, float16 on disk as the hub's fp16
files are). A fresh child process loads it the way `nbkit.train.trainer` does
(`load_components`) and runs one UNet forward pass at 512 px, batch 1, without gradients. The frozen
weights are float32, what the trainer chooses on a CPU (`resolve_precision("auto", cpu)`): float16
matmuls are slow or missing on some CPUs, and float32 holds twice the bytes, so the bound is the
stricter one. The child reports its own peak RSS (VmHWM): `ru_maxrss` of a child would include the
parent's (the pytest process's) size, which Linux carries across fork and exec.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

COLAB_RAM_BYTES = 12.7e9  # Colab's standard runtime, read as bytes (11.8 GiB), the stricter reading

CHILD = textwrap.dedent(
    """
    import json, re, sys, time
    import torch
    from nbkit.families import get_family
    from nbkit.train.components import load_components
    from nbkit.train.inputs import resolve_precision

    family = get_family("sd1")
    _, dtype = resolve_precision("auto", torch.device("cpu"))
    started = time.perf_counter()
    components = load_components(sys.argv[1], family.name, family.prediction_type, dtype)
    unet, encoder = components.unet, components.text_encoders[0]
    latents = torch.randn(1, unet.config.in_channels, 64, 64, dtype=dtype)  # 512 px / 8
    hidden = torch.randn(1, 77, encoder.config.hidden_size, dtype=dtype)
    loaded = time.perf_counter()
    with torch.no_grad():
        out = unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
    seconds = [round(loaded - started, 1), round(time.perf_counter() - loaded, 1)]
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
    print(json.dumps({"peak": peak, "dtype": str(unet.dtype), "shape": list(out.shape),
                      "finite": bool(torch.isfinite(out).all()), "seconds": seconds}))
    """
)


@pytest.mark.slow
def test_sd1_training_load_and_unet_forward_fit_colab_ram(tmp_path):
    # Built the way a user builds one: `nbkit model random sd1 DIR`.
    folder = tmp_path / "sd1"
    built = subprocess.run(
        [sys.executable, "-m", "nbkit", "model", "random", "sd1", str(folder)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "859.5 M" in built.stdout and built.stdout.strip().endswith(str(folder))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak {result['peak'] / 2**30:.2f} GiB; load, forward seconds {result['seconds']}")
    assert result["dtype"] == "torch.float32"
    assert result["shape"] == [1, 4, 64, 64]
    assert result["finite"]
    peak = result["peak"]
    assert peak < COLAB_RAM_BYTES, (
        f"loading SD 1.5 for training and one UNet forward at 512 px peaked at {peak / 2**30:.2f} GiB "
        f"RSS, over Colab's {COLAB_RAM_BYTES / 1e9} GB"
    )
