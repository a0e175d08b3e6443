"""Where nbkit runs: Colab, Kaggle, a local Jupyter kernel or plain Python, and on which GPU.

Runtime facts come from markers the platforms set (importable modules, environment variables,
well-known folders) and from torch's own CUDA APIs, never from parsing `nvidia-smi`. torch is imported
lazily so that this module works in an environment without it (the CLI's `session` commands, say).

`storage_root` is where sessions and cached models live: Google Drive on Colab, so they outlive the
runtime, and `NBKIT_HOME` or `~/nbkit` elsewhere. `local_scratch` is fast local disk for copies that
need not survive. Every platform hook (environment, module lookup, torch, the Drive module, sleeping)
is injectable so tests can fake any runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from nbkit.errors import DriveDisconnectedError, NbkitError
from nbkit.fsio import COLAB_DRIVE_MOUNT, SCRATCH_ENV, retry_io

RuntimeKind = Literal["colab", "kaggle", "jupyter", "python"]
RUNTIME_KINDS = ("colab", "kaggle", "jupyter", "python")

COLAB_CONTENT = Path("/content")
KAGGLE_ROOT = Path("/kaggle")
REMOUNT_HINT = "from google.colab import drive; drive.mount('/content/drive', force_remount=True)"
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere


def has_native_bf16(compute_capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability computes in bfloat16 natively (Ampere and newer).

    `torch.cuda.is_bf16_supported()` says yes on a T4 because it can emulate bf16, slowly; training
    wants the native kind. The one rule both the runtime report and mixed-precision `auto` follow.

    Args:
        compute_capability: the GPU's (major, minor), as `torch.cuda.get_device_capability` gives it.
    """
    return tuple(compute_capability) >= NATIVE_BF16_CAPABILITY


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What this process runs on.

    Args:
        kind: `colab`, `kaggle`, `jupyter` (a local IPython kernel) or `python`.
        torch_version: torch's version, or None when torch is not installed.
        cuda_version: the CUDA version torch was built with, or None (CPU build).
        gpu_name: the first CUDA device's name, or None without a usable GPU.
        gpu_memory_bytes: its total memory, or None.
        compute_capability: its (major, minor) compute capability, or None.
        bf16_supported: whether it does bfloat16 natively (Ampere, compute 8.0, or newer).
    """

    kind: RuntimeKind
    torch_version: str | None = None
    cuda_version: str | None = None
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    compute_capability: tuple[int, int] | None = None
    bf16_supported: bool = False

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    @property
    def gpu_memory_gib(self) -> float | None:
        return None if self.gpu_memory_bytes is None else self.gpu_memory_bytes / 2**30


def _module_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of returning None
        return False


def _in_ipython_kernel(modules: Mapping[str, Any]) -> bool:
    # A terminal IPython shell has no `kernel`; only a Jupyter kernel does.
    ipython = modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def detect_kind(
    *,
    environ: Mapping[str, str] | None = None,
    module_importable: Callable[[str], bool] = _module_importable,
    path_exists: Callable[[Path], bool] = Path.exists,
    modules: Mapping[str, Any] | None = None,
) -> RuntimeKind:
    """Tell which platform this is from its markers.

    Colab: `google.colab` importable, `COLAB_RELEASE_TAG` set, or `/content/sample_data` (a bare
    `/content` also exists in many Docker images). Kaggle: `KAGGLE_KERNEL_RUN_TYPE` set or
    `/kaggle/working`. Jupyter: a live IPython kernel (a terminal IPython shell has none).

    Args:
        environ: the environment (default `os.environ`). `NBKIT_RUNTIME` overrides detection.
        module_importable: says whether a module can be imported (default: `importlib.util.find_spec`).
        path_exists: says whether a path exists (default: `Path.exists`).
        modules: the loaded modules (default `sys.modules`), to look for an IPython kernel.
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    forced = environ.get("NBKIT_RUNTIME")
    if forced:
        if forced not in RUNTIME_KINDS:
            raise NbkitError(
                f"NBKIT_RUNTIME={forced!r} is not a runtime kind",
                fix=f"set it to one of {', '.join(RUNTIME_KINDS)}, or unset it to detect the runtime",
            )
        return forced  # type: ignore[return-value]
    if (
        "COLAB_RELEASE_TAG" in environ
        or module_importable("google.colab")
        or path_exists(COLAB_CONTENT / "sample_data")
    ):
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in environ or path_exists(KAGGLE_ROOT / "working"):
        return "kaggle"
    if _in_ipython_kernel(modules):
        return "jupyter"
    return "python"


