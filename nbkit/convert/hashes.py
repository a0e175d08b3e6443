"""The model hashes AUTOMATIC1111 shows and matches on, and the SAI model spec's `modelspec.hash_sha256`.

- Short hash (`Model hash` in infotexts, `[abcdef0123]` in checkpoint titles): the first 10 hex
  characters of the sha256 of the whole file.
- Legacy hash (older A1111 versions and old infotexts): sha256 of the 0x10000 bytes at offset
  0x100000, first 8 hex characters.
- `modelspec.hash_sha256`: "a hash of all tensor content (ie excluding the header section), with `0x`
  prefix": the sha256 of every byte of a .safetensors file after its 8-byte length and JSON header,
  i.e. the tensors' bytes back to back, which is also what kohya's trainers call the "addnet" hash.
  It lives in the header it leaves out, so it survives edits of the metadata and can be checked. A
  .ckpt has no such header; nbkit stores the same value beside its state dict (the sha256 of the
  tensors' bytes in file order, which equals the hash of the same tensors written as .safetensors).

A writer cannot know the data's hash before writing the header in front of it, so the header is
written with `MODELSPEC_HASH_PLACEHOLDER`, a string of the final value's length, which is replaced in
place once the data is written: no byte moves. The whole-file hashes cover the final header, so a
conversion takes them from the read-back that verifies the file (`StreamHasher`), not from the write.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from nbkit.fsio import retry_io

MODELSPEC_HASH_KEY = "modelspec.hash_sha256"
MODELSPEC_HASH_PLACEHOLDER = "0x" + "0" * 64  # as long as the real value, "0x" + 64 hex digits

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
SHORT_HASH_LENGTH = 10
LEGACY_HASH_LENGTH = 8
READ_CHUNK = 8 << 20


class StreamHasher:
    """Hash a file's bytes as they are written, in order, and keep the legacy-hash window."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._position = 0
        self._legacy = bytearray()

    def update(self, data: memoryview | bytes) -> None:
        start, end = self._position, self._position + len(data)
        if start < LEGACY_OFFSET + LEGACY_LENGTH and end > LEGACY_OFFSET:
            low = max(LEGACY_OFFSET, start) - start
            high = min(LEGACY_OFFSET + LEGACY_LENGTH, end) - start
            self._legacy += bytes(data[low:high])
        self._sha256.update(data)
        self._position = end

    def hashes(self) -> tuple[str, str, str]:
        """`(sha256 hex, short 10-hex hash, legacy 8-hex hash)` of everything written so far."""
        full = self._sha256.hexdigest()
        legacy = hashlib.sha256(bytes(self._legacy)).hexdigest()[:LEGACY_HASH_LENGTH]
        return full, full[:SHORT_HASH_LENGTH], legacy


def model_hashes(path: str | os.PathLike) -> tuple[str, str, str]:
    """Return the A1111 hashes of a model file: `(sha256_full, short10, legacy8)`.

    Args:
        path: a .safetensors or .ckpt file.
    """
    path = Path(path)

    def compute() -> tuple[str, str, str]:
        hasher = StreamHasher()
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
        return hasher.hashes()

    return retry_io(compute, what=f"hashing {path.name}")


def modelspec_hash_value(sha256: hashlib._Hash) -> str:
    """The `modelspec.hash_sha256` value of a finished sha256 of tensor data: `0x` + hex."""
    return "0x" + sha256.hexdigest()


def fill_hash_placeholder(header: bytes, value: str) -> bytes:
    """A safetensors JSON header with `MODELSPEC_HASH_PLACEHOLDER` replaced by `value`, byte for byte.

    Args:
        header: the encoded JSON header (without the 8-byte length).
        value: the real `modelspec.hash_sha256` value.

    Raises:
        ValueError: when the header does not hold the placeholder exactly once, or `value` has another length.
    """
    placeholder, filled = json.dumps(MODELSPEC_HASH_PLACEHOLDER).encode(), json.dumps(value).encode()
    if len(filled) != len(placeholder) or header.count(placeholder) != 1:
        raise ValueError("the header does not hold exactly one modelspec hash placeholder of that length")
    return header.replace(placeholder, filled)


def with_modelspec_hash(encoded: bytes) -> bytes:
    """A whole .safetensors file in memory (as `safetensors.torch.save` returns it), placeholder filled in."""
    (header_length,) = struct.unpack("<Q", encoded[:8])
    data_start = 8 + header_length
    value = modelspec_hash_value(hashlib.sha256(memoryview(encoded)[data_start:]))
    return encoded[:8] + fill_hash_placeholder(encoded[8:data_start], value) + encoded[data_start:]


def modelspec_hash(path: str | os.PathLike) -> str:
    """`modelspec.hash_sha256` of a .safetensors file: `0x` + sha256 of everything after its header.

    Args:
        path: the .safetensors file.
    """
    path = Path(path)

    def compute() -> str:
        sha256 = hashlib.sha256()
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(8 + header_length)
            while count := handle.readinto(buffer):
                sha256.update(view[:count])
        return modelspec_hash_value(sha256)

    return retry_io(compute, what=f"hashing {path.name}")
