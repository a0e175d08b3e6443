"""Open model files safely, whatever their name says they are.

The format is told from the first bytes, not the suffix: users bring safetensors files named .ckpt and
the reverse. Pickled checkpoints are checked first without running or inflating anything
(`nbkit.convert.archive_check`: a zip bomb is refused from the sizes its zip directory declares, and the
pickle's opcodes are read as a bounded stream), then read only with `torch.load(weights_only=True)`,
which builds tensors and plain containers and refuses anything else before it runs, so a file that
tries to run code is rejected with a message saying so, and nothing of it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shlex
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from nbkit.convert.archive_check import PickleSummary, scan_checkpoint
from nbkit.convert.safetensors_stream import MAX_HEADER_BYTES, read_header
from nbkit.errors import NbkitError

FileFormat = Literal["safetensors", "torch-zip", "torch-legacy"]
PICKLE_PROTOCOL_OPCODE = 0x80
# torch's safe loader (weights_only=True) reads only the opcodes of pickle protocol 2.
SAFE_LOADER_PROTOCOL = 2
SNIFF_BYTES = 64
MAX_STATE_DICT_NESTING = 4
# Where nbkit's .ckpt files keep their header metadata, beside "state_dict" (A1111 and ComfyUI ignore it).
CKPT_METADATA_KEY = "nbkit_metadata"


def sniff_format(path: str | os.PathLike) -> FileFormat:
    """Tell a model file's format from its first bytes.

    Args:
        path: the file.

    Raises:
        NbkitError: for a missing, empty or unrecognised file (a Git LFS pointer or a web page saved by
            a failed download is named as such).
    """
    path = Path(path)
    if not path.is_file():
        raise NbkitError("no such file", path=path, fix="check the path")
    size = path.stat().st_size
    if size == 0:
        raise NbkitError("the file is empty (0 bytes)", path=path, fix="download or copy it again")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    # safetensors before pickle: a header length whose low byte is 0x80 looks like a PROTO opcode.
    if len(head) >= 9:
        (header_length,) = struct.unpack("<Q", head[:8])
        if header_length <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head[0] == PICKLE_PROTOCOL_OPCODE and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if head.startswith(b"version https://git-lfs"):
        raise NbkitError(
            "this is a Git LFS pointer, not the model itself",
            path=path,
            fix="download the real file (git lfs pull, or the hub's download link)",
        )
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        raise NbkitError(
            "this is a web page, not a model: the download link returned HTML (a login or error page?)",
            path=path,
            fix="download the model again; Civitai and private hub models need a token",
        )
    raise NbkitError(
        "not a model file nbkit can read: it is neither .safetensors nor a PyTorch checkpoint",
        path=path,
        fix="check that this is the checkpoint you meant; it may be damaged or in another format",
    )


def _refused_global(error: Exception) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def check_pickled_checkpoint(path: str | os.PathLike) -> FileFormat:
    """Refuse a pickled checkpoint that would run code, that is a zip bomb, or that torch's safe loader
    cannot read.

    Nothing of the file is executed or inflated whole: the zip's central directory is checked first
    (each entry's declared size against its compressed size and a bound), then the pickle is read as a
    stream of opcodes (`nbkit.convert.archive_check`): every function it would call must be one
    `torch.load(weights_only=True)` allows (tensor and storage rebuilders, `OrderedDict`), and every
    tensor storage it declares must be in the file. `load_pickled_checkpoint` runs this first, and
    `nbkit model info` runs it alone.

    Args:
        path: the file.

    Returns:
        The file's format.

    Raises:
        NbkitError: naming the function a code-running pickle would call, the entry a zip bomb would
            inflate, or, for plain tensors pickled with a protocol newer than 2, saying so and how to
            re-save the file.
    """
    return _checked(Path(path))[0]


def check_tensor_file(path: str | os.PathLike) -> FileFormat:
    """Check any model file without reading its tensors: a .safetensors header (`read_header`), or a
    pickled checkpoint's container and pickle (`check_pickled_checkpoint`).

    Args:
        path: the file.

    Returns:
        The file's format.

    Raises:
        NbkitError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if sniff_format(path) == "safetensors":
        read_header(path)
        return "safetensors"
    return check_pickled_checkpoint(path)


def _checked(path: Path) -> tuple[FileFormat, PickleSummary | None]:
    """`check_pickled_checkpoint`, also returning what the pickle holds (None for safetensors)."""
    file_format = sniff_format(path)
    if file_format == "safetensors":
        return file_format, None
    try:
        summary = scan_checkpoint(path, file_format)
    except (
        ValueError,
        EOFError,
        KeyError,
        IndexError,
        zipfile.BadZipFile,
        OSError,
        pickle.PickleError,
        NotImplementedError,  # a zip compression method zipfile does not know
    ) as error:
        raise _damaged(path, error) from error
    allowed = _safe_globals()
    refused = sorted(name for name in summary.globals if name not in allowed)
    if refused:
        raise _code_error(path, ", ".join(refused))
    if summary.protocol > SAFE_LOADER_PROTOCOL:
        if not summary.holds_tensors:
            raise _no_tensors(path)
        raise NbkitError(
            f"this checkpoint holds only plain tensors, but they were pickled with protocol {summary.protocol} "
            f"({'zip' if file_format == 'torch-zip' else 'legacy, non-zip'} torch format), which torch's safe "
            "loader (weights_only=True) cannot read, so nbkit does not open it",
            path=path,
            fix=f"re-save it as .safetensors on a machine where you trust the file: {resave_command(path)}",
        )
    return file_format, summary


def _no_tensors(path: Path) -> NbkitError:
    return NbkitError(
        "the checkpoint holds no tensors: it is not a model", path=path, fix="check that this is a model file"
    )


def resave_command(path: str | os.PathLike) -> str:
    """The shell one-liner that re-saves a checkpoint's tensors as `<stem>.safetensors` next to it.

    It unpickles with `weights_only=False` (torch cannot read newer pickle protocols otherwise), so it
    is for files whose pickle `check_pickled_checkpoint` found to hold only tensors.
    """
    path = Path(path)
    target = path.with_suffix(".safetensors")
    script = (
        "import torch; from safetensors.torch import save_file; "
        f'sd = torch.load({json.dumps(str(path))}, map_location="cpu", weights_only=False); '
        'sd = sd.get("state_dict", sd); '
        "save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"{json.dumps(str(target))})"
    )
    return f"python -c {shlex.quote(script)}"


