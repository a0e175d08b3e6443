"""Check a pickled PyTorch checkpoint's container and pickle before torch opens any of it.

A `.ckpt` comes from a model site, so it is read as hostile until shown otherwise, and cheaply: the zip's
central directory says how large each entry inflates to, and a zip bomb (a few MB that inflate to GBs)
is refused from those numbers alone, before anything is decompressed. The pickle is then read as a stream
of opcodes (`pickletools.genops`), never executed and never read into one buffer: the functions it would
call, and the tensor storages it declares (their element counts, checked against the bytes the file
really holds), come from a small simulation of the unpickler's stack.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickletools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.fsio import format_bytes

# A state dict's pickle is small: about 100 bytes a tensor, so 64 MiB is hundreds of thousands of tensors.
MAX_PICKLE_BYTES = 64 * 2**20
MAX_PICKLE_OPS = 10_000_000
# Objects the simulation remembers (memo entries it can name); a torch pickle memoises a few per tensor.
MAX_MEMO_ENTRIES = 1_000_000
# Pickles and tensors deflate a few times at most; only a bomb's padding inflates 100x. Entries up to
# SMALL_ENTRY_BYTES may have any ratio: they cannot hurt.
MAX_COMPRESSION_RATIO = 100
SMALL_ENTRY_BYTES = 2**20
# One entry per tensor storage: a model with optimizer states has thousands, not hundreds of thousands.
MAX_ZIP_ENTRIES = 200_000
# Strings the simulation keeps (module and function names, storage keys); longer ones are not needed.
MAX_KEPT_STRING = 1024
# torch's legacy (non-zip) format is five pickles back to back (magic number, format version, system
# info, the object, its storage keys), then the storages' bytes; torch reads all five.
LEGACY_PICKLES = 5
_MARK = object()
# opcode name -> (pops to a MARK, items popped below the MARK or in all, items pushed)
_STACK_EFFECTS = {
    opcode.name: (
        pickletools.markobject in opcode.stack_before,
        opcode.stack_before.index(pickletools.markobject)
        if pickletools.markobject in opcode.stack_before
        else len(opcode.stack_before),
        len(opcode.stack_after),
    )
    for opcode in pickletools.opcodes
}


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass
class PickleSummary:
    """What a checkpoint's pickle would do and hold, read from its opcodes alone.

    Args:
        protocol: the highest pickle protocol it uses.
        globals: the `module.name` of every function or class it would look up.
        storages: storage key -> its declared size in bytes (None when its type has no known item size).
    """

    protocol: int = 0
    globals: set[str] = field(default_factory=set)
    storages: dict[str, int | None] = field(default_factory=dict)

    @property
    def holds_tensors(self) -> bool:
        """Whether it holds tensors: storages of torch's format, or tensors pickled by plain pickle."""
        return bool(self.storages) or any(name.startswith("torch._utils._rebuild") for name in self.globals)


class _TooLarge(Exception):
    """The pickle reads past `MAX_PICKLE_BYTES`."""


class _LimitedReader:
    """A buffered read-only stream that refuses, before reading, anything past `limit` bytes in all.

    genops reads an opcode's argument with one `read(n)`, `n` taken from the file: a lying length must not
    become an allocation.
    """

    def __init__(self, raw: io.BufferedReader, limit: int):
        self._raw = raw
        self._start = raw.tell()
        self._limit = limit
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise _TooLarge  # genops never asks for everything
        data = self._raw.read(size)
        self._left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._raw.readline(self._left + 1)
        if len(line) > self._left:
            raise _TooLarge
        self._left -= len(line)
        return line

    def tell(self) -> int:
        return self._start + self._limit - self._left

    def at_end(self) -> bool:
        return not self._raw.peek(1)


