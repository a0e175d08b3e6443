"""What a Python environment holds: its version, platform, torch and installed distributions.

Standard library only: `nbkit.wheels` imports it in-process, and runs this file as a script in another
interpreter (a fresh venv) to describe that one. torch is never imported (that costs seconds); its
version's local label (`+cu126`, `+cpu`) or the installed CUDA runtime wheel names the CUDA build.
"""

import json
import re
import sys
import sysconfig
from importlib import metadata


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _tags():
    # packaging is not stdlib, but a Python with pip has pip's vendored copy
    try:
        from packaging.tags import sys_tags
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
        except ImportError:
            return None
    return [str(tag) for tag in sys_tags()]


def probe():
    """A JSON-able description: python (major.minor), platform, torch, cuda, installed, wheel tags."""
    installed = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            installed.setdefault(_canonical(name), distribution.version)
    torch = installed.get("torch")
    cuda = None
    if torch and "+" in torch:
        label = torch.split("+", 1)[1]
        match = re.fullmatch(r"cu(\d+)(\d)", label)
        cuda = f"{match.group(1)}.{match.group(2)}" if match else None
    elif torch:
        for name in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime"):
            if name in installed:
                cuda = ".".join(installed[name].split(".")[:2])
                break
    return {
        "tags": _tags(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "platform": sysconfig.get_platform(),
        "torch": torch,
        "cuda": cuda,
        "installed": installed,
    }


if __name__ == "__main__":
    print(json.dumps(probe()))
