"""Where conversion reads tensors from, one at a time: safetensors files, pickled checkpoints, and the
(possibly sharded) weight files of a diffusers component folder.

A `TensorSource` knows every tensor's dtype and shape up front and copies one tensor's bytes into a
buffer the caller reuses, so a conversion never holds more than the tensor in hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.convert.checkpoint_io import load_pickled_checkpoint, sniff_format
from nbkit.convert.safetensors_stream import byte_view, read_exactly, read_header
from nbkit.errors import NbkitError
from nbkit.fsio import read_json


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype, shape and size, known before its bytes are read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class TensorSource:
    """Tensors that can be read one at a time into caller-owned buffers.

    Attributes:
        path: the file (or folder) they come from, for messages.
        infos: name -> `TensorInfo`, in the order reading them is cheapest.
        metadata: the file's string metadata (safetensors `__metadata__`), else empty.
    """

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read_into(self, name: str, buffer: memoryview) -> None:
        """Copy the bytes of tensor `name` into `buffer` (exactly its size)."""
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        """Read tensor `name` into a new tensor of its own."""
        info = self.infos[name]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self.read_into(name, byte_view(tensor))
        return tensor

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    """A .safetensors file, read with plain `readinto` (no mmap, so nothing stays resident)."""

    def __init__(self, path: str | os.PathLike):
        header = read_header(path)
        self.path = header.path
        self.metadata = header.metadata
        self._entries = header.tensors
        self.infos = {name: TensorInfo(e.dtype, e.shape, e.nbytes) for name, e in header.tensors.items()}
        self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def read_into(self, name: str, buffer: memoryview) -> None:
        read_exactly(self._handle, self._entries[name].start, buffer, self.path)

    def close(self) -> None:
        self._handle.close()


class StateDictSource(TensorSource):
    """Tensors already loaded (memory-mapped from a zip checkpoint, or in memory)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        path: str | os.PathLike,
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.metadata = metadata or {}
        self._tensors = tensors
        self.infos = {
            name: TensorInfo(t.dtype, tuple(t.shape), t.numel() * t.element_size())
            for name, t in tensors.items()
        }

    def read_into(self, name: str, buffer: memoryview) -> None:
        buffer[:] = byte_view(self._tensors[name].contiguous())

    def close(self) -> None:
        self._tensors = {}


class ZerosSource(TensorSource):
    """Tensors of zeros, declared with `add` and made as they are read (no memory held for them)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata = {}
        self.infos = {}

    def add(self, name: str, info: TensorInfo) -> None:
        self.infos[name] = info

    def read_into(self, name: str, buffer: memoryview) -> None:
        if len(buffer):
            torch.frombuffer(buffer, dtype=torch.uint8).zero_()


class ShardedSource(TensorSource):
    """Several files read as one (a sharded component: `*.safetensors.index.json`)."""

    def __init__(self, shards: list[TensorSource], path: Path):
        self.path = path
        self.metadata = {}
        self._shards = shards
        self._owner: dict[str, TensorSource] = {}
        self.infos = {}
        for shard in shards:
            for name, info in shard.infos.items():
                if name in self._owner:
                    raise NbkitError(
                        f"tensor {name!r} is in two shards", path=path, fix="save the model again"
                    )
                self._owner[name] = shard
                self.infos[name] = info

    def read_into(self, name: str, buffer: memoryview) -> None:
        self._owner[name].read_into(name, buffer)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def open_tensor_file(path: str | os.PathLike) -> TensorSource:
    """Open a .safetensors or pickled checkpoint file, telling which by its bytes, not its name.

    Args:
        path: the file.
    """
    path = Path(path)
    if sniff_format(path) == "safetensors":
        return SafetensorsSource(path)
    tensors, metadata = load_pickled_checkpoint(path)
    return StateDictSource(tensors, path, metadata)


# Weight file stems diffusers and transformers write, in order of preference.
_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _candidates(variant: str) -> list[tuple[str, bool]]:
    """(file name, is an index) pairs to look for, for one variant ("" or ".fp16")."""
    names = []
    for suffix in ("safetensors", "bin"):
        for stem in _STEMS:
            names.append((f"{stem}{variant}.{suffix}", False))
            names.append((f"{stem}.{suffix}.index{variant}.json", True))
            names.append((f"{stem}{variant}.{suffix}.index.json", True))
    return names


def find_weight_files(folder: str | os.PathLike) -> list[Path]:
    """Return a diffusers/transformers component folder's weight file(s): full precision first, then fp16.

    Args:
        folder: e.g. `<model>/unet`.
    """
    folder = Path(folder)
    for variant in ("", ".fp16"):
        for name, is_index in _candidates(variant):
            path = folder / name
            if not path.is_file():
                continue
            if not is_index:
                return [path]
            weight_map = read_json(path).get("weight_map", {})
            shards = sorted({folder / shard for shard in weight_map.values()})
            missing = [shard for shard in shards if not shard.is_file()]
            if missing or not shards:
                raise NbkitError(
                    f"the shard index names {missing[0].name if missing else 'no files'}, which is missing",
                    path=path,
                    fix="download or save the model again",
                )
            return shards
    raise NbkitError(
        "no weights file (diffusion_pytorch_model.safetensors, model.safetensors, *.bin) in this folder",
        path=folder,
        fix="download or save the model again; the folder is incomplete",
    )


def open_component(folder: str | os.PathLike) -> TensorSource:
    """Open the weights of one diffusers pipeline component folder (single file or shards)."""
    files = find_weight_files(folder)
    if len(files) == 1:
        return open_tensor_file(files[0])
    return ShardedSource([open_tensor_file(file) for file in files], Path(folder))