def _safe_globals() -> set[str]:
    """The `module.name` of every function and class torch's weights_only loader lets a pickle use."""
    from torch._weights_only_unpickler import _get_allowed_globals

    extra = {f"{obj.__module__}.{obj.__qualname__}" for obj in torch.serialization.get_safe_globals()
             if hasattr(obj, "__qualname__")}  # fmt: skip
    return set(_get_allowed_globals()) | extra


def _code_error(path: Path, refused: str) -> NbkitError:
    return NbkitError(
        f"refused to load: unpickling it would call {refused}, i.e. run code from the file; nbkit "
        "only reads plain tensors from .ckpt files, and nothing of this one was run",
        path=path,
        fix="get a .safetensors version of this model; if you trust its source, convert it with a "
        "tool you trust first",
    )


def load_pickled_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .ckpt/.pt/.bin file's tensors without running any code from it.

    `check_pickled_checkpoint` reads the pickle's opcodes first; then `torch.load(weights_only=True)`
    builds the tensors. Zip-format files are memory-mapped, so tensors are read from disk only when
    used. A checkpoint nested in `state_dict` (as Lightning saves them) is unwrapped; entries that are
    not tensors (`global_step`, `epoch`) are dropped.

    Args:
        path: the file.

    Returns:
        `(tensors, metadata)`.

    Raises:
        NbkitError: when the file asks to run code, is truncated or damaged, or holds no tensors.
    """
    path = Path(path)
    file_format, summary = _checked(path)
    if file_format == "safetensors":
        raise NbkitError("this is a .safetensors file, not a pickled checkpoint", path=path)
    try:
        with _torch_loadable(path) as loadable:
            loaded = torch.load(
                loadable, map_location="cpu", weights_only=True, mmap=file_format == "torch-zip"
            )
    except pickle.UnpicklingError as error:
        refused = _refused_global(error)
        if refused is not None:
            raise _code_error(path, refused) from error
        if "truncated" not in str(error):
            if not summary.holds_tensors:
                raise _no_tensors(path) from error
            raise NbkitError(
                f"refused to load: torch's safe loader cannot read its pickle ({str(error).splitlines()[-1][:200]})",
                path=path,
                fix=f"re-save it as .safetensors on a machine where you trust the file: {resave_command(path)}",
            ) from error
        raise _damaged(path, error) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error) as error:
        raise _damaged(path, error) from error
    metadata = loaded.get(CKPT_METADATA_KEY) if isinstance(loaded, dict) else None
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        metadata = {}
    return _state_dict_of(loaded, path), metadata


@contextlib.contextmanager
def _torch_loadable(path: Path) -> Iterator[Path]:
    """`path`, or a link to it without the .safetensors suffix, which torch.load would hand to safetensors."""
    if path.suffix.lower() != ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="nbkit-ckpt-") as folder:
        link = Path(folder) / "checkpoint.ckpt"
        os.symlink(path.resolve(), link)
        yield link


def _damaged(path: Path, error: Exception) -> NbkitError:
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return NbkitError(
        f"the checkpoint is truncated or damaged and cannot be read ({first_line})",
        path=path,
        fix="download or copy it again",
    )


def _state_dict_of(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(MAX_STATE_DICT_NESTING):
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise NbkitError(f"the checkpoint holds a {type(loaded).__name__}, not a state dict", path=path)
    tensors = {
        key: value
        for key, value in loaded.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }
    if not tensors:
        raise NbkitError("the checkpoint holds no tensors", path=path, fix="check that this is a model file")
    return tensors
