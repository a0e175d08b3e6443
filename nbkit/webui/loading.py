"""Loading what the generation service runs: the checkpoint, a chosen VAE, a ControlNet, and the
pipelines derived from the checkpoint for each mode.

`ModelLoading` is the part of `nbkit.webui.service.GenerationService` that holds one loaded checkpoint,
in a one-slot `nbkit.generation.cache.PipelineCache` (the class `load_session_pipeline` uses too):
the old weights are freed before new ones load, the model's family (`nbkit.families`) picks its dtype and
memory plan (`nbkit.generation.placement`), and img2img, inpainting and ControlNet pipelines are made per
request with diffusers' `from_pipe`, sharing the loaded modules.

ControlNets stay loaded between requests: those the current request uses, and up to `CONTROLNET_CACHE`
in all (the least recently used go first, before another loads). A request's units run together as one
`nbkit.webui.controlnet_stack.ControlNetStack` (`_controlnet_run`).

What a request draws on from the storage root besides the checkpoint is here too: the textual-inversion
embeddings (`nbkit.webui.embeddings`: loaded into the model when a prompt names them, kept until it is
unloaded) and the prompt styles (`nbkit.webui.styles`). `unload_checkpoint` frees the model (A1111's
unload-checkpoint); the next request, or `ensure_model` (reload-checkpoint), loads the same one again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

from nbkit.device import use_attention
from nbkit.errors import NbkitError
from nbkit.families import Family, get_family
from nbkit.generation.cache import PipelineCache
from nbkit.webui import controlnet as cn
from nbkit.webui.embeddings import EmbeddingDatabase, ti_hashes_text
from nbkit.webui.models import ModelCatalog, ModelEntry, folder_family
from nbkit.webui.requests import ControlNetUnit, GenerationRequest
from nbkit.webui.styles import StyleDatabase

EMBEDDINGS_FOLDER = "embeddings"

# Suffixes of the files a model source names; a missing path with one is a missing file, not a hub id.
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONTROLNET_CACHE = 2  # ControlNets kept loaded (more while one request uses more), as the extension's default


@dataclasses.dataclass
class ControlNetRun:
    """What a request's ControlNet units add to its run.

    Args:
        stack: the ControlNets as one pipeline component (None: no unit).
        inputs: the pipeline's ControlNet arguments (control images, scales, guidance ranges).
        infotext: the infotext's `ControlNet 0`, `ControlNet 1`, ... values.
        maps: each unit's control map.
    """

    stack: Any = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    infotext: dict[str, str] = dataclasses.field(default_factory=dict)
    maps: list[Any] = dataclasses.field(default_factory=list)


def check_model_source(source: str | os.PathLike, family: str | None = None) -> None:
    """Check that a local checkpoint file or diffusers folder will load, without loading its weights.

    `nbkit ui` runs it on `--model` and every `--extra-model` before it listens or opens a tunnel, so a
    bad file is an error at the start, not at the first generation. A single file is told by its bytes:
    a .safetensors header, or a .ckpt's zip directory and pickle opcodes, are checked
    (`nbkit.convert.checkpoint_io`), and its family is told from its keys and shapes. A folder's layout
    and configs are checked, and the header of each of its weight files. Remote sources (a URL, a hub id,
    a registry key) are left to load time.

    Args:
        source: a catalog entry's source: a path, URL, hub id or registry key.
        family: the family the entry says it is (None: told from the file).

    Raises:
        NbkitError: naming the file or folder, what is wrong and the fix.
    """
    text = os.fspath(source).strip()
    path = Path(text).expanduser()
    if not path.exists():
        looks_local = text.startswith(("/", "./", "../", "~")) or path.suffix.lower() in _FILE_SUFFIXES
        if looks_local and not re.match(r"[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
            raise NbkitError("no such file or folder", path=path.absolute(), fix="check the path")
        return
    from nbkit.models.sources import resolve_local

    resolved = resolve_local(path)
    if resolved.kind == "single_file":
        _check_single_file(resolved.path, family)
    else:
        _check_folder(resolved.path, family)


def _check_single_file(path: Path, family: str | None) -> None:
    from nbkit.convert import detect_family, resolve_family

    guess = detect_family(path)  # a .ckpt's tensors are memory-mapped, not read
    if guess.ambiguous and family is None:
        choices = " or ".join(f"--family {name}" for name in guess.candidates)
        raise NbkitError(
            f"cannot tell which model family this checkpoint is: {guess.evidence}",
            path=path,
            fix=f"convert it once to a diffusers folder, saying which it is (`nbkit convert {path} FOLDER "
            f"{choices}`), and open that folder",
        )
    resolve_family(guess, family, path)


def _check_folder(folder: Path, family: str | None) -> None:
    from nbkit.convert.checkpoint_io import check_tensor_file
    from nbkit.convert.tensor_sources import find_weight_files
    from nbkit.fsio import read_json
    from nbkit.models.loading import folder_family
    from nbkit.models.sources import required_components

    folder_family(folder, family)
    for name in required_components(read_json(folder / "model_index.json")):
        if (folder / name / "config.json").is_file():  # a model (tokenizers and schedulers have no weights)
            for weights in find_weight_files(folder / name):
                check_tensor_file(weights)


class ModelLoading:
    """The loaded checkpoint of a `GenerationService` and what is loaded with it (a mixin: the service
    sets the attributes below in its `__init__`)."""

    catalog: ModelCatalog
    device: Any
    dtype: Any
    low_vram: bool
    attention: str
    notes: list[str]
    depth_model: str
    _wanted: str | None
    _vae: tuple[str, Any] | None
    _controlnets: dict[str, Any]  # source -> loaded ControlNet, least recently used first
    _depth: cn.DepthEstimator | None
    _memory_option: Any
    _family: Family | None
    _models: PipelineCache  # `loaded`: the checkpoint's `ModelEntry`

    def _set_progress(self, **changes: Any) -> None:
        raise NotImplementedError  # the service's

    def select_model(self, key: str) -> ModelEntry:
        """Load the checkpoint `key` names (title, model name, hash, file, or a new path/URL/hub id).

        The old weights are freed before the new ones load (a T4 has room for one SDXL).
        """
        try:
            entry = self.catalog.find(key)
        except NbkitError:
            if not any(sep in key for sep in ("/", "\\", ".")):
                raise
            entry = self.catalog.add(key)
        if self.current == entry and self.pipeline is not None:
            return entry
        from nbkit.generation.placement import plan_generation_memory

        family = entry.family or folder_family(entry.source)
        # A GPU that cannot run it (a T4 for FLUX.1) is refused before the old model is dropped.
        option = plan_generation_memory(family, self.device)
        self._set_progress(job="load model", textinfo=f"Loading {entry.title}")
        self.unload()
        try:
            self._models.get(entry, lambda: self._load(entry, family, option))
        finally:
            self._set_progress(job="", textinfo="")
        return entry

    def _load(self, entry: ModelEntry, family: str | None, option: Any) -> Any:
        """Load and place `entry`; `family` and `option` are what its entry says (None: known once loaded)."""
        from nbkit.families import family_of_pipeline
        from nbkit.generation.placement import plan_generation_memory
        from nbkit.models.loading import load_pipeline

        pipeline = load_pipeline(
            entry.source,
            family=entry.family,
            torch_dtype=self._dtype_for(family),
            quantization=option.quantization if option is not None else None,
        )
        loaded = get_family(family) if family is not None else family_of_pipeline(pipeline)
        if loaded is not None and family is None:  # a single file: known once loaded, still on the CPU
            if self.dtype != self._dtype_for(loaded):
                pipeline = pipeline.to(dtype=self._dtype_for(loaded))
            option = plan_generation_memory(loaded, self.device)
            if option is not None and option.quantization is not None:
                raise NbkitError(
                    f"this GPU runs {entry.title} only with {option.quantization} weights ({option.name}), "
                    "and quantized weights load from a diffusers folder, not a single-file checkpoint",
                    path=entry.source,
                    fix="convert it to a diffusers folder (`nbkit convert FILE FOLDER --dtype bf16`) and "
                    "open that folder, or use a GPU with more memory",
                )
        pipeline.set_progress_bar_config(disable=True)
        pipeline = self._place(pipeline, option, loaded)
        self._family = loaded
        return pipeline

    @property
    def pipeline(self) -> Any:
        """The loaded checkpoint's pipeline, or None."""
        return self._models.pipeline

    @property
    def current(self) -> ModelEntry | None:
        """The loaded checkpoint, or None."""
        return self._models.loaded

    def _dtype_for(self, family: Family | str | None) -> Any:
        """The weights' dtype: float16 on a GPU (bfloat16 for FLUX.1, which overflows float16), else float32."""
        from nbkit.generation.placement import generation_dtype

        return generation_dtype(family, self.device)

    @property
    def family(self) -> str | None:
        """The registry name of the loaded checkpoint's family (None: none loaded, or not one nbkit knows)."""
        return self._family.name if self._family is not None and self.pipeline is not None else None

    @property
    def _offload(self) -> bool:
        option = self._memory_option
        planned = option is not None and (option.offload or option.quantization is not None)
        return self.device.type == "cuda" and (self.low_vram or planned)

    def _place(self, pipeline: Any, option: Any = None, family: Family | None = None) -> Any:
        """Move a loaded pipeline where it runs; `option` is its family's memory plan (None: none)."""
        self._memory_option = option
        if option is not None:
            from nbkit.generation.placement import apply_memory_option, as_family

            if option.offload or option.quantization:
                from nbkit.models.quantization import describe_loaded

                weights = describe_loaded(pipeline)
                self.notes.append(
                    f"{as_family(family).title} runs as {option.name}: {option.description}"
                    + (f"; {weights}" if weights else "")
                )
            # Low VRAM offloads a plan that fits whole too: placement and `_offload` (which derived
            # pipelines follow) must agree.
            return apply_memory_option(pipeline, option, self.device, offload=self._offload)
        if self.device.type == "cuda":
            _, why_not = use_attention(
                pipeline, self.device, self.attention
            )  # SDPA stays when xformers fails
            if why_not:
                self.notes.append(why_not)
        if self._offload:
            pipeline.enable_attention_slicing()
            pipeline.enable_vae_tiling()
            pipeline.enable_model_cpu_offload(device=self.device)
            return pipeline
        return pipeline.to(self.device)

    def unload(self) -> None:
        """Free the loaded weights (CUDA memory included), with the VAE and ControlNet loaded for them."""
        self._memory_option = self._family = None
        self._vae = None
        self._controlnets = {}
        self._depth = None
        self.embeddings.forget()  # their tokens go with the text encoders
        self._models.release()  # after the VAE and ControlNet are dropped: it frees their memory too

    def unload_checkpoint(self) -> None:
        """Free the loaded checkpoint's memory (A1111's unload-checkpoint); the next request, or
        `ensure_model` (A1111's reload-checkpoint), loads the same checkpoint again."""
        if self.current is not None:
            self._wanted = self.current.title
        self.unload()

    # --- what requests draw on from the storage root: embeddings and styles ----------------------------

    @functools.cached_property
    def embeddings(self) -> EmbeddingDatabase:
        """The textual-inversion embeddings of `<storage root>/embeddings/`."""
        root = self.catalog.storage_root
        return EmbeddingDatabase(root / EMBEDDINGS_FOLDER if root is not None else None)

    @functools.cached_property
    def styles(self) -> StyleDatabase:
        """The prompt styles of `<storage root>/styles.csv` (and `styles*.csv`)."""
        return StyleDatabase(self.catalog.storage_root)

    def embedding_listing(self) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's GET /embeddings for the loaded model: `loaded` (they fit it) and `skipped`."""
        from nbkit.generation.placement import as_family

        pipeline = self.pipeline
        return self.embeddings.listing(pipeline, as_family(self._family) if pipeline is not None else None)

    def _with_styles(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its styles applied to the prompts, as A1111 does before anything else."""
        if not request.styles:
            return request
        prompt, negative = self.styles.apply(request.prompt, request.negative_prompt, request.styles)
        return dataclasses.replace(request, prompt=prompt, negative_prompt=negative)

    def _with_embeddings(
        self, prompt: str, negative_prompt: str, infotext: dict[str, Any]
    ) -> tuple[str, str]:
        """The prompts as the model sees them, with the embeddings they name loaded and put in as their
        tokens; `infotext` gets A1111's `TI hashes` of those used."""
        from nbkit.generation.placement import as_family

        embedded = self.embeddings.apply(self.pipeline, as_family(self._family), prompt, negative_prompt)
        if embedded.loaded and self._offload:
            # diffusers puts model offload back on the device the text encoder sat on, the CPU.
            self.pipeline.enable_model_cpu_offload(device=self.device)
        hashes = ti_hashes_text(embedded.used)
        if hashes:
            infotext["TI hashes"] = hashes
        return embedded.prompt, embedded.negative_prompt

    def ensure_model(self) -> ModelEntry:
        """The loaded checkpoint, loading the wanted (or first) one when none is."""
        if self.pipeline is None:
            if self._wanted is None and not self.catalog.checkpoints:
                raise NbkitError("there is no checkpoint to load", fix="train a model or add one to models/")
            self.select_model(self._wanted or self.catalog.checkpoints[0].title)
        return self.current

    def _load_vae(self, source: str) -> Any:
        """The VAE at `source` (cached for the next request): a VAE folder, a pipeline folder with
        `vae/`, or a single file (diffusers or original layout, read with the model's VAE config).

        It loads in the dtype of the model's own VAE: FLUX.1 runs in bfloat16 on a GPU, not `self.dtype`,
        and its latents reach the VAE in the pipeline's dtype."""
        if self._vae is not None and self._vae[0] == source:
            return self._vae[1]
        from diffusers import AutoencoderKL

        path = Path(source).expanduser()
        self._vae = None
        dtype = self.pipeline.vae.dtype
        try:
            if path.is_dir():
                subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
                vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
            elif path.is_file():
                import tempfile

                with tempfile.TemporaryDirectory() as config:
                    self.pipeline.vae.save_config(config)
                    vae = AutoencoderKL.from_single_file(
                        str(path), config=config, torch_dtype=dtype, local_files_only=True
                    )
            else:
                raise NbkitError("no such VAE file or folder", path=path, fix="check the path")
        except (OSError, ValueError, KeyError) as error:
            raise NbkitError(
                f"could not load this VAE: {error}",
                path=path,
                fix="give a diffusers VAE folder or a VAE file",
            ) from error
        if vae.config.latent_channels != self.pipeline.vae.config.latent_channels:
            raise NbkitError(
                f"this VAE has {vae.config.latent_channels} latent channels, the model "
                f"{self.pipeline.vae.config.latent_channels}",
                path=path,
                fix="pick a VAE made for this model's family",
            )
        vae = vae if self._offload else vae.to(self.device)
        self._vae = (source, vae)
        return vae

    def _load_controlnets(self, units: list[ControlNetUnit]) -> list[tuple[cn.ControlNetSource, Any]]:
        """Each unit's ControlNet, all checked against the loaded model before any loads."""
        group = self._family.controlnet_group if self._family is not None else None
        root = self.catalog.storage_root
        sources = [cn.find_controlnet(unit.model, storage_root=root, group=group) for unit in units]
        for source in sources:
            cn.check_compatible(
                source, self.pipeline.unet.config, self.current.family if self.current else None
            )
        needed = {source.source for source in sources}
        room = max(CONTROLNET_CACHE, len(needed))
        for source in sources:
            if source.source in self._controlnets:
                self._controlnets[source.source] = self._controlnets.pop(source.source)  # most recent last
                continue
            for old in [key for key in self._controlnets if key not in needed]:
                if len(self._controlnets) < room:
                    break
                del self._controlnets[old]  # freed before the next one loads
            model = cn.load_controlnet(source, torch_dtype=self.dtype)
            self._controlnets[source.source] = model if self._offload else model.to(self.device)
        return [(source, self._controlnets[source.source]) for source in sources]

    def _control_map(self, unit: ControlNetUnit, width: int, height: int, init: Any, resize_mode: int) -> Any:
        """A unit's control map at the generation size; a unit without an image uses `init` (img2img's)."""
        picture, mode = (unit.image, unit.resize_mode) if unit.image is not None else (init, resize_mode)
        picture = cn.unit_picture(picture, unit.mask)
        depth = self._depth_estimator() if unit.preprocessor.strip().lower() == "depth" else None
        return cn.preprocess(
            picture,
            unit.preprocessor,
            width,
            height,
            resize_mode=mode,
            depth=depth,
            low_threshold=unit.low_threshold,
            high_threshold=unit.high_threshold,
            resolution=None if unit.pixel_perfect else unit.processor_res,
        )

    def _controlnet_run(self, request: Any) -> ControlNetRun:
        """The ControlNets, control maps, pipeline arguments and infotext of `request`'s units.

        Args:
            request: a `nbkit.webui.requests.GenerationRequest`.
        """
        units = request.controlnet
        if not units:
            return ControlNetRun()
        from nbkit.webui.controlnet_stack import ControlNetStack

        loaded = self._load_controlnets(units)
        maps = [
            self._control_map(unit, request.width, request.height, request.init_image, request.resize_mode)
            for unit in units
        ]
        stack = ControlNetStack([model for _, model in loaded], [unit.control_mode for unit in units])
        inputs = {
            "image" if request.mode == "txt2img" else "control_image": maps,
            "controlnet_conditioning_scale": [float(unit.weight) for unit in units],
            "control_guidance_start": [float(unit.guidance_start) for unit in units],
            "control_guidance_end": [float(unit.guidance_end) for unit in units],
        }
        infotext = {
            f"ControlNet {index}": cn.unit_infotext(unit, source.name)
            for index, (unit, (source, _)) in enumerate(zip(units, loaded, strict=True))
        }
        return ControlNetRun(stack, inputs, infotext, maps)

    def detect_map(
        self,
        image: Any,
        module: cn.Module,
        *,
        resolution: int | None = None,
        threshold_a: float | None = None,
        threshold_b: float | None = None,
    ) -> Any:
        """The control map a module makes of `image` (the extension's `/controlnet/detect`), with its
        sliders' defaults for values out of range. Not thread-safe for depth: call it through the queue."""
        depth = self._depth_estimator() if module.preprocessor == "depth" else None
        low, high = sorted(
            int(slider.pick(value)) if slider else 0
            for slider, value in ((module.threshold_a, threshold_a), (module.threshold_b, threshold_b))
        )
        return cn.detect(
            image,
            module.preprocessor,
            resolution=int(module.resolution.pick(resolution)) if module.resolution else None,
            depth=depth,
            low_threshold=low,
            high_threshold=high,
        )

    def _depth_estimator(self) -> cn.DepthEstimator:
        if self._depth is None or self._depth.name != self.depth_model:
            self._depth = cn.DepthEstimator(self.depth_model, device=self.device)
        return self._depth

    def _derive(self, mode: str, **components: Any) -> Any:
        """A `mode` pipeline on the loaded pipeline's modules (plus a VAE or ControlNet override), of the
        class the model's family runs `mode` with (`Family.image_pipeline_class`: diffusers' AutoPipelines,
        or FLUX.2 [klein]'s inpainting pipeline for img2img)."""
        from nbkit.generation.placement import as_family

        components = {name: value for name, value in components.items() if value is not None}
        if mode == "txt2img" and not components and not self._offload:
            return self.pipeline
        family = as_family(self._family)
        pipeline = family.image_pipeline_class(self.pipeline, mode).from_pipe(self.pipeline, **components)
        pipeline.set_progress_bar_config(disable=True)
        if hasattr(components.get("controlnet"), "guided_by"):
            components["controlnet"].guided_by(pipeline)  # a ControlNetStack reads CFG from its pipeline
        if self._offload:
            # Offload hooks belong to one pipeline; the derived one (maybe with a ControlNet) gets its own.
            pipeline.enable_model_cpu_offload(device=self.device)
        return pipeline
