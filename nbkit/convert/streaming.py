"""Make output tensors in reused buffers, and keep both CPU cores busy while streaming.

Converting is read, cast, checksum, hash, write for each tensor. Reading, casting, hashing and writing
all release the GIL, so one worker thread checksums, hashes and writes tensor i while the main thread
reads and casts tensor i+1 into the other of two buffer slots. Torch's own thread pool is held to one
thread meanwhile: on two cores its threads would only fight the worker.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from nbkit.convert.plan import TensorRecipe
from nbkit.convert.tensor_sources import TensorSource
from nbkit.errors import NbkitError

Item = TypeVar("Item")
Value = TypeVar("Value")
SLOTS = 2
FP16_MAX = torch.finfo(torch.float16).max


def overlapped(
    items: Iterable[Item],
    produce: Callable[[Item, int], Value],
    consume: Callable[[Item, Value], None],
) -> None:
    """For each item, run `produce(item, slot)` here and `consume(item, value)` on one worker thread.

    Consumers run in item order. `produce` for item i+SLOTS waits until item i was consumed, so a slot's
    buffer is never overwritten while in use. The first exception of either side is raised.
    """
    pending: list[Future | None] = [None] * SLOTS
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbkit-convert") as worker:
        for index, item in enumerate(items):
            slot = index % SLOTS
            if pending[slot] is not None:
                pending[slot].result()
            pending[slot] = worker.submit(consume, item, produce(item, slot))
        for future in pending:
            if future is not None:
                future.result()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread pool at `count` threads, then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def background_fsync(path: Path) -> Iterator[None]:
    """fsync `path` on a worker thread while the block runs; wait for it (and its errors) at the end."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbkit-fsync") as worker:

        def flush() -> None:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())

        future = worker.submit(flush)
        yield
        future.result()


def output_dtype(source_dtype: torch.dtype, target: torch.dtype) -> torch.dtype:
    """Weights take the target dtype; integer buffers (position ids, step counters) keep theirs."""
    return target if source_dtype.is_floating_point else source_dtype


class TensorMaker:
    """Builds each output tensor of a plan in per-slot buffers reused for the whole conversion.

    Args:
        recipes: the plan.
        sources: component name -> its tensor source.
        target: the dtype floating-point tensors are cast to.
    """

    def __init__(self, recipes: list[TensorRecipe], sources: dict[str, TensorSource], target: torch.dtype):
        self.sources = sources
        self.target = target
        in_bytes = out_bytes = 0
        for recipe in recipes:
            infos = [sources[recipe.component].infos[name] for name in recipe.sources]
            size = sum(info.nbytes for info in infos)
            in_bytes = max(in_bytes, size)
            out_bytes = max(out_bytes, size // infos[0].dtype.itemsize * self.dtype_of(recipe).itemsize)
        # torch.empty does not touch memory: pages are only mapped as the largest tensors fill them.
        self._in = [torch.empty(in_bytes, dtype=torch.uint8) for _ in range(SLOTS)]
        self._out = [torch.empty(out_bytes, dtype=torch.uint8) for _ in range(SLOTS)]

    def dtype_of(self, recipe: TensorRecipe) -> torch.dtype:
        return output_dtype(self.sources[recipe.component].infos[recipe.sources[0]].dtype, self.target)

    def make(self, recipe: TensorRecipe, slot: int = 0) -> torch.Tensor:
        """The output tensor of `recipe`, a view into slot `slot`'s buffers (valid until reused)."""
        source = self.sources[recipe.component]
        infos = [source.infos[name] for name in recipe.sources]
        dtype = infos[0].dtype
        if any(info.dtype != dtype for info in infos):
            raise NbkitError(f"the tensors fused into {recipe.key!r} have different dtypes", path=source.path)
        raw = memoryview(self._in[slot].numpy())
        position = 0
        for name, info in zip(recipe.sources, infos, strict=True):
            source.read_into(name, raw[position : position + info.nbytes])
            position += info.nbytes
        loaded = self._in[slot][:position].view(dtype)
        out_dtype = output_dtype(dtype, self.target)
        if out_dtype == dtype and not recipe.transpose:
            return loaded.view(recipe.shape)
        loaded = loaded.view(infos[0].shape).T if recipe.transpose else loaded.view(recipe.shape)
        out = self._out[slot][: loaded.numel() * out_dtype.itemsize].view(out_dtype).view(recipe.shape)
        out.copy_(loaded)
        if out_dtype == torch.float16 and dtype != torch.float16:
            check_fp16_range(recipe.key, loaded, out, source.path)
        return out


def check_fp16_range(key: str, loaded: torch.Tensor, out: torch.Tensor, path: Path) -> None:
    """Refuse a cast to fp16 that turned finite weights into inf (an aminmax pass; cheap)."""
    if out.numel() == 0:
        return
    low, high = torch.aminmax(out)
    if torch.isfinite(low) and torch.isfinite(high):
        return
    if bool(torch.isfinite(loaded).all()):
        raise NbkitError(
            f"tensor {key!r} has values beyond fp16's range (±{FP16_MAX:.0f}); in fp16 they would become inf",
            path=path,
            fix="convert with --dtype bf16 or --dtype fp32",
        )
