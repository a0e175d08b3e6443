"""Pixel upscalers for the extras routes and the hires fix, as AUTOMATIC1111 offers them.

"None", "Lanczos" and "Nearest" resize with PIL. Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT, and
every other architecture `spandrel` detects) are files in `<storage root>/upscalers/`
(`.safetensors`, `.pth`, `.pt`, `.ckpt`), named by their file stem as A1111 names them, and the
downloadable ones of `KNOWN_UPSCALERS` (under A1111's names where A1111 has them: "R-ESRGAN 4x+", ...),
fetched into that folder on first use (GitHub releases over http(s) with their sha256 checked, hub
files through huggingface_hub), never while `HF_HUB_OFFLINE` is set.

A model file is read without running anything from it: safetensors as it is; a pickled one only after
its opcodes are checked (`nbkit.convert.checkpoint_io.check_pickled_checkpoint`) and then with
`torch.load(weights_only=True)`. spandrel's own loader is not used for files: for `.pth` it unpickles
with `weights_only=False` (behind its own allow-list), and for `.pt` it tries `torch.jit.load`, which
runs the file's TorchScript. A model runs in tiles (`TILE` pixels with `TILE_OVERLAP` blended), so a
large picture needs little memory, and no pass may make more than `max_pixels` times
`MODEL_PASS_HEADROOM` pixels.

`Upscalers.upscale` is A1111's `Upscaler.upscale`: the target is the scaled size rounded down to a
multiple of 8, a model runs (at most 3 passes) until the picture is at least that large, and the rest
is a Lanczos resize. `Upscalers.resize` is A1111's `images.resize_image` with an upscaler (the hires
fix's pixel path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import os
import re
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from nbkit.errors import NbkitError

if TYPE_CHECKING:
    import torch

PIL_UPSCALERS = ("None", "Lanczos", "Nearest")
MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
FOLDER_NAME = "upscalers"
TILE = 512  # pixels of input per model call
TILE_OVERLAP = 32  # pixels two tiles share, blended linearly (no seams)
MAX_PASSES = 3  # A1111's: a 2x model runs at most 3 times (8x)
# A model pass overshoots the target by up to its scale before the Lanczos resize down: what it makes may
# be this many times the server's pixel cap (a 4x model on 1024x1024 for 2048x2048 makes 4096x4096).
MODEL_PASS_HEADROOM = 4
SIZE_MULTIPLE = 8  # A1111 rounds an upscaled size down to a multiple of 8
_TORCHVISION_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@dataclasses.dataclass(frozen=True)
class KnownUpscaler:
    """A downloadable upscaler model.

    Args:
        name: the name it is listed and asked for by (A1111's, where A1111 has it).
        filename: the file's name in `<storage root>/upscalers/`.
        scale: its upscale factor.
        sha256: the file's sha256 (a download that differs is deleted).
        url: an http(s) URL of the file, or None for a hub file.
        repo_id: the hub repository of a hub file.
        hub_path: the file's path in that repository.
        revision: the hub commit (None: the default branch).
    """

    name: str
    filename: str
    scale: int
    sha256: str
    url: str | None = None
    repo_id: str | None = None
    hub_path: str | None = None
    revision: str | None = None

    @property
    def source(self) -> str:
        """Where it comes from, as a URL."""
        if self.url is not None:
            return self.url
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision or 'main'}/{self.hub_path}"


_REAL_ESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download"
KNOWN_UPSCALERS: dict[str, KnownUpscaler] = {
    known.name: known
    for known in (
        KnownUpscaler(
            "R-ESRGAN 4x+", "RealESRGAN_x4plus.pth", 4,
            "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            url=f"{_REAL_ESRGAN}/v0.1.0/RealESRGAN_x4plus.pth",
        ),
        KnownUpscaler(
            "R-ESRGAN 4x+ Anime6B", "RealESRGAN_x4plus_anime_6B.pth", 4,
            "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
            url=f"{_REAL_ESRGAN}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        ),
        KnownUpscaler(
            "R-ESRGAN 2x+", "RealESRGAN_x2plus.pth", 2,
            "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            url=f"{_REAL_ESRGAN}/v0.2.1/RealESRGAN_x2plus.pth",
        ),
        KnownUpscaler(
            "4x-UltraSharp", "4x-UltraSharp.pth", 4,
            "a5812231fc936b42af08a5edba784195495d303d5b3248c24489ef0c4021fe01",
            repo_id="Kim2091/UltraSharp", hub_path="4x-UltraSharp.pth",
            revision="920fe218c211f831b43cb30327f203e2b59f5dab",
        ),
        KnownUpscaler(
            "SwinIR 4x", "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth", 4,
            "99adfa91350a84c99e946c1eb3d8fce34bc28f57d807b09dc8fe40a316328c0a",
            url="https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
            "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth",
        ),
        KnownUpscaler(
            "DAT x2", "DAT_x2.pth", 2, "7760aa96e4ee77e29d4f89c3a4486200042e019461fdb8aa286f49aa00b89b51",
            repo_id="w-e-w/DAT", hub_path="experiments/pretrained_models/DAT/DAT_x2.pth",
        ),
        KnownUpscaler(
            "DAT x4", "DAT_x4.pth", 4, "391a6ce69899dff5ea3214557e9d585608254579217169faf3d4c353caff049e",
            repo_id="w-e-w/DAT", hub_path="experiments/pretrained_models/DAT/DAT_x4.pth",
        ),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class UpscalerInfo:
    """One upscaler on offer.

    Args:
        name: what it is listed and asked for by.
        kind: `none` (no upscaling: A1111's "None"), `resize` (a PIL filter) or `model`.
        path: a model's file (where a known one will be downloaded to, when not yet there).
        scale: a model's factor (from its file name until it has been loaded), else None.
        known: the downloadable model it is, if any.
    """

    name: str
    kind: Literal["none", "resize", "model"]
    path: Path | None = None
    scale: float | None = None
    known: KnownUpscaler | None = None

    @property
    def downloaded(self) -> bool:
        """Whether a model's file is there (PIL upscalers: always)."""
        return self.path is None or self.path.is_file()

    def to_api(self) -> dict[str, Any]:
        """The shape of one item of A1111's GET /sdapi/v1/upscalers."""
        if self.path is None:
            path = None
        elif self.downloaded or self.known is None:
            path = str(self.path)
        else:
            path = self.known.source  # A1111 lists a model not yet downloaded by its URL
        return {
            "name": self.name,
            "model_name": self.path.stem if self.path is not None else None,
            "model_path": path,
            "model_url": self.known.source if self.known is not None else None,
            "scale": self.scale if self.kind == "model" else 4,  # A1111 lists its PIL upscalers at 4
        }


def import_spandrel() -> types.ModuleType:
    """Import `spandrel`, also where torchvision cannot be imported.

    spandrel's package import loads every architecture, and two of them (LaMa inpainting, RestoreFormer
    face restoration, neither an upscaler) import torchvision at module level. Only when
    `import torchvision` fails (not installed, or a build that raises on import, such as PyPI's CUDA
    torchvision beside a CPU torch) is spandrel imported with placeholder `torchvision`,
    `torchvision.transforms` and `torchvision.transforms.functional` modules in `sys.modules`; they are
    removed as soon as that import returns, so other libraries (transformers' torchvision detection) see
    the same `sys.modules` as before. Using any name from a placeholder raises `NbkitError` saying
    torchvision is needed. With a working torchvision, or spandrel already imported, nothing is faked.

    Raises:
        NbkitError: spandrel is not installed.
    """
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise NbkitError(
            "model upscalers need the spandrel package, which is not installed",
            fix="pip install spandrel (it comes with nbkit's `ui` extra)",
        )
    if _torchvision_imports():
        return importlib.import_module("spandrel")
    with _placeholder_torchvision():
        return importlib.import_module("spandrel")


def _torchvision_imports() -> bool:
    """Whether `import torchvision` works; a failed attempt leaves none of its modules behind."""
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # ImportError, or the RuntimeError/OSError a mismatched CUDA build raises
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        return False


class _NeedsTorchvision:
    """Stands for a torchvision name in a placeholder module: any use of it says torchvision is needed."""

    def __init__(self, name: str):
        self._name = name

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:
        raise NbkitError(
            f"{self._name} is needed by this model (LaMa or RestoreFormer), and torchvision cannot be "
            "imported here",
            fix="install a torchvision build that matches the installed torch",
        )

    __call__ = _refuse

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        self._refuse()


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "placeholder while spandrel imports: torchvision cannot be imported")
    module.__path__ = []  # a package, so `import torchvision.transforms` finds its child in sys.modules

    def __getattr__(attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _NeedsTorchvision(f"{name}.{attribute}")

    module.__getattr__ = __getattr__  # PEP 562: `from torchvision.x import y` asks for `y` here
    return module


_import_lock = threading.Lock()


@contextlib.contextmanager
def _placeholder_torchvision() -> Iterator[None]:
    with _import_lock:
        modules = {name: _placeholder_module(name) for name in _TORCHVISION_NAMES}
        modules["torchvision"].transforms = modules["torchvision.transforms"]
        modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
        sys.modules.update(modules)
        try:
            yield
        finally:
            for name, module in modules.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An upscaler file's tensors, read without running anything from the file.

    Args:
        path: a `.safetensors` file, or a pickled `.pth`/`.pt`/`.ckpt` holding only tensors (nested in
            `params_ema`, `params` or `state_dict` as Real-ESRGAN and BasicSR save them).

    Raises:
        NbkitError: a pickle that would run code or build anything but tensors and plain containers, a
            TorchScript file, a damaged file, or one with no tensors.
    """
    import pickle

    import torch

    from nbkit.convert.checkpoint_io import check_pickled_checkpoint, sniff_format

    path = Path(path)
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    check_pickled_checkpoint(path)  # its opcodes first: a pickle that would call code is named and refused
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise NbkitError(
            f"refused to load: it holds more than tensors ({str(error).strip().splitlines()[0][:200]})",
            path=path,
            fix="use a .safetensors copy of this upscaler",
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise NbkitError(
            f"the file is damaged or not a model ({type(error).__name__})", path=path, fix="download it again"
        ) from None
    spandrel = import_spandrel()
    state = spandrel.canonicalize_state_dict(loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not state:
        raise NbkitError(
            "the file holds no state dict", path=path, fix="check that this is an upscaler model"
        )
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise NbkitError("the file holds no tensors", path=path, fix="check that this is an upscaler model")
    return tensors


def load_upscaler_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """A spandrel `ImageModelDescriptor` of an upscaler file, in eval mode on `device`.

    On CUDA it runs in float16 when the architecture supports it (as A1111 does), else float32.

    Args:
        path: the model file (`load_state_dict`).
        device: where it runs.

    Raises:
        NbkitError: the file is refused, spandrel knows no architecture with its keys, or the model does
            not take a picture (an inpainting model) or takes other than 1 or 3 channels.
    """
    import torch

    spandrel = import_spandrel()
    state = load_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader("cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise NbkitError(
            "spandrel knows no upscaler architecture with this file's weights",
            path=path,
            fix="use an ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... model (see spandrel's list)",
        ) from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels not in (1, 3):
        raise NbkitError(
            f"this is a {descriptor.architecture.name} model of purpose {descriptor.purpose}, not an upscaler "
            "of pictures",
            path=path,
            fix="use an upscaler (super-resolution) model",
        )
    device = torch.device(device)
    half = device.type == "cuda" and descriptor.supports_half
    descriptor.to(device)
    if half:
        descriptor.to(torch.float16)
    descriptor.eval()
    return descriptor


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    return [*range(0, length - tile, step), length - tile]


def _ramp(length: int, fade: int, start: bool, end: bool) -> torch.Tensor:
    """Weights along one side of a tile: rising over `fade` pixels where it overlaps the one before,
    falling where it overlaps the one after, else 1 (never 0, so every pixel has weight)."""
    import torch

    weights = torch.ones(length)
    fade = min(fade, length // 2)
    if fade > 0:
        rising = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if start:
            weights[:fade] = rising
        if end:
            weights[length - fade :] = rising.flip(0)
    return weights


def run_tiled(
    descriptor: Any, image: Image.Image, *, tile: int = TILE, overlap: int = TILE_OVERLAP
) -> Image.Image:
    """One model pass over `image`, in tiles of at most `tile` x `tile` pixels.

    Neighbouring tiles share `overlap` pixels, blended with linear weights, so no seams show and each
    call holds one tile's activations. The result is `descriptor.scale` times the size.

    Args:
        descriptor: a spandrel `ImageModelDescriptor`.
        image: the picture (converted to the model's 1 or 3 channels).
        tile: the largest tile side, in input pixels.
        overlap: the pixels neighbouring tiles share.
    """
    import numpy as np
    import torch

    if tile < 16 or not 0 <= overlap < tile // 2:
        raise ValueError(f"tile must be >= 16 and overlap in [0, tile/2), got tile {tile}, overlap {overlap}")
    mode = "L" if descriptor.input_channels == 1 else "RGB"
    pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).unsqueeze(0)
    parameter = next(descriptor.model.parameters())
    scale = descriptor.scale
    _, _, height, width = pixels.shape
    out = torch.zeros(1, descriptor.output_channels, height * scale, width * scale)
    weight = torch.zeros(1, 1, height * scale, width * scale)
    step = tile - overlap
    for top in _tile_starts(height, tile, step):
        for left in _tile_starts(width, tile, step):
            bottom, right = min(top + tile, height), min(left + tile, width)
            patch = pixels[..., top:bottom, left:right].to(parameter.device, parameter.dtype)
            result = descriptor(patch).float().cpu()
            rows = _ramp((bottom - top) * scale, overlap * scale, top > 0, bottom < height)
            columns = _ramp((right - left) * scale, overlap * scale, left > 0, right < width)
            blend = rows[:, None] * columns[None, :]
            out[..., top * scale : bottom * scale, left * scale : right * scale] += result * blend
            weight[..., top * scale : bottom * scale, left * scale : right * scale] += blend
    array = (out / weight).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return Image.fromarray(
        array[..., 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB"
    )


def _scale_from_name(name: str) -> int:
    """A model's factor as its file name says it (`4x-UltraSharp`, `RealESRGAN_x2plus`), else 4."""
    match = re.search(r"(?<![0-9])([1-8])[xX]|[xX]([1-8])(?![0-9])", name)
    return int(match.group(1) or match.group(2)) if match else 4


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's upscaled size: the scaled size rounded down to a multiple of 8 (at least 8)."""
    return (
        max(SIZE_MULTIPLE, int(width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
        max(SIZE_MULTIPLE, int(height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE),
    )


class Upscalers:
    """The upscalers on offer: A1111's PIL ones, the model files of a folder and the known downloads.

    The folder is listed afresh on every `list()` (a file dropped in shows at once). One model is kept
    loaded (the last one used). `upscale` and `resize` are not thread-safe: run them through the GPU
    queue; `fetch` may run beside them (downloads are serialised).

    Args:
        folder: `<storage root>/upscalers` (None: only the PIL upscalers).
        device: where models run.
        tile: the largest tile side a model runs on, in input pixels.
        overlap: the pixels neighbouring tiles share.
        downloads: fetch a known model on first use (None: unless `HF_HUB_OFFLINE` is set).
    """

    def __init__(
        self,
        folder: str | os.PathLike | None,
        *,
        device: str | torch.device = "cpu",
        tile: int = TILE,
        overlap: int = TILE_OVERLAP,
        downloads: bool | None = None,
    ):
        self.folder = Path(folder) if folder is not None else None
        self.device = device
        self.tile = tile
        self.overlap = overlap
        self.downloads = downloads
        self._loaded: tuple[tuple[str, int, int], Any] | None = None
        self._scales: dict[str, int] = {}  # file -> the factor its model has, once loaded
        self._fetching = threading.Lock()  # two requests for one new model download it once

    # --- what there is ------------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(
            path
            for path in self.folder.iterdir()
            if path.suffix.lower() in MODEL_SUFFIXES and path.is_file() and not path.name.startswith(".")
        )

    def list(self) -> list[UpscalerInfo]:
        """A1111's order: "None", "Lanczos", "Nearest", then every model by name (case-insensitive):
        the folder's files and the known downloads (a known one already downloaded is listed once, under
        its known name)."""
        models: dict[str, UpscalerInfo] = {}
        by_file = {known.filename: known for known in KNOWN_UPSCALERS.values()}
        for path in self._files():
            known = by_file.get(path.name)
            name = known.name if known is not None else path.stem
            scale = self._scales.get(str(path)) or (known.scale if known else _scale_from_name(path.stem))
            models.setdefault(name, UpscalerInfo(name, "model", path, scale, known))
        if self.folder is not None:
            for known in KNOWN_UPSCALERS.values():
                info = UpscalerInfo(known.name, "model", self.folder / known.filename, known.scale, known)
                models.setdefault(known.name, info)
        fixed = [UpscalerInfo(name, "none" if name == "None" else "resize") for name in PIL_UPSCALERS]
        return fixed + sorted(models.values(), key=lambda info: info.name.lower())

    def names(self) -> list[str]:
        """Every upscaler's name, in `list()`'s order."""
        return [info.name for info in self.list()]

    def find(self, name: str) -> UpscalerInfo:
        """The upscaler called `name` (exactly, else ignoring case).

        Raises:
            ValueError: no upscaler has that name (the message lists close names).
        """
        offered = self.list()
        for matches in (lambda info: info.name == name, lambda info: info.name.lower() == str(name).lower()):
            for info in offered:
                if matches(info):
                    return info
        names = [info.name for info in offered]
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else f"; the upscalers are: {', '.join(names)}"
        raise ValueError(f"no upscaler is called {name!r}{hint}")

    def has(self, name: str) -> bool:
        """Whether an upscaler is called `name`."""
        try:
            self.find(name)
        except ValueError:
            return False
        return True

    # --- models -------------------------------------------------------------------------------------

    def model(self, info: UpscalerInfo) -> Any:
        """The loaded spandrel model of a model upscaler (downloaded first if it is a known one)."""
        path = info.path if info.downloaded or info.known is None else self.fetch(info.known)
        assert path is not None
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # the old model is freed before the new one loads
            descriptor = load_upscaler_model(path, self.device)
            self._loaded = (key, descriptor)
            self._scales[str(path)] = descriptor.scale
        return self._loaded[1]

    def check_available(self, name: str) -> None:
        """Refuse, before any work, an upscaler whose model is neither there nor downloadable.

        Raises:
            ValueError: an unknown name.
            NbkitError: a known model not downloaded while downloads are off.
        """
        info = self.find(name)
        if info.known is not None and not info.downloaded and not self._downloads_allowed():
            self._offline_error(info.known)

    def _downloads_allowed(self) -> bool:
        if self.downloads is not None:
            return self.downloads
        from huggingface_hub import constants

        return not constants.HF_HUB_OFFLINE

    def _offline_error(self, known: KnownUpscaler) -> None:
        raise NbkitError(
            f"the upscaler {known.name} is not downloaded yet, and downloads are off (HF_HUB_OFFLINE)",
            path=self.folder / known.filename if self.folder is not None else None,
            fix=f"download {known.source} into {self.folder}, or unset HF_HUB_OFFLINE",
        )

    def unload(self) -> None:
        """Free the loaded model."""
        self._loaded = None

    def fetch(self, known: KnownUpscaler) -> Path:
        """Download a known model into the folder (atomically, its sha256 checked); returns its path.

        Raises:
            NbkitError: there is no folder, downloads are off (`HF_HUB_OFFLINE`), or the download fails.
        """
        if self.folder is None:
            raise NbkitError(f"{known.name} is not downloaded and there is no upscalers folder")
        target = self.folder / known.filename
        with self._fetching:
            if target.is_file():
                return target
            if not self._downloads_allowed():
                self._offline_error(known)
            self.folder.mkdir(parents=True, exist_ok=True)
            if known.url is not None:
                return _download_url(known, target)
            return _download_hub(known, target)

    # --- upscaling ----------------------------------------------------------------------------------

    def _model_pass(self, descriptor: Any, image: Image.Image, max_pixels: int | None) -> Image.Image:
        scale = descriptor.scale
        made = image.width * scale * image.height * scale
        if max_pixels is not None and made > max_pixels * MODEL_PASS_HEADROOM:
            raise NbkitError(
                f"a {scale}x model pass over {image.width}x{image.height} would make "
                f"{image.width * scale}x{image.height * scale} pixels, above this server's limit",
                fix="upscale a smaller picture, or by less",
            )
        return run_tiled(descriptor, image, tile=self.tile, overlap=self.overlap)

    def upscale(
        self, image: Image.Image, name: str, scale: float, *, max_pixels: int | None = None
    ) -> Image.Image:
        """A1111's `Upscaler.upscale`: `image` scaled by `scale` with the upscaler `name`.

        The result is `target_size(width, height, scale)`. "None" only resizes (Lanczos), as A1111's
        does; a model runs until the picture is at least that large (at most `MAX_PASSES` times), then
        is resized to it with Lanczos.

        Args:
            image: the picture.
            name: an upscaler's name (`find`).
            scale: the factor (> 0).
            max_pixels: the most pixels the result may have (None: no cap); a model pass may make
                `MODEL_PASS_HEADROOM` times as many before it is resized down.

        Raises:
            ValueError: an unknown name, or a scale that is not positive.
            NbkitError: a result above `max_pixels`, or a model that cannot be had or read.
        """
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"scale must be a number above 0, got {scale!r}")
        info = self.find(name)
        width, height = target_size(image.width, image.height, scale)
        if max_pixels is not None and width * height > max_pixels:
            raise NbkitError(
                f"the upscaled picture would be {width}x{height}, above this server's limit of {max_pixels} "
                "pixels",
                fix="upscale a smaller picture, or by less",
            )
        if info.kind == "model":
            descriptor = self.model(info)
            for _ in range(MAX_PASSES):
                before = image.size
                image = self._model_pass(descriptor, image, max_pixels)
                if image.size == before or (image.width >= width and image.height >= height):
                    break
        elif info.kind == "resize":
            resample = Image.Resampling.NEAREST if info.name == "Nearest" else Image.Resampling.LANCZOS
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image

    def resize(
        self, image: Image.Image, name: str, width: int, height: int, *, max_pixels: int | None = None
    ) -> Image.Image:
        """`image` at exactly (width, height) through the upscaler `name` (A1111's `resize_image` with an
        upscaler, the hires fix's pixel path): "None" is a Lanczos resize; any other upscales by the
        larger of the two factors when that is above 1, then resizes to the size with Lanczos.

        Args:
            image: the picture.
            name: an upscaler's name (`find`).
            width: the width to return.
            height: the height to return.
            max_pixels: as for `upscale`.
        """
        info = self.find(name)
        factor = max(width / image.width, height / image.height)
        if info.kind != "none" and factor > 1:
            image = self.upscale(image, info.name, factor, max_pixels=max_pixels)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image


def _download_url(known: KnownUpscaler, target: Path) -> Path:
    """A GitHub release file: fetched (resumable, sha256 checked) beside the target, then moved in."""
    import shutil

    from nbkit.fsio import fsync_dir
    from nbkit.models.download import download_url

    staging = target.parent / f".download-{target.stem}"
    downloaded = download_url(known.url, staging, expected_sha256=known.sha256)
    os.replace(downloaded, target)  # one rename: the folder never shows a partial file under its name
    fsync_dir(target.parent)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _download_hub(known: KnownUpscaler, target: Path) -> Path:
    """A hub file: huggingface_hub fetches it into a staging folder, its sha256 is checked, then it is
    moved in."""
    import hashlib
    import shutil

    from huggingface_hub import hf_hub_download

    from nbkit.fsio import fsync_dir

    staging = target.parent / f".download-{target.stem}"
    try:
        path = Path(
            hf_hub_download(known.repo_id, known.hub_path, revision=known.revision, local_dir=staging)
        )
    except Exception as error:  # huggingface_hub raises many types; its messages are readable
        raise NbkitError(
            f"cannot download the upscaler {known.name} from {known.source} ({type(error).__name__})",
            fix="check the internet connection, or download the file into the upscalers folder by hand",
        ) from None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != known.sha256:
        shutil.rmtree(staging, ignore_errors=True)
        raise NbkitError(
            f"the download of {known.name} has sha256 {digest.hexdigest()}, not the expected {known.sha256}; "
            "it was deleted",
            fix="try again later; if it persists, the file on the hub has changed",
        )
    os.replace(path, target)
    fsync_dir(target.parent)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_esrgan_state_dict(*, scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a tiny Real-ESRGAN (RRDBNet: 12 features, 1 block) in BasicSR's key layout,
    the one Real-ESRGAN's files use and spandrel detects as ESRGAN.

    A 2x model takes its input pixel-unshuffled (12 channels), as RealESRGAN_x2plus does. The same
    `scale` and `seed` give the same weights; the global torch RNG is left as it was.

    Args:
        scale: 2 or 4.
        seed: the seed of the weights.
    """
    import torch

    if scale not in (2, 4):
        raise ValueError(f"a tiny ESRGAN is 2x or 4x, got {scale!r}")
    features, grow, blocks = 12, 32, 1  # spandrel's RRDBNet has 32 growth channels, always
    shapes: dict[str, tuple[int, int]] = {"conv_first": (features, 3 * (4 if scale == 2 else 1))}
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for conv in range(1, 5):
                shapes[f"body.{block}.rdb{rdb}.conv{conv}"] = (grow, features + (conv - 1) * grow)
            shapes[f"body.{block}.rdb{rdb}.conv5"] = (features, features + 4 * grow)
    shapes.update(
        conv_body=(features, features),
        conv_up1=(features, features),
        conv_up2=(features, features),
        conv_hr=(features, features),
        conv_last=(3, features),
    )
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (out_channels, in_channels) in shapes.items():
        std = (2.0 / (in_channels * 9)) ** 0.5 * (0.5 if name.startswith("body.") else 0.1)
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * std
        state[f"{name}.bias"] = torch.zeros(out_channels)
    # Identity paths around the random trunk (its output is added to conv_first's): the colour
    # channels go through conv_first, the upsampling convs and conv_last unchanged, so the model
    # upscales the picture (nearest neighbour) and its random weights add a seeded texture.
    first = 4 if scale == 2 else 1  # a 2x model's input is pixel-unshuffled: channel c*4 is pixel (0, 0)
    for channel in range(3):
        state["conv_first.weight"][channel, channel * first, 1, 1] += 1.0
        state["conv_last.weight"][channel, channel, 1, 1] += 1.0
    for name in ("conv_up1", "conv_up2", "conv_hr"):
        for channel in range(features):
            state[f"{name}.weight"][channel, channel, 1, 1] += 1.0
    return state


def save_tiny_esrgan(folder: str | os.PathLike, *, scale: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-weight ESRGAN (`build_tiny_esrgan_state_dict`) as
    `<folder>/tiny-esrgan-<scale>x.safetensors` (written atomically); returns the file.

    Args:
        folder: the folder (an upscalers folder, to offer it in the web UI).
        scale: 2 or 4.
        seed: the seed of the weights.
    """
    from safetensors.torch import save_file

    from nbkit.fsio import atomic_path

    state = build_tiny_esrgan_state_dict(scale=scale, seed=seed)
    path = Path(folder) / f"tiny-esrgan-{scale}x.safetensors"
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata={"nbkit": f"tiny random ESRGAN {scale}x, seed {seed}"})
    return path
