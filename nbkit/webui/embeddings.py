"""A1111's textual-inversion embeddings: files in `<storage root>/embeddings/`, used in prompts by name.

Each `.safetensors`, `.pt` or `.bin` file (in sub-folders too) is one embedding, named by its file stem;
the name written in a prompt or negative prompt uses it, as in A1111. The file formats A1111 reads are
read: A1111's own (`string_to_param`), diffusers' and kohya's (one tensor), and SDXL's (`clip_l` and
`clip_g`, one per text encoder). Pickled files are checked (`nbkit.convert.checkpoint_io`) and read only
with `torch.load(weights_only=True)`, so a file that would run code is refused, and nothing of it runs.

A file added to or removed from the folder is noticed at the next use (A1111 looks at the folders'
times); one changed in place is read again on refresh-embeddings (`EmbeddingDatabase.refresh`).

Which embeddings fit the loaded model the model's family says (`Family.textual_inversion`: its text
encoders and the file keys that go to each); one whose keys or widths differ is listed as skipped, as
A1111 lists one of another model's width. An embedding named in a prompt is loaded into the pipeline
with diffusers' `load_textual_inversion` under a token of nbkit's own (`<ti-N>`), and kept there until
the model is unloaded; the prompt the model sees has the name replaced by that token, matched as
A1111's tokenizer-level matching does (any case, not inside a longer word). The file stem itself would
not do as the token: CLIP's tokenizer lower-cases the prompt, so diffusers' expansion of a multi-vector
token misses a name written with capitals, and a stem may already be a piece of the vocabulary. The infotext names the embeddings used in `TI hashes`, with A1111's 12-hex
short sha256 of each file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_EMBEDDING_BYTES = 64 * 2**20  # real embeddings are kilobytes; a larger file is not one
MAX_EMBEDDING_FILES = 4096  # what one scan reads at most
MAX_VECTORS = 1024  # A1111's longest prompts are a few hundred tokens
TI_HASH_LENGTH = 12  # A1111's `TI hashes` short hash
# A1111's other keys of its .pt embeddings, listed by GET /embeddings.
_INFO_KEYS = ("step", "sd_checkpoint", "sd_checkpoint_name")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding file, read.

    Args:
        name: what a prompt calls it (the file stem).
        path: the file.
        vectors: the vectors per file key (None: the file's one set, for a one-encoder model), each a
            float tensor of shape (count, width).
        sha256: the file's sha256.
        step: its training steps, when the file says.
        sd_checkpoint: the hash of the checkpoint it was trained on, when the file says.
        sd_checkpoint_name: that checkpoint's name, when the file says.
    """

    name: str
    path: Path
    vectors: dict[str | None, Any]
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width of a vector (summed over the text encoders, for SDXL's)."""
        return sum(int(tensor.shape[-1]) for tensor in self.vectors.values())

    @property
    def count(self) -> int:
        """A1111's `vectors`: how many tokens' worth it is."""
        return max(int(tensor.shape[0]) for tensor in self.vectors.values())

    @property
    def short_hash(self) -> str:
        return self.sha256[:TI_HASH_LENGTH]

    def to_api(self) -> dict[str, Any]:
        """One item of A1111's GET /sdapi/v1/embeddings."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.count,
        }


def _tensor(value: Any, path: Path, key: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise NbkitError(f"its {key!r} is not a tensor of floats", path=path, fix="use an embedding file")
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or not 1 <= value.shape[0] <= MAX_VECTORS or value.shape[1] < 1:
        raise NbkitError(
            f"its {key!r} has the shape {tuple(value.shape)}, not (vectors, width)",
            path=path,
            fix="use an embedding file",
        )
    return value.detach().to(torch.float32)


def _vectors(data: Any, path: Path) -> dict[str | None, Any]:
    """The vectors of a loaded embedding file, in the layouts A1111 reads."""
    if not isinstance(data, dict):
        raise NbkitError(f"it holds a {type(data).__name__}, not an embedding", path=path)
    if "string_to_param" in data:  # A1111's own .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise NbkitError("its string_to_param does not hold one term", path=path)
        return {None: _tensor(next(iter(params.values())), path, "string_to_param")}
    if "clip_l" in data and "clip_g" in data:  # SDXL: one set per text encoder
        return {key: _tensor(data[key], path, key) for key in ("clip_l", "clip_g")}
    if "emb_params" in data:  # kohya's
        return {None: _tensor(data["emb_params"], path, "emb_params")}
    import torch

    tensors = [(key, value) for key, value in data.items() if isinstance(value, torch.Tensor)]
    if len(tensors) != 1:  # diffusers' concepts: {token: tensor}
        raise NbkitError(
            f"it holds {len(tensors)} tensors, and no key A1111's embeddings have",
            path=path,
            fix="use a textual-inversion embedding (A1111's, diffusers' or kohya's)",
        )
    key, value = tensors[0]
    return {None: _tensor(value, path, str(key))}


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Read one embedding file without running anything from it.

    Args:
        path: a `.safetensors`, `.pt` or `.bin` file.

    Raises:
        NbkitError: a file that is too large, damaged, not an embedding, or that would run code.
    """
    import torch

    from nbkit.convert.checkpoint_io import check_tensor_file
    from nbkit.convert.hashes import model_hashes

    path = Path(path)
    if path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise NbkitError(
            f"it is larger than {MAX_EMBEDDING_BYTES // 2**20} MB, far more than an embedding",
            path=path,
            fix="move other files out of the embeddings folder",
        )
    file_format = check_tensor_file(path)  # a pickle that would call anything but torch's rebuilders
    try:
        if file_format == "safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a file they refuse
        raise NbkitError(
            f"it cannot be read safely ({type(error).__name__}: {str(error).strip()[:200]})",
            path=path,
            fix="re-save it as .safetensors",
        ) from None
    vectors = _vectors(data, path)
    info = {key: data.get(key) for key in _INFO_KEYS}
    return Embedding(
        path.stem,
        path,
        vectors,
        model_hashes(path)[0],
        step=info["step"] if isinstance(info["step"], int) else None,
        sd_checkpoint=info["sd_checkpoint"] if isinstance(info["sd_checkpoint"], str) else None,
        sd_checkpoint_name=info["sd_checkpoint_name"]
        if isinstance(info["sd_checkpoint_name"], str)
        else None,
    )


def _encoder_width(pipeline: Any, encoder: str) -> int | None:
    module = getattr(pipeline, encoder, None)
    if module is None or not hasattr(module, "get_input_embeddings"):
        return None
    return int(module.get_input_embeddings().weight.shape[-1])


def fits(embedding: Embedding, pipeline: Any, family: Any) -> bool:
    """Whether `embedding` loads into `pipeline`: its file keys are the family's
    (`Family.textual_inversion`) and each set of vectors has its text encoder's width."""
    layout = family.textual_inversion
    if not layout or set(embedding.vectors) != {key for key, _, _ in layout}:
        return False
    return all(
        embedding.vectors[key].shape[-1] == _encoder_width(pipeline, encoder) for key, encoder, _ in layout
    )


def _name_pattern(name: str) -> str:
    """`name` as CLIP's tokenizer would find it in a prompt (A1111 matches token sequences): a name that
    starts or ends with a letter not inside a longer word, one that starts or ends with punctuation not
    inside a longer run of it (digits are single tokens, so anything may touch them)."""

    def guard(char: str, ahead: bool) -> str:
        if char.isalpha():
            return "(?![^\\W\\d_])" if ahead else "(?<![^\\W\\d_])"
        if char.isdigit():
            return ""
        if not char.isspace():
            return "(?![^\\w\\s]|_)" if ahead else "(?<![^\\w\\s])(?<!_)"
        return ""

    return guard(name[0], False) + re.escape(name) + guard(name[-1], True)


def ti_hashes_text(used: list[Embedding]) -> str | None:
    """The infotext's `TI hashes` value: `name: hash12, ...` (A1111 drops `:` and `,` from names)."""
    parts = [
        f"{embedding.name.replace(':', '').replace(',', '')}: {embedding.short_hash}" for embedding in used
    ]
    return ", ".join(parts) or None


@dataclasses.dataclass
class EmbeddedPrompts:
    """A prompt pair with the embeddings it names replaced by their tokens.

    Args:
        prompt: the prompt the model sees.
        negative_prompt: the negative prompt the model sees.
        used: the embeddings named, in the order they first appear.
        loaded: some were loaded into the pipeline just now (its text encoders changed).
    """

    prompt: str
    negative_prompt: str
    used: list[Embedding] = dataclasses.field(default_factory=list)
    loaded: bool = False


class EmbeddingDatabase:
    """The embeddings of a folder, and those loaded into the current pipeline.

    Args:
        folder: `<storage root>/embeddings` (None, or a folder that does not exist: no embeddings).
    """

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}  # read, or why not
        self.embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}  # name -> why it was not read
        self._tokens: dict[str, str] = {}  # name -> token in the current pipeline
        self._loaded: dict[str, Embedding] = {}  # name -> what that token holds
        self._next_token = 0  # tokens are never reused: a changed file's old one stays in the tokenizer
        self._stamp: tuple | None = None  # the folders' times at the last scan (None: not scanned)

    def refresh(self) -> None:
        """Scan the folder again (A1111's refresh-embeddings); files that did not change are not re-read.

        A file that cannot be read is logged and left out, as A1111 does.
        """
        found: dict[str, Embedding] = {}
        errors: dict[str, str] = {}
        files: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}
        paths, stamp = self._walk()
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            key = (stat.st_size, stat.st_mtime_ns)
            known = self._files.get(path)
            if known is not None and known[0] == key:
                read = known[1]
            else:
                try:
                    read = read_embedding(path)
                except (NbkitError, OSError) as error:
                    logger.warning("embedding %s skipped: %s", path, error)
                    read = str(error)
            files[path] = (key, read)
            if isinstance(read, str):
                errors[path.stem] = read
            else:
                found[read.name] = read  # a name found twice: the last one, as in A1111
        with self._lock:
            self._files, self.embeddings, self.errors, self._stamp = files, found, errors, stamp

    def _walk(self) -> tuple[list[Path], tuple]:
        """The embedding files, and the folders' modification times (a file added or removed changes
        its folder's)."""
        if self.folder is None or not self.folder.is_dir():
            return [], ()
        paths: list[Path] = []
        stamp = []
        for root, folders, names in os.walk(self.folder, followlinks=False):
            folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
            stamp.append((root, os.stat(root).st_mtime_ns))
            paths += [
                Path(root) / name
                for name in sorted(names)
                if not name.startswith(".") and Path(name).suffix.lower() in EMBEDDING_SUFFIXES
            ]
            if len(paths) >= MAX_EMBEDDING_FILES:
                logger.warning(
                    "more than %d embeddings in %s: the rest are left out", MAX_EMBEDDING_FILES, root
                )
                return paths[:MAX_EMBEDDING_FILES], tuple(stamp)
        return paths, tuple(stamp)

    def _ensure_scanned(self) -> None:
        """Scan again when a folder changed (A1111 looks at its folders' times before each use)."""
        if self._stamp is None or self._walk()[1] != self._stamp:
            self.refresh()

    def listing(self, pipeline: Any, family: Any) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's GET /embeddings: `loaded` (fit the model) and `skipped` (do not). With no model
        loaded every embedding is `loaded`, as in A1111 before it knows the text encoder's width."""
        self._ensure_scanned()
        loaded: dict[str, dict[str, Any]] = {}
        skipped: dict[str, dict[str, Any]] = {}
        for name, embedding in sorted(self.embeddings.items(), key=lambda item: item[0].lower()):
            usable = pipeline is None or fits(embedding, pipeline, family)
            (loaded if usable else skipped)[name] = embedding.to_api()
        return {"loaded": loaded, "skipped": skipped}

    def usable_names(self, pipeline: Any, family: Any) -> list[str]:
        """The names a prompt can use with the loaded model (every one when none is loaded)."""
        return list(self.listing(pipeline, family)["loaded"])

    def forget(self) -> None:
        """The pipeline was unloaded: nothing is loaded into the next one yet."""
        with self._lock:
            self._tokens.clear()
            self._loaded.clear()
            self._next_token = 0

    def apply(self, pipeline: Any, family: Any, prompt: str, negative_prompt: str) -> EmbeddedPrompts:
        """Load the embeddings a prompt names into `pipeline` (once per model) and put their tokens in.

        Args:
            pipeline: the loaded pipeline (its text encoders and tokenizers take the embeddings).
            family: its family (`Family.textual_inversion` says which encoders take which vectors).
            prompt: the prompt, LoRA tags already taken out.
            negative_prompt: the negative prompt.
        """
        unchanged = EmbeddedPrompts(prompt, negative_prompt)
        self._ensure_scanned()
        if not family.textual_inversion or not self.embeddings:
            return unchanged
        usable = {
            name.lower(): embedding
            for name, embedding in self.embeddings.items()
            if fits(embedding, pipeline, family)
        }
        if not usable:
            return unchanged
        # Longest names first: at one place A1111 takes the longest embedding that matches.
        names = sorted(usable, key=len, reverse=True)
        pattern = re.compile("|".join(_name_pattern(name) for name in names), re.IGNORECASE)
        used: dict[str, Embedding] = {}
        for text in (prompt, negative_prompt):
            for match in pattern.finditer(text):
                embedding = usable[match.group(0).lower()]
                used.setdefault(embedding.name, embedding)
        if not used:
            return unchanged
        loaded = self._load(pipeline, family, list(used.values()))

        def token(match: re.Match) -> str:
            return self._tokens[usable[match.group(0).lower()].name]

        return EmbeddedPrompts(
            pattern.sub(token, prompt), pattern.sub(token, negative_prompt), list(used.values()), loaded
        )

    def _load(self, pipeline: Any, family: Any, embeddings: list[Embedding]) -> bool:
        """Load those of `embeddings` not yet in `pipeline` (a changed file gets a new token); True when
        any was loaded."""
        with self._lock:
            new = [embedding for embedding in embeddings if self._loaded.get(embedding.name) is not embedding]
            if not new:
                return False
            tokens = [f"<ti-{self._next_token + index}>" for index in range(len(new))]
            for key, encoder, tokenizer in family.textual_inversion:
                # One call per text encoder: its embedding matrix grows once for all of them.
                pipeline.load_textual_inversion(
                    [embedding.vectors[key] for embedding in new],
                    token=tokens,
                    text_encoder=getattr(pipeline, encoder),
                    tokenizer=getattr(pipeline, tokenizer),
                )
            self._next_token += len(new)
            for embedding, token in zip(new, tokens, strict=True):
                self._tokens[embedding.name] = token
                self._loaded[embedding.name] = embedding
            return True
