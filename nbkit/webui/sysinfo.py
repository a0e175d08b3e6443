"""A1111's system information (GET /internal/sysinfo): what runs where, for a bug report.

The keys are A1111's (`modules/sysinfo.py`) where nbkit has the fact. Nothing secret goes in: of the
environment only variables on a list of harmless names (A1111 keeps such a list too), so a token or a
password in the environment (`HF_TOKEN`, `NGROK_AUTHTOKEN`, `NBKIT_AUTH`) never appears; the command
line with the value of `--auth` hidden; options and flags without credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

CHECKSUM_TOKEN = "nbkit-sysinfo-checksum"
# Environment variables that say how things run and never hold a secret.
ENVIRONMENT_NAMES = frozenset(
    {
        "CUDA_VISIBLE_DEVICES", "GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "HF_HOME", "NBKIT_HOME",
        "NBKIT_VISION_CLIP", "NBKIT_VISION_DINO", "PYTORCH_CUDA_ALLOC_CONF", "TRANSFORMERS_OFFLINE",
        "COLAB_GPU", "COLAB_RELEASE_TAG",
    }
)  # fmt: skip
HIDDEN_ARGUMENTS = ("--auth",)  # their value is a password
HIDDEN = "<hidden>"


def pretty_bytes(count: float) -> str:
    """A1111's binary sizes: `16GB`, `512MB`."""
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(count) < 1024 or unit == "P":
            return f"{count:.0f}{unit}B"
        count /= 1024
    return f"{count:.0f}PB"


def command_line(argv: list[str] | None = None) -> list[str]:
    """`sys.argv` with the value of every `HIDDEN_ARGUMENTS` option replaced by `<hidden>`."""
    argv = list(sys.argv if argv is None else argv)
    shown = []
    hide_next = False
    for argument in argv:
        if hide_next:
            shown.append(HIDDEN)
            hide_next = False
        elif argument in HIDDEN_ARGUMENTS:
            shown.append(argument)
            hide_next = True
        elif argument.startswith(tuple(f"{name}=" for name in HIDDEN_ARGUMENTS)):
            shown.append(f"{argument.split('=', 1)[0]}={HIDDEN}")
        else:
            shown.append(argument)
    return shown


def environment() -> dict[str, str]:
    """The environment variables of `ENVIRONMENT_NAMES` that are set."""
    return {name: os.environ[name] for name in sorted(os.environ) if name in ENVIRONMENT_NAMES}


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as error:
        return {"error": str(error)}
    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpu_models"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return info


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor()}
    try:
        import psutil

        info["count logical"] = psutil.cpu_count(logical=True)
        info["count physical"] = psutil.cpu_count(logical=False)
    except Exception as error:  # psutil fails in some containers; A1111 reports it the same way
        info["error"] = str(error)
    return info


def _ram_info() -> dict[str, str] | str:
    try:
        import psutil

        ram = psutil.virtual_memory()
    except Exception as error:  # as above
        return str(error)
    names = ("total", "used", "free", "active", "inactive", "buffers", "cached", "shared")
    return {name: pretty_bytes(getattr(ram, name)) for name in names if getattr(ram, name, 0)}


def _packages() -> list[str]:
    import importlib.metadata

    return sorted(
        {f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions()},
        key=str.lower,
    )


def system_info(*, data_path: str | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's sysinfo keys with nbkit's values.

    Args:
        data_path: the storage root.
        config: the options (GET /options), which hold no credentials.
    """
    import nbkit

    return {
        "Platform": platform.platform(),
        "Python": platform.python_version(),
        "Version": f"nbkit {nbkit.__version__}",
        "Commit": None,
        "Script path": os.path.dirname(os.path.abspath(nbkit.__file__)),
        "Data path": data_path,
        "Extensions dir": None,
        "Checksum": CHECKSUM_TOKEN,
        "Commandline": command_line(),
        "Torch env info": _torch_info(),
        "Exceptions": [],
        "CPU": _cpu_info(),
        "RAM": _ram_info(),
        "Extensions": [],
        "Inactive extensions": [],
        "Environment": environment(),
        "Config": dict(config),
        "Startup": {},
        "Packages": _packages(),
    }


def sysinfo_text(info: Mapping[str, Any]) -> str:
    """The JSON text A1111 serves, its `Checksum` the sha256 of the text with the placeholder in it."""
    text = json.dumps(info, ensure_ascii=False, indent=4, default=str)
    return text.replace(CHECKSUM_TOKEN, hashlib.sha256(text.encode("utf-8")).hexdigest())
