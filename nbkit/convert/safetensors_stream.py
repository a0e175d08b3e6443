"""Read and write .safetensors files one tensor at a time, without mmap.

safetensors' own `safe_open` maps the whole file, and every page a conversion touches stays in the
process's resident memory until the file is closed: streaming a 4 GB fp32 model through it peaks at
4 GB more than the conversion needs. The format is small (an 8-byte little-endian header length, a JSON
header, then the tensors' bytes back to back), so here each tensor is read with `readinto` into a
reused buffer, and the output is written header first, then the tensors in one pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from nbkit.convert.hashes import (
    MODELSPEC_HASH_KEY,
    MODELSPEC_HASH_PLACEHOLDER,
    fill_hash_placeholder,
    modelspec_hash_value,
)
from nbkit.errors import NbkitError

try:  # zlib-ng's CRC-32 (SIMD) gives the same values as zlib's, about 8x faster
    from zlib_ng.zlib_ng import crc32
except ImportError:
    from zlib import crc32

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_DEPTH = 32  # levels of JSON nesting; a real header has 3
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
HEADER_ALIGNMENT = 8  # tensors start 8-byte aligned, as safetensors writes them


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a .safetensors file.

    Args:
        dtype: its torch dtype.
        shape: its shape.
        start: absolute offset of its first byte in the file.
        end: absolute offset one past its last byte.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a .safetensors file.

    Args:
        path: the file.
        tensors: name -> where the tensor is, in file order.
        metadata: the `__metadata__` strings (empty when absent).
    """

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _invalid(path: Path, why: str) -> NbkitError:
    return NbkitError(
        f"not a valid .safetensors file: {why}",
        path=path,
        fix="download or copy the file again; if it came from a converter, convert it again",
    )


class _Refused(ValueError):
    """A header that parses as JSON but that safetensors would not read the same way."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refusing a name given twice (readers would disagree on which counts) and strings
    that are not UTF-8 (a lone surrogate escape)."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"{key!r} appears twice in it")
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise _Refused(f"{key!r} is not UTF-8 text") from error
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise _Refused(f"it holds {name}, which is not JSON")


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (not a float, not a boolean), as safetensors' `usize`."""
    return type(value) is int and value >= 0