def _import_torch() -> ModuleType | None:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def detect_runtime(
    *,
    environ: Mapping[str, str] | None = None,
    module_importable: Callable[[str], bool] = _module_importable,
    path_exists: Callable[[Path], bool] = Path.exists,
    modules: Mapping[str, Any] | None = None,
    torch_module: ModuleType | Literal[False] | None = None,
) -> Runtime:
    """Describe the platform and GPU this process runs on.

    Args:
        environ, module_importable, path_exists, modules: see `detect_kind`.
        torch_module: torch or a stand-in; None imports it if installed, False means "no torch".
    """
    kind = detect_kind(
        environ=environ, module_importable=module_importable, path_exists=path_exists, modules=modules
    )
    torch = _import_torch() if torch_module is None else (torch_module or None)
    if torch is None:
        return Runtime(kind=kind)
    cuda_version = getattr(torch.version, "cuda", None)
    if not torch.cuda.is_available():
        return Runtime(kind=kind, torch_version=torch.__version__, cuda_version=cuda_version)
    props = torch.cuda.get_device_properties(0)
    capability = (int(props.major), int(props.minor))
    return Runtime(
        kind=kind,
        torch_version=torch.__version__,
        cuda_version=cuda_version,
        gpu_name=props.name,
        gpu_memory_bytes=int(props.total_memory),
        compute_capability=capability,
        bf16_supported=has_native_bf16(capability),
    )


def describe_runtime(runtime: Runtime | None = None) -> str:
    """A one-line summary for the top of a notebook, e.g. `Colab · Tesla T4, 15.0 GiB, ...`."""
    runtime = runtime or detect_runtime()
    names = {"colab": "Colab", "kaggle": "Kaggle", "jupyter": "Jupyter", "python": "Python"}
    parts = [names[runtime.kind]]
    if runtime.has_gpu:
        major, minor = runtime.compute_capability or (0, 0)
        bf16 = "bf16" if runtime.bf16_supported else "no bf16 (fp16 mixed precision)"
        parts.append(f"{runtime.gpu_name}, {runtime.gpu_memory_gib:.1f} GiB, compute {major}.{minor}, {bf16}")
    else:
        parts.append("no GPU (CPU only: fine for tiny models, far too slow for real training)")
    if runtime.torch_version is None:
        parts.append("torch not installed")
    else:
        cuda = f"CUDA {runtime.cuda_version}" if runtime.cuda_version else "CPU build"
        parts.append(f"torch {runtime.torch_version} ({cuda})")
    return " · ".join(parts)


def _drive_is_mounted(path_exists: Callable[[Path], bool]) -> bool:
    return path_exists(COLAB_DRIVE_MOUNT / "MyDrive")


def _mount_drive(drive_module: Any | None) -> None:
    if drive_module is None:
        try:
            drive_module = importlib.import_module("google.colab.drive")
        except ImportError as error:
            raise NbkitError(
                "Google Drive can only be mounted inside Colab (google.colab is not importable)",
                fix="set NBKIT_HOME to a local folder, or NBKIT_RUNTIME=python if this is not Colab",
            ) from error
    try:
        drive_module.mount(str(COLAB_DRIVE_MOUNT))
    except Exception as error:  # Colab raises ValueError/TimeoutError/MessageError, all user-fixable
        raise NbkitError(
            f"mounting Google Drive failed: {error}",
            path=COLAB_DRIVE_MOUNT,
            fix="run the cell again and approve the Drive access prompt; if it keeps failing, "
            f"restart the runtime and run: {REMOUNT_HINT}",
        ) from error


