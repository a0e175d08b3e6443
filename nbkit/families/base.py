"""What a model family is and does: the one interface every other layer asks.

A model family (SD 1.x, SDXL, FLUX.1, ...) is one module in `nbkit.families` holding a `Family`
subclass: its facts (sizes, prediction type, text encoders, model-spec names, training defaults) and its
behaviour (telling its folders apart, building its tiny model, what generation and training do
differently for it). Code outside `nbkit.families` asks the family object and never tests a family's
name, so a new family is one new module plus its registry entries.

This module imports neither torch nor diffusers: the behaviour methods import them when called.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from nbkit.errors import NbkitError
from nbkit.families._generation import GenerationDefaults, HubControlNet, config_dict
from nbkit.families._training import NoisyLatents
from nbkit.families.facts import (
    RESOLUTION_STEP,
    DetectedFamily,
    FolderConfigs,
    FusedModule,
    HubModel,
    MemoryOption,
    PredictionType,
    SingleFileLayout,
    Task,
)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

FIGURES_DIR = Path(__file__).resolve().parent / "figures"
# How a family without ways of its own runs: everything on the GPU, or (generation) model CPU offload.
_DEFAULT_MEMORY_OPTIONS: dict[Task, tuple[MemoryOption, ...]] = {
    "generate": (
        MemoryOption("resident", "everything on the GPU"),
        MemoryOption("offload", "each component moved to the GPU only while it runs", offload=True),
    ),
    "train": (MemoryOption("resident", "the denoiser, text encoders and VAE on the GPU"),),
}


@functools.cache
def _read_figures(path: Path) -> Mapping[str, Any] | None:
    return MappingProxyType(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


class Family:
    """A model family: its facts as class attributes, its behaviour as methods.

    Subclasses set every fact below; the methods' defaults are what most families do.

    Args:
        name: the registry key (`sd1`, `sdxl`, `flux`, ...) stored in sessions and single-file metadata.
        title: the name people know it by.
        prediction_type: what its denoiser predicts, `epsilon`, `v_prediction` or `flow`.
        native_resolution: the square size it was trained at, in pixels.
        allowed_resolutions: the sizes that give sensible images without forcing.
        pipeline_class: the diffusers pipeline class that runs it (txt2img).
        text_encoder_count: 1, or 2 for SDXL and FLUX.1.
        cross_attention_dim: the real models' text-embedding width the denoiser attends to.
        modelspec_architecture: the SAI model spec's `modelspec.architecture` (LoRAs append `/lora`).
        modelspec_implementation: the SAI model spec's `modelspec.implementation`: the code base whose
            names the original (single-file) layout uses.
        resolution_step: image sizes must be multiples of this (64 for the UNets; 16 for FLUX.1, whose
            VAE downsamples by 8 and whose transformer packs 2x2 latent patches).
        needs_bf16: the family only runs in bfloat16 or float32 on a GPU (its activations overflow
            float16), so a GPU without bf16 (a T4) cannot run it at a useful speed.
        denoiser: the diffusers component that denoises, `unet` or `transformer`.
        training_defaults: settings a session of this family starts from instead of the SD-era
            defaults of `nbkit.session.settings.TrainConfig`.
        tiny_native_resolution: the size nbkit's tiny random-weight model of this family is built at.
        buckets_by_default: a session trains in aspect-ratio buckets unless told otherwise
            (`TrainConfig.buckets`); the SD 1.x/2.x families train squares, as fast-DreamBooth did.
        hub_models: the family's models on the hub, in the order menus list them.
        detection_priority: families are asked to claim a folder in descending order of this; the most
            general family (SD 1.x, any UNet that is nothing else) asks last.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    prediction_type: ClassVar[PredictionType]
    native_resolution: ClassVar[int]
    allowed_resolutions: ClassVar[range]
    pipeline_class: ClassVar[str]
    text_encoder_count: ClassVar[int]
    cross_attention_dim: ClassVar[int]
    modelspec_architecture: ClassVar[str]
    modelspec_implementation: ClassVar[str]
    resolution_step: ClassVar[int] = RESOLUTION_STEP
    needs_bf16: ClassVar[bool] = False
    denoiser: ClassVar[Literal["unet", "transformer"]] = "unet"
    training_defaults: ClassVar[Mapping[str, Any]] = {}
    tiny_native_resolution: ClassVar[int] = 64
    buckets_by_default: ClassVar[bool] = True
    hub_models: ClassVar[tuple[HubModel, ...]] = ()
    detection_priority: ClassVar[int] = 0

    @property
    def smallest_useful_resolution(self) -> int:
        """Below this size the model forgets what it knows; memory advice never goes lower."""
        return self.allowed_resolutions[0]

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.title}>"

    # -- telling a folder's family ----------------------------------------------------------------

    def detect(self, configs: FolderConfigs) -> DetectedFamily | None:
        """This family's reading of a diffusers folder's configs, or None when it is not this family.

        Args:
            configs: the folder's configs.
        """
        raise NotImplementedError

    # -- models: the tiny model, memory figures ---------------------------------------------------

    # The real VAE's latent settings (diffusers `AutoencoderKL` keywords), which the tiny VAE copies.
    vae_latent: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"latent_channels": 4, "scaling_factor": 0.18215, "force_upcast": False}
    )
    # The pipeline's CLIP tokenizer folders (its others, such as FLUX.1's T5, are not CLIP's).
    clip_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # 8-bit and 4-bit weights (bitsandbytes, torchao) are offered for it: its models are too large for
    # some GPUs otherwise.
    quantizable: ClassVar[bool] = False

    def make_tiny_pipeline(self) -> DiffusionPipeline:
        """Assemble this family's tiny random-weight pipeline in fp32 on CPU; the caller seeds torch."""
        raise NotImplementedError

    def build_tiny_pipeline(self, *, seed: int = 0) -> DiffusionPipeline:
        """Build this family's tiny random-weight pipeline in memory.

        The same family and `seed` give bit-identical weights; the global torch RNG is left as it was.

        Args:
            seed: seed for the weight initialisation.
        """
        from nbkit.families._tiny import seeded

        return seeded(seed, self.make_tiny_pipeline)

    def build_tiny(
        self, out_dir: str | os.PathLike, *, seed: int = 0, safe_serialization: bool = True
    ) -> Path:
        """Build this family's tiny random-weight model (deterministic, offline) as a diffusers folder.

        Args:
            out_dir: the folder, replaced atomically: new, empty or an earlier saved pipeline.
            seed: seed for the weight initialisation.
            safe_serialization: save weights as .safetensors (True) or pickled .bin (False, the legacy
                format some old repositories still ship), for every component.
        """
        from nbkit.families._tiny import check_replaceable, save_pipeline

        check_replaceable(Path(out_dir), "model_index.json")  # before the build, which takes a while
        pipeline = self.build_tiny_pipeline(seed=seed)
        return save_pipeline(
            pipeline, out_dir, clip_tokenizers=self.clip_tokenizers, safe_serialization=safe_serialization
        )

    def build_tiny_controlnet(self, *, seed: int = 0) -> Any:
        """A tiny ControlNet for this family's tiny model, whose control maps visibly change the image.

        Args:
            seed: seed for the tiny model it copies (the ControlNet's own weights use `seed + 1`).

        Raises:
            NbkitError: when the family has no ControlNet.
        """
        raise NbkitError(f"nbkit has no ControlNet for {self.title}", fix="use an SD family model")

    def latent_normalizer(self, vae: Any) -> Callable[[Any], Any]:
        """How VAE latents become the denoiser's training input: shifted and scaled by the VAE config's
        `shift_factor` and `scaling_factor`, as the pipelines do before denoising.

        Args:
            vae: the pipeline's VAE (its settings are read now: it may leave the GPU later).
        """
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return lambda latents: (latents - shift) * scale

    def memory_options(self, task: Task) -> tuple[MemoryOption, ...]:
        """The ways of running this family's models for `task`, largest (fastest) first (their peaks
        are computed by the planner, `nbkit.models.memory`, from `memory_figures`).

        Args:
            task: `generate` or `train`.
        """
        return _DEFAULT_MEMORY_OPTIONS[task]

    def memory_figures(self) -> Mapping[str, Any] | None:
        """The GPU memory traced for this family's real-width model (`python -m nbkit.realsize.figures`),
        kept in `nbkit/families/figures/<name>.json`; None when nbkit has none for it."""
        return _read_figures(FIGURES_DIR / f"{self.name}.json")

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    # The original single-file layout of its full checkpoints, or None when it has none nbkit converts
    # (a transformer family's single file holds the transformer alone: `transformer_layout`).
    single_file: ClassVar[SingleFileLayout | None] = None
    # The original (LDM) config A1111 must find beside a single file of the family, as `<file stem>.yaml`,
    # when the file's weights do not tell it (shipped in `nbkit/configs/<family>/`).
    original_config: ClassVar[str | None] = None
    # When a file could be this family or another with the same weights, the `--family` choice's hint.
    choice_hint: ClassVar[str] = ""
    # The `ss_network_module` its LoRA's A1111/ComfyUI file names (kohya's module that trains such a LoRA).
    lora_network_module: ClassVar[str] = "networks.lora"

    def transformer_layout(self, config: Mapping[str, Any]) -> list[FusedModule] | None:
        """The original (single-file) layout of this family's transformer, module by module, or None when
        the family has none nbkit writes (UNet families: `single_file`) or `config` is not its transformer's.

        The transformer file (`nbkit.convert.transformer_file`) and the ComfyUI LoRA file
        (`nbkit.convert.lora_layout`) are both written from this list, and read back through it.

        Args:
            config: the diffusers transformer's config (its `_class_name` and sizes).
        """
        return None

    def transformer_architecture(self, config: Mapping[str, Any]) -> str:
        """The `modelspec.architecture` of a transformer file (a LoRA file appends `/lora`).

        Args:
            config: the diffusers transformer's config (a variant may name itself apart, as schnell does).
        """
        return self.modelspec_architecture

    def single_file_checkpoint(self, state_dict: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint to give diffusers' `from_single_file` for an original-layout state dict: the
        state dict itself, unless diffusers' converter needs help at some model sizes.

        Args:
            state_dict: the original-layout tensors (no `model.diffusion_model.` prefix); may be consumed.
            config: the transformer config.
        """
        return state_dict

    def open_clip_tokenizer(self, name: str) -> bool:
        """Whether the pipeline's tokenizer `name` is OpenCLIP's (pads with `!`), not OpenAI CLIP's.

        Args:
            name: the pipeline component (`tokenizer`, `tokenizer_2`).
        """
        return False

    def single_file_pipeline_extras(self, index: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline's constructor arguments besides its components, for one built from a single file.

        Args:
            index: the config folder's `model_index.json`.
        """
        return {}

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------

    # Facts: `trains_text_encoders` (stage 1 can train them; else they only encode each caption once),
    # `trains_full_denoiser` (stage 2 may fine-tune the whole denoiser; else a LoRA of it only),
    # `offloads_text_encoders` (on a GPU they wait on the CPU once the captions are encoded),
    # `trains_on_quantized_base` (its frozen denoiser may load in 8 or 4 bits under the LoRA, QLoRA),
    # `xformers_training` (its denoiser trains with xformers' attention where installed),
    # `lora_file_layout` (the key layout of its LoRA's A1111/ComfyUI file: `kohya`, as sd-scripts
    # writes it from the diffusers modules, or `original`, kohya's names of the fused modules of the
    # family's `transformer_layout`, which ComfyUI maps for every model: FLUX.1, Z-Image, FLUX.2),
    # `lora_oom_hint` (said after "train a LoRA" in out-of-memory advice), `training_note` (the
    # notebook's line about how it trains), `demo_training_overrides` (the tiny demo's settings).
    trains_text_encoders: ClassVar[bool] = True
    trains_full_denoiser: ClassVar[bool] = True
    offloads_text_encoders: ClassVar[bool] = False
    trains_on_quantized_base: ClassVar[bool] = False
    xformers_training: ClassVar[bool] = True
    lora_file_layout: ClassVar[Literal["kohya", "original"]] = "kohya"
    lora_oom_hint: ClassVar[str] = ""
    training_note: ClassVar[str] = ""
    demo_training_overrides: ClassVar[Mapping[str, Any]] = {}

    @property
    def text_encoder_roles(self) -> tuple[str, ...]:
        """The pipeline attributes of its text encoders, in pipeline order."""
        return ("text_encoder", "text_encoder_2")[: self.text_encoder_count]

    @property
    def tokenizer_roles(self) -> tuple[str, ...]:
        """The pipeline attributes of its tokenizers, one per text encoder."""
        return ("tokenizer", "tokenizer_2")[: self.text_encoder_count]

    @property
    def denoiser_title(self) -> str:
        """How messages name the denoiser stage 2 trains: `UNet` or `transformer`."""
        return "UNet" if self.denoiser == "unet" else "transformer"

    def check_training_settings(self, config: Any) -> None:
        """Refuse training settings this family cannot train with (raises `NbkitError`).

        Args:
            config: the run's `nbkit.session.settings.TrainConfig`.
        """

    def training_noise_scheduler(self, scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        """The scheduler that noises training latents (a fresh one: the pipeline's renders samples).

        Args:
            scheduler_config: the pipeline scheduler's config.
            prediction_type: the session's prediction type (overrides the config's).
        """
        raise NotImplementedError

    def lora_target_modules(self, role: str) -> list[str] | str:
        """peft `target_modules` of a LoRA on pipeline component `role` (a list, or a regex).

        Args:
            role: `text_encoder`, `text_encoder_2` or the denoiser's role.
        """
        raise NotImplementedError

    def kohya_lora_prefix(self, role: str) -> str:
        """The kohya key prefix of pipeline component `role` in a `kohya`-layout LoRA file.

        Args:
            role: the denoiser's role, `text_encoder` or `text_encoder_2`.
        """
        return "lora_unet" if role == self.denoiser else "lora_te"

    def encode_prompts(
        self,
        pipeline: Any,
        text_encoders: Sequence[Any],
        token_ids: Sequence[Any],
        captions: Sequence[str],
        *,
        max_sequence_length: int,
        device: Any,
    ) -> tuple[Any, Any | None]:
        """The denoiser's text conditioning: (prompt embeddings, pooled embeddings or None).

        Args:
            pipeline: the pipeline (for families that encode through its `encode_prompt`).
            text_encoders: the encoders in pipeline order; may be accelerate-wrapped (training) modules.
            token_ids: the captions' token ids, one tensor per tokenizer, on the encoders' device.
            captions: the captions themselves.
            max_sequence_length: the prompt length of families whose tokenizer has none of its own.
            device: the encoders' device.
        """
        raise NotImplementedError

    def noisy_latents(
        self, scheduler: Any, latents: Any, noise: Any, generator: Any, config: Any
    ) -> NoisyLatents:
        """Draw the batch's noise levels (with `generator`) and noise `latents` for the loss.

        Args:
            scheduler: the training noise scheduler (`training_noise_scheduler`).
            latents: the clean latents.
            noise: Gaussian noise like them.
            generator: the step's CPU generator.
            config: the run's `TrainConfig`.
        """
        raise NotImplementedError

    def denoise(
        self,
        pipeline: Any,
        denoiser: Any,
        batch: NoisyLatents,
        embeds: Any,
        pooled: Any | None,
        time_ids: Any,
        config: Any,
    ) -> Any:
        """The denoiser's training prediction for `batch`, shaped like the latents.

        Args:
            pipeline: the pipeline (its unwrapped denoiser's config, its VAE scale).
            denoiser: the denoiser to call (accelerate may have wrapped it).
            batch: the noised latents and timesteps.
            embeds: the prompt embeddings.
            pooled: the pooled embeddings, or None.
            time_ids: each image's size and crop conditioning (original size, crop corner, target size).
            config: the run's `TrainConfig`.
        """
        raise NotImplementedError

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    # image_size_multiple: generated image sides must be multiples of this (A1111's 8: the VAE's factor).
    # preview_coefficients: A1111's "Approx cheap" live preview, a linear map from each latent channel
    #     to RGB (one row per channel).
    # distilled_guidance_default: the default of a guidance-distilled model's embedded guidance scale
    #     (Forge's "Distilled CFG Scale"); None: the family has none and the UI hides the field.
    # latent_hires: the hires fix may upscale the first pass's latents (False: they are packed, so
    #     only pixel upscalers work).
    # controlnet_group: the ControlNet architecture its models take (families that share one, as SD 2.x
    #     512 and 768-v do, name the same group); None: ControlNet is not offered for it.
    # controlnet_title: the group's name in messages ("SD 1.5").
    # controlnets: the hub ControlNets of its group, in the order menus list them.
    image_size_multiple: ClassVar[int] = 8
    preview_coefficients: ClassVar[tuple[tuple[float, float, float], ...]] = ()
    distilled_guidance_default: ClassVar[float | None] = None
    latent_hires: ClassVar[bool] = True
    controlnet_group: ClassVar[str | None] = None
    controlnet_title: ClassVar[str] = ""
    controlnets: ClassVar[tuple[HubControlNet, ...]] = ()
    # session_lora_from_diffusers: the web UI loads a session's LoRA from its diffusers file (the kohya
    #     file is still what it lists and hashes), for a family whose kohya file diffusers cannot read
    #     at every model width.
    session_lora_from_diffusers: ClassVar[bool] = False
    # image_input_max_pixels: the largest image (width x height) its img2img, inpainting and hires-fix
    #     pipelines keep at its size (None: any); FLUX.2 [klein]'s shrinks a larger input to 1 megapixel.
    image_input_max_pixels: ClassVar[int | None] = None
    # textual_inversion: how an A1111 textual-inversion embedding loads into its CLIP text encoders: one
    #     (key in the embedding file, text encoder, tokenizer) per encoder; key None: the file holds one
    #     encoder's vectors (SD 1.x/2.x), while SDXL's hold `clip_l` and `clip_g`. Empty: it takes none.
    textual_inversion: ClassVar[tuple[tuple[str | None, str, str], ...]] = ()

    @property
    def flow_matching(self) -> bool:
        """Its denoiser is a rectified-flow model: it takes the flow-matching samplers and schedules."""
        return self.prediction_type == "flow"

    def owns_pipeline(self, pipeline: Any) -> bool:
        """Whether a loaded diffusers pipeline is one of this family's (read from its components' configs).

        Args:
            pipeline: a diffusers pipeline (text-to-image, or one made from it with `from_pipe`).
        """
        denoiser = getattr(pipeline, self.denoiser, None)
        configs = FolderConfigs(
            folder=Path(),
            index=config_dict(getattr(pipeline, "config", None)),
            denoiser=config_dict(denoiser),
            text_encoder=config_dict(getattr(pipeline, "text_encoder", None)),
            scheduler=config_dict(getattr(pipeline, "scheduler", None)),
            vae=config_dict(getattr(pipeline, "vae", None)),
        )
        return denoiser is not None and self.detect(configs) is not None

    def generation_dtype(self, device: Any) -> Any:
        """The weights' dtype for generating on `device`: float32 on the CPU; on a GPU float16, or
        bfloat16 for a family whose activations overflow float16 (`needs_bf16`).

        Args:
            device: a torch device or its name.
        """
        import torch

        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if self.needs_bf16 else torch.float16

    def call_arguments(
        self, pipeline: Any, *, guidance_scale: float | None, distilled_guidance: float | None, negative: bool
    ) -> tuple[dict[str, Any], float | None]:
        """The guidance arguments of a pipeline call, and the distilled guidance the infotext names.

        Args:
            pipeline: the pipeline about to be called.
            guidance_scale: A1111's "CFG scale"; None: the pipeline's default.
            distilled_guidance: the distilled guidance asked for (None: the family's default).
            negative: whether any image of the request has a negative prompt.

        Returns:
            The keyword arguments, and the distilled guidance used (None when the model has none).
        """
        return ({} if guidance_scale is None else {"guidance_scale": guidance_scale}), None

    def cfg_used(self, call_arguments: dict[str, Any], guidance_scale: float | None, pipeline: Any) -> Any:
        """The CFG scale that ran, as the infotext's `CFG scale` names it.

        Args:
            call_arguments: what `call_arguments` returned.
            guidance_scale: the CFG scale asked for (None: the pipeline's default).
            pipeline: the pipeline that ran.
        """
        return guidance_scale if guidance_scale is not None else getattr(pipeline, "guidance_scale", None)

    def needs_negative_pass(self, call_arguments: dict[str, Any]) -> bool:
        """Whether the pipeline call takes the negative prompt (False: the model runs unguided).

        Args:
            call_arguments: what `call_arguments` returned.
        """
        return True

    def preview_latents(self, pipeline: Any, latents: Any, width: int, height: int) -> Any:
        """A step's latents as (batch, channels, height/8, width/8) for a live preview, or None.

        Args:
            pipeline: the pipeline running.
            latents: the latents its step callback got.
            width: the image width in pixels.
            height: the image height in pixels.
        """
        return latents

    def generation_defaults(self, pipeline: Any) -> GenerationDefaults:
        """The steps, CFG scale, sampler and schedule a loaded model starts from: A1111's web UI defaults
        (20 steps, CFG 7, Euler a; a flow-matching model Euler at CFG 1, as Forge runs FLUX.1), or a
        family's models' own (`GenerationDefaults.own`).

        Args:
            pipeline: the loaded pipeline (its configs tell a model's variant, e.g. distilled or not), or
                None before one has loaded (the family's usual model).
        """
        if self.flow_matching:
            return GenerationDefaults(20, 1.0, "Euler")
        return GenerationDefaults(20, 7.0, "Euler a")

    def image_pipeline_class(self, pipeline: Any, mode: Literal["txt2img", "img2img", "inpaint"]) -> Any:
        """The diffusers pipeline class whose `from_pipe` runs `mode` on a loaded pipeline's modules:
        diffusers' `AutoPipelineForText2Image`, `AutoPipelineForImage2Image` or `AutoPipelineForInpainting`
        (which also pick the ControlNet pipelines when a `controlnet` is passed to `from_pipe`).

        Args:
            pipeline: the loaded text-to-image pipeline.
            mode: `txt2img` (the same pipeline with other components), `img2img` (with `image` and
                `strength`; also the hires fix's second pass) or `inpaint` (with `mask_image` too).

        Raises:
            NbkitError: when the family's models cannot run `mode`.
        """
        import diffusers

        return {
            "txt2img": diffusers.AutoPipelineForText2Image,
            "img2img": diffusers.AutoPipelineForImage2Image,
            "inpaint": diffusers.AutoPipelineForInpainting,
        }[mode]

    def negative_arguments(
        self, pipeline: Any, negative_prompts: list[str] | None, call_arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """The negative prompts' pipeline arguments: `negative_prompt` when the call takes the negative
        pass (`needs_negative_pass`), else none.

        Args:
            pipeline: the pipeline about to be called.
            negative_prompts: one per image of the batch, or None when none of them has one.
            call_arguments: what `call_arguments` returned.
        """
        return {"negative_prompt": negative_prompts} if self.needs_negative_pass(call_arguments) else {}

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a ControlNet's (or UNet's) config is of this family's ControlNet group.

        Args:
            config: the ControlNet's `config.json` (or a UNet config).
        """
        return False