def _tensor_entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    """One tensor's entry of the header, checked: known dtype, shape and span that agree."""
    if not isinstance(info, dict):
        raise _invalid(path, f"tensor {name!r} is described by a {type(info).__name__}, not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _invalid(
            path,
            f"tensor {name!r} has dtype {dtype_name!r}, which nbkit does not read (it reads {', '.join(DTYPES)})",
        )
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise _invalid(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _invalid(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    dtype, (begin, end) = DTYPES[dtype_name], offsets
    numel = 1
    for n in shape:
        numel *= n
    if end - begin != numel * dtype.itemsize:
        raise _invalid(
            path, f"tensor {name!r}: {end - begin} bytes do not hold {tuple(shape)} of {dtype_name}"
        )
    return TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def _depth(value: object) -> int:
    """How deep JSON containers nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of a .safetensors file without reading its tensors.

    Nothing is allocated from what the header claims before it is checked: the header's length is
    bounded as safetensors bounds it and must fit in the file; every tensor's dtype must be known and
    its byte range match its dtype and shape; the ranges must tile the data area exactly (none outside
    the file, none overlapping), so a truncated file is caught here rather than as garbage weights
    later. A header this accepts is one safetensors reads the same way.

    Args:
        path: the file.

    Raises:
        NbkitError: naming the file and what is wrong with it (empty, truncated, not safetensors).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise NbkitError("the file is empty (0 bytes)", path=path, fix="download or copy it again")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _invalid(path, f"only {size} bytes long")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
            raise _invalid(path, f"its header claims {header_length} bytes but the file has {size}")
        raw = handle.read(header_length)
    if not raw.startswith(b"{"):
        raise _invalid(path, "its header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, _Refused, RecursionError) as error:
        why = "it nests too deep" if isinstance(error, RecursionError) else str(error)
        raise _invalid(path, f"its header is not valid JSON ({why})") from error
    if not isinstance(header, dict):
        raise _invalid(path, "its header is not a JSON object")
    if _depth(header) > MAX_HEADER_DEPTH:
        # safetensors' own parser gives up at 128 levels; nothing in a real header nests past 3
        raise _invalid(path, f"its header nests more than {MAX_HEADER_DEPTH} levels deep")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "its __metadata__ is not a mapping of strings")
    data_start = 8 + header_length
    tensors = {name: _tensor_entry(path, name, info, data_start) for name, info in header.items()}
    # In the order safetensors checks them: by (begin, end), so an empty tensor comes first.
    ordered = sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end))
    position = data_start
    for name, entry in ordered:
        if entry.start != position:
            raise _invalid(
                path,
                f"tensor {name!r} "
                + (
                    "overlaps the previous one"
                    if entry.start < position
                    else "does not start where the previous one ends"
                ),
            )
        position = entry.end
    if position > size:
        raise NbkitError(
            f"the file is truncated: its header describes {position} bytes but only {size} are there "
            "(an interrupted download or copy?)",
            path=path,
            fix="download or copy it again",
        )
    if position < size:
        raise _invalid(path, f"{size - position} stray bytes after the last tensor")
    return SafetensorsHeader(path, dict(ordered), metadata)


def read_exactly(handle: BinaryIO, offset: int, buffer: memoryview, path: Path) -> None:
    """Fill `buffer` with the bytes of `handle` starting at `offset` (no mmap, no extra copy)."""
    handle.seek(offset)
    done = 0
    while done < len(buffer):
        count = handle.readinto(buffer[done:])
        if not count:
            raise NbkitError(
                f"the file ended early at byte {offset + done}: it is truncated",
                path=path,
                fix="download or copy it again",
            )
        done += count


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, as a memoryview over the same memory (any dtype)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def checksum(data: memoryview | bytes) -> int:
    """The checksum verification compares: CRC-32 of the tensor's bytes (fast, and releases the GIL)."""
    return crc32(data)


@dataclass(frozen=True)
class TensorRecord:
    """What verification expects of one written tensor.

    Args:
        dtype: its dtype in the file.
        shape: its shape in the file.
        checksum: `checksum()` of its bytes.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    checksum: int


class StreamingSafetensorsWriter:
    """Write a .safetensors file in one pass: the whole header first, then each tensor in order.

    The tensors' names, dtypes and shapes must be known up front (they are: conversion plans them from
    the source's header); their bytes then arrive one at a time and are never all in memory. The sha256
    of the data is taken on the way; when `metadata` holds `modelspec.hash_sha256` as the placeholder,
    `close()` writes the real value over it (the handle must be seekable).

    Args:
        handle: a binary file opened for writing, positioned at 0.
        layout: (name, dtype, shape) of every tensor, in the order they will be written.
        metadata: the `__metadata__` strings.

    Attributes:
        records: name -> `TensorRecord` of every tensor written.
        metadata: the metadata as finally written (the hash filled in after `close()`).
        modelspec_hash: `modelspec.hash_sha256` of the data, after `close()`.
    """

    def __init__(
        self,
        handle: BinaryIO,
        layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
    ):
        self._handle = handle
        self._data_sha256 = hashlib.sha256()
        self.records: dict[str, TensorRecord] = {}
        self.metadata = dict(metadata)
        self.modelspec_hash: str | None = None
        self._pending: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in layout:
            if name in header:
                raise ValueError(f"tensor name {name!r} appears twice")
            numel = 1
            for n in shape:
                numel *= n
            nbytes = numel * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._pending.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        self._header = encoded
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._pending.reverse()  # pop() from the end is O(1)

    def write(self, name: str, data: memoryview, data_checksum: int | None = None) -> None:
        """Write the bytes of the next tensor, which must be `name` with the planned size.

        Args:
            name: the tensor's name.
            data: its bytes.
            data_checksum: `checksum(data)` when the caller already has it (computed on another thread).
        """
        expected_name, dtype, shape, nbytes = self._pending.pop()
        if name != expected_name or len(data) != nbytes:
            raise ValueError(f"expected {expected_name!r} ({nbytes} bytes), got {name!r} ({len(data)} bytes)")
        self._handle.write(data)
        self._data_sha256.update(data)
        if data_checksum is None:
            data_checksum = checksum(data)
        self.records[name] = TensorRecord(dtype, shape, data_checksum)

    def close(self) -> None:
        """Check that every planned tensor was written, and fill in the modelspec hash."""
        if self._pending:
            raise ValueError(
                f"{len(self._pending)} planned tensors were never written, e.g. {self._pending[-1][0]!r}"
            )
        self.modelspec_hash = modelspec_hash_value(self._data_sha256)
        if self.metadata.get(MODELSPEC_HASH_KEY) == MODELSPEC_HASH_PLACEHOLDER:
            end = self._handle.tell()
            self._handle.seek(8)
            self._handle.write(fill_hash_placeholder(self._header, self.modelspec_hash))
            self._handle.seek(end)
            self.metadata[MODELSPEC_HASH_KEY] = self.modelspec_hash