def storage_root(
    *,
    mount: bool = True,
    shared_drive: str | None = None,
    runtime: Runtime | None = None,
    environ: Mapping[str, str] | None = None,
    drive_module: Any | None = None,
    path_exists: Callable[[Path], bool] = Path.exists,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Return (and create) the folder that holds sessions and cached models.

    On Colab this is `MyDrive/nbkit` on Google Drive, mounted first if needed, or
    `Shareddrives/<shared_drive>/nbkit`; `NBKIT_HOME` overrides it. Elsewhere it is `NBKIT_HOME` or
    `~/nbkit`.

    Args:
        mount: on Colab, mount Drive when it is not mounted yet (otherwise an unmounted Drive is an error).
        shared_drive: the name of a Google shared drive to use instead of My Drive (Colab only).
        runtime: the detected runtime (default: detected from the platform markers).
        environ: the environment (default `os.environ`).
        drive_module: `google.colab.drive` or a stand-in.
        path_exists: says whether a path exists.
        sleep: injected for tests of the Drive retry.
    """
    environ = os.environ if environ is None else environ
    kind = runtime.kind if runtime is not None else detect_kind(environ=environ, path_exists=path_exists)
    home = environ.get("NBKIT_HOME")
    if shared_drive is not None and kind != "colab":
        raise NbkitError(
            f"shared_drive={shared_drive!r} needs Google Drive, which only Colab mounts (this is {kind})",
            fix="leave shared_drive unset, or set NBKIT_HOME to the folder you want",
        )
    if kind == "colab" and (shared_drive is not None or not home):
        if not _drive_is_mounted(path_exists):
            if not mount:
                raise NbkitError(
                    "Google Drive is not mounted and mount=False",
                    path=COLAB_DRIVE_MOUNT,
                    fix="call storage_root(mount=True), or set NBKIT_HOME to a local folder "
                    "(it will be lost when the runtime ends)",
                )
            _mount_drive(drive_module)
        if shared_drive is not None:
            if not shared_drive or "/" in shared_drive:
                raise NbkitError(f"shared drive name {shared_drive!r} is not a folder name")
            drive_folder = COLAB_DRIVE_MOUNT / "Shareddrives" / shared_drive
            if not path_exists(drive_folder):
                raise NbkitError(
                    f"no shared drive named {shared_drive!r} is visible in Drive",
                    path=drive_folder,
                    fix="check the name in drive.google.com (Shared drives) and that this Google "
                    "account is a member; names are case-sensitive",
                )
            root = drive_folder / "nbkit"
        else:
            root = COLAB_DRIVE_MOUNT / "MyDrive" / "nbkit"
    else:
        root = Path(home).expanduser() if home else Path.home() / "nbkit"
    _make_dir(root, sleep=sleep)
    return root


def _make_dir(path: Path, *, sleep: Callable[[float], None]) -> None:
    try:
        retry_io(lambda: path.mkdir(parents=True, exist_ok=True), what=f"creating {path}", sleep=sleep)
    except DriveDisconnectedError as error:
        raise DriveDisconnectedError(
            f"the Drive mount is gone (creating the folder kept failing: {error.message})",
            path=path,
            fix=f"remount with `{REMOUNT_HINT}` and rerun this cell; files already on Drive are safe",
        ) from error
    except OSError as error:
        raise NbkitError(
            f"cannot create the nbkit folder: {error.strerror}",
            path=path,
            fix="check the parent folder exists and is writable, or set NBKIT_HOME to another folder",
        ) from error


def local_scratch(
    *,
    runtime: Runtime | None = None,
    environ: Mapping[str, str] | None = None,
    path_exists: Callable[[Path], bool] = Path.exists,
    create: bool = True,
) -> Path:
    """Return (and create) a folder on fast local disk for downloads and training-data copies.

    `/content/nbkit-scratch` on Colab, `/kaggle/temp/nbkit` on Kaggle, otherwise `NBKIT_SCRATCH` or
    the user's cache folder (`$XDG_CACHE_HOME/nbkit` or `~/.cache/nbkit`). Nothing here survives the
    runtime on Colab or Kaggle.

    Args:
        runtime: the detected runtime (default: detected from the platform markers).
        environ: the environment (default `os.environ`); `NBKIT_SCRATCH` overrides the choice.
        path_exists: says whether a path exists.
        create: create the folder (False only tells where it would be).
    """
    environ = os.environ if environ is None else environ
    kind = runtime.kind if runtime is not None else detect_kind(environ=environ, path_exists=path_exists)
    if environ.get(SCRATCH_ENV):
        scratch = Path(environ[SCRATCH_ENV]).expanduser()
    elif kind == "colab":
        scratch = COLAB_CONTENT / "nbkit-scratch"
    elif kind == "kaggle":
        scratch = KAGGLE_ROOT / "temp" / "nbkit"
    else:
        cache = environ.get("XDG_CACHE_HOME")
        scratch = (Path(cache).expanduser() if cache else Path.home() / ".cache") / "nbkit"
    if create:
        scratch.mkdir(parents=True, exist_ok=True)
    return scratch
