"""The model hashes AUTOMATIC1111 shows and matches on.

- Short hash (`Model hash` in infotexts, `[abcdef0123]` in checkpoint titles): the first 10 hex
  characters of the sha256 of the whole file.
- Legacy hash (older A1111 versions and old infotexts): sha256 of the 0x10000 bytes at offset
  0x100000, first 8 hex characters.

A conversion computes both while it writes (`StreamHasher`), so hashing costs no second read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nbkit.fsio import retry_io

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