def _item_sizes() -> dict[str, int]:
    """`module.name` of each storage type a pickle may declare -> its element's size in bytes."""
    import torch

    sizes = {"torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        sizes[f"torch.{name}"] = sizes[f"torch.cuda.{name}"] = dtype.itemsize
    return sizes


def _kept(value: object) -> object:
    """The value the simulation keeps for a literal (ints and short strings; the rest as unknown)."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str) and len(value) <= MAX_KEPT_STRING:
        return value
    return None


def scan_pickles(stream: io.BufferedReader, *, count: int, limit: int = MAX_PICKLE_BYTES) -> PickleSummary:
    """Read up to `count` pickles back to back from `stream` as opcodes, running nothing.

    Args:
        stream: a buffered stream (one with `peek`), positioned at the first pickle.
        count: how many pickles to read at most (fewer when the stream ends).
        limit: the most bytes to read in all.

    Raises:
        ValueError: the pickle is malformed (an unknown opcode, a stack that does not add up) or
            implausibly long. `_TooLarge` when it is larger than `limit`.
    """
    reader = _LimitedReader(stream, limit)
    summary = PickleSummary()
    item_sizes = _item_sizes()
    ops = 0
    for _ in range(count):
        if reader.at_end():
            break  # a plain pickle.dump file holds one pickle, not torch's run of them
        stack: list[object] = []
        marks: list[int] = []
        memo: dict[int, object] = {}
        for opcode, arg, _ in pickletools.genops(reader):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise ValueError("the pickle is implausibly long")
            name = opcode.name
            if name == "MARK":
                marks.append(len(stack))
                stack.append(_MARK)
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is _MARK:
                    raise ValueError(f"{name} with nothing to memoise")
                if len(memo) >= MAX_MEMO_ENTRIES:
                    raise ValueError("the pickle remembers implausibly many objects")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]  # as pickle's unpickler does
                continue
            to_mark, before, after = _STACK_EFFECTS[name]
            popped: list[object] = []
            if to_mark or (name == "POP" and stack and stack[-1] is _MARK):
                if not marks:
                    raise ValueError(f"{name} without a MARK")
                mark = marks.pop()
                popped = stack[mark + 1 :]
                del stack[mark:]
                before = 0 if name == "POP" else before
            if before:
                if len(stack) - (marks[-1] + 1 if marks else 0) < before:
                    raise ValueError(f"{name} on a stack too short for it")
                popped = stack[-before:] + popped
                del stack[-before:]
            pushed: object = None
            if name == "PROTO":
                summary.protocol = max(summary.protocol, arg)
            elif name in ("GLOBAL", "INST"):
                summary.globals.add(arg.replace(" ", "."))
                pushed = _Global(arg.replace(" ", ".")) if name == "GLOBAL" else None
            elif name == "STACK_GLOBAL":
                module, attribute = popped
                known = isinstance(module, str) and isinstance(attribute, str)
                pushed = _Global(f"{module}.{attribute}" if known else "<a function it computes>")
                summary.globals.add(pushed.name)
            elif name.startswith("EXT"):
                # copyreg's extension registry: a function looked up by number
                pushed = _Global("<a function from the extension registry>")
                summary.globals.add(pushed.name)
            elif name == "BINPERSID":
                _record_storage(summary, popped[0], item_sizes)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                pushed = tuple(popped) if len(popped) <= 8 else None
            elif name == "EMPTY_TUPLE":
                pushed = ()
            elif opcode.arg is not None and not before:
                pushed = _kept(arg)
            stack.extend([pushed] * after)
            if name == "STOP":
                break
    return summary


def _record_storage(summary: PickleSummary, pid: object, item_sizes: dict[str, int]) -> None:
    """Note the storage a persistent id declares: ("storage", type, key, location, numel, ...).

    Anything else torch's safe loader refuses by itself."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        return
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
        return
    size = item_sizes.get(storage_type.name) if isinstance(storage_type, _Global) else None
    nbytes = numel * size if size is not None else None
    previous = summary.storages.get(key, 0)
    summary.storages[key] = None if nbytes is None or previous is None else max(previous, nbytes)


def _bomb(path: Path, why: str) -> NbkitError:
    return NbkitError(
        f"refused to open: {why}; no checkpoint is like that, it is a zip bomb or a damaged file, and "
        "nothing of it was decompressed or run",
        path=path,
        fix="delete it and get the model from its original source, as .safetensors if it is offered",
    )


@dataclass(frozen=True)
class TorchZip:
    """The checked layout of a torch zip checkpoint.

    Args:
        prefix: the folder every entry is in (torch reads `<prefix>/data.pkl`).
        pickle: the `data.pkl` entry.
        entries: name -> entry.
    """

    prefix: str
    pickle: zipfile.ZipInfo
    entries: dict[str, zipfile.ZipInfo]


def check_zip_directory(path: Path, archive: zipfile.ZipFile) -> TorchZip:
    """Check a torch zip's central directory: the sizes its entries declare, before any is read.

    Raises:
        NbkitError: for an entry that would inflate implausibly (a zip bomb), a pickle larger than any
            state dict's, entries larger in all than the file, or a layout torch would read otherwise
            than this check (no `data.pkl`, names twice).
    """
    infos = archive.infolist()
    if not infos:
        raise _damaged(path, "the zip is empty")
    prefix = infos[0].filename.split("/", 1)[0]
    if "/" not in infos[0].filename:
        raise _damaged(
            path, f"its first entry {infos[0].filename!r} is not in a folder, as torch writes them"
        )
    entries: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    for info in infos:
        # torch's zip reader matches names ignoring case: one name twice would be read two ways
        if info.filename.lower() in folded:
            raise _bomb(path, f"its zip holds {info.filename!r} twice")
        folded.add(info.filename.lower())
        entries[info.filename] = info
        if info.file_size > SMALL_ENTRY_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise _bomb(
                path,
                f"its entry {info.filename!r} would inflate to {format_bytes(info.file_size)} from "
                f"{format_bytes(info.compress_size)} ({info.file_size // max(info.compress_size, 1)}x)",
            )
    # Beyond the pickle and the tensor storages (checked against the pickle in `check_zip_storages`),
    # torch reads only small records (version, byteorder, ...): a large one inflates into memory for
    # nothing, whatever its ratio.
    for info in infos:
        bounded_elsewhere = (
            info.filename.startswith(f"{prefix}/data/") or info.filename == f"{prefix}/data.pkl"
        )
        if info.file_size > SMALL_ENTRY_BYTES and not bounded_elsewhere:
            raise _bomb(
                path,
                f"its entry {info.filename!r} would inflate to {format_bytes(info.file_size)}, where a "
                "checkpoint's records other than its pickle and tensors are a few bytes",
            )
    total = os.path.getsize(path)
    if sum(info.compress_size for info in infos) > total:
        raise _bomb(path, f"its entries add up to more than the file's {format_bytes(total)}")
    pickled = entries.get(f"{prefix}/data.pkl")
    if pickled is None:
        raise _damaged(path, f"the zip has no {prefix}/data.pkl")
    if pickled.file_size > MAX_PICKLE_BYTES:
        raise _bomb(
            path,
            f"its pickle ({pickled.filename}) is {format_bytes(pickled.file_size)}; a state dict's is at most a few MB",
        )
    return TorchZip(prefix, pickled, entries)


def check_zip_storages(path: Path, layout: TorchZip, summary: PickleSummary) -> None:
    """Check each storage the pickle declares against the zip entry holding it.

    Raises:
        NbkitError: a storage is missing, compressed (torch memory-maps storages, so it cannot read
            one), or smaller than the pickle says.
    """
    for key, nbytes in summary.storages.items():
        info = layout.entries.get(f"{layout.prefix}/data/{key}")
        if info is None:
            raise _damaged(path, f"the pickle names tensor storage {key!r}, which the zip does not hold")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NbkitError(
                f"its tensors are stored compressed ({info.filename}), which torch's memory-mapped "
                "loading cannot read; torch never writes them so: the file was repacked",
                path=path,
                fix="re-save it as .safetensors on a machine where you trust the file",
            )
        if nbytes is not None and nbytes > info.file_size:
            raise _damaged(
                path,
                f"the pickle declares {format_bytes(nbytes)} for tensor storage {key!r}, which holds {format_bytes(info.file_size)}",
            )


def check_legacy_storages(path: Path, summary: PickleSummary) -> None:
    """A legacy (non-zip) file's storages follow its pickles: together they fit in the file."""
    declared = sum(nbytes or 0 for nbytes in summary.storages.values())
    if declared > os.path.getsize(path):
        raise _bomb(
            path,
            f"its pickle declares {format_bytes(declared)} of tensors in a file of {format_bytes(os.path.getsize(path))}",
        )


def zip_entry_count(path: Path) -> int | None:
    """The number of entries the zip's end record declares (None when it cannot be read)."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    with open(path, "rb") as handle:
        record = end_record(handle)
    return record[zipfile._ECD_ENTRIES_TOTAL] if record else None


@contextlib.contextmanager
def open_torch_zip(path: Path) -> Iterator[tuple[zipfile.ZipFile, TorchZip]]:
    """Open a torch zip checkpoint and check its central directory (`check_zip_directory`)."""
    count = zip_entry_count(path)
    if count is not None and count > MAX_ZIP_ENTRIES:
        raise _bomb(path, f"its zip declares {count} entries")
    with zipfile.ZipFile(path) as archive:
        yield archive, check_zip_directory(path, archive)


def scan_checkpoint(path: Path, file_format: str) -> PickleSummary:
    """Check a pickled checkpoint's container and read its pickle's opcodes (`scan_pickles`).

    Args:
        path: the file.
        file_format: `torch-zip` or `torch-legacy`.

    Raises:
        NbkitError: a zip bomb, a pickle larger than `MAX_PICKLE_BYTES`, storages the file does not hold.
        ValueError, EOFError, zipfile.BadZipFile, OSError: a damaged file.
    """
    try:
        if file_format == "torch-zip":
            with open_torch_zip(path) as (archive, layout), archive.open(layout.pickle) as stream:
                # buffered: genops reads an opcode at a time, and a zip entry's own read() is slow Python
                summary = scan_pickles(io.BufferedReader(stream, buffer_size=2**16), count=1)
                check_zip_storages(path, layout, summary)
                return summary
        with open(path, "rb") as handle:
            summary = scan_pickles(handle, count=LEGACY_PICKLES)
    except _TooLarge:
        raise _bomb(
            path, f"its pickle is larger than {format_bytes(MAX_PICKLE_BYTES)}; a state dict's is a few MB"
        ) from None
    check_legacy_storages(path, summary)
    return summary


def _damaged(path: Path, why: str) -> NbkitError:
    return NbkitError(
        f"the checkpoint is truncated or damaged and cannot be read ({why})",
        path=path,
        fix="download or copy it again",
    )
