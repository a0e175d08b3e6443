"""Read a written checkpoint back and check it is what was meant to be written.

Every tensor's name, shape, dtype and a checksum of its bytes are compared with what the writer
recorded. The header of a .safetensors output is also parsed by safetensors itself (`safe_open`), an
independent reader, so a file nbkit can read but the library cannot never passes. The read-back also
gives the file's A1111 hashes: of the bytes on disk, final header included.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from nbkit.convert.checkpoint_io import sniff_format
from nbkit.convert.hashes import StreamHasher, model_hashes
from nbkit.convert.safetensors_stream import TensorRecord, checksum
from nbkit.convert.streaming import SLOTS, overlapped
from nbkit.convert.tensor_sources import open_tensor_file
from nbkit.errors import NbkitError


def _failed(path: Path, why: str) -> NbkitError:
    return NbkitError(
        f"verification failed: {why}",
        path=path,
        fix="the disk or the storage mount corrupted the write; convert again (to another place if it repeats)",
    )


def _check_with_safetensors(path: Path, expected: Mapping[str, TensorRecord]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            if keys != set(expected):
                raise _failed(path, f"safetensors reads {len(keys)} tensors, {len(expected)} were written")
            for name in keys:
                view = handle.get_slice(name)
                if tuple(view.get_shape()) != expected[name].shape:
                    raise _failed(path, f"safetensors reads tensor {name!r} with shape {view.get_shape()}")
    except NbkitError:
        raise
    except Exception as error:  # safetensors raises its own error types
        raise _failed(path, f"safetensors cannot read it ({error})") from error


def verify_single_file(path: str | os.PathLike, expected: Mapping[str, TensorRecord]) -> tuple[str, str, str]:
    """Check every tensor of a written checkpoint against the writer's records.

    Args:
        path: the .safetensors or .ckpt file (format told by its bytes).
        expected: tensor name -> `TensorRecord` (dtype, shape, checksum).

    Returns:
        The file's A1111 hashes, `(sha256, short10, legacy8)` (see `nbkit.convert.hashes`). A .safetensors
        file is hashed from the bytes verification reads; a .ckpt is read once more to hash it.

    Raises:
        NbkitError: naming the first tensor that differs.
    """
    path = Path(path)
    hasher = StreamHasher()
    try:
        safetensors = sniff_format(path) == "safetensors"
        with open_tensor_file(path) as source:
            if safetensors:  # the tensors tile the rest of the file in this order (read_header checks)
                with open(path, "rb") as handle:
                    (header_length,) = struct.unpack("<Q", handle.read(8))
                    handle.seek(0)
                    hasher.update(handle.read(8 + header_length))
            names = set(source.infos)
            if names != set(expected):
                extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
                raise _failed(path, f"tensors differ (unexpected: {extra[:3]}, missing: {missing[:3]})")
            for name, info in source.infos.items():
                record = expected[name]
                if info.shape != record.shape or info.dtype != record.dtype:
                    raise _failed(
                        path,
                        f"tensor {name!r} is {info.dtype} {info.shape}, expected {record.dtype} {record.shape}",
                    )
            largest = max((info.nbytes for info in source.infos.values()), default=0)
            buffers = [memoryview(torch.empty(largest, dtype=torch.uint8).numpy()) for _ in range(SLOTS)]

            def read(name: str, slot: int) -> memoryview:
                data = buffers[slot][: source.infos[name].nbytes]
                source.read_into(name, data)
                return data

            def compare(name: str, data: memoryview) -> None:
                if checksum(data) != expected[name].checksum:
                    raise _failed(path, f"the bytes of tensor {name!r} differ from those written")
                if safetensors:
                    hasher.update(data)

            # Checksum one tensor on a worker thread while the next one is read.
            overlapped(source.infos, read, compare)
    except NbkitError as error:
        if error.message.startswith("verification failed"):
            raise
        raise _failed(path, error.message) from error
    if not safetensors:
        return model_hashes(path)
    _check_with_safetensors(path, expected)
    return hasher.hashes()
