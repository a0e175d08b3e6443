"""The peak GPU memory of one training step and of one generation, computed on CPU without a GPU.

The real-width model runs for real, op by op, under PyTorch's `FakeTensorMode`: every tensor has its
true shape and dtype but no storage, so a 12-billion-parameter step costs seconds of CPU and no RAM.
`torch.distributed._tools.mem_tracker.MemTracker` (a dispatch mode) sees every tensor each op
creates, when its storage dies, and which kind it is (parameter, gradient, optimizer state,
activation, backward temporary), and keeps the snapshot at the peak.

What the trace is and is not:

- The step is the one nbkit's trainer runs (as diffusers' DreamBooth examples, latents cached before
  training): text encoding (no grad unless the text encoders train, stage 1), the denoiser's
  forward under autocast, an MSE loss, backward, the optimizer step, `zero_grad(set_to_none=True)`. The optimizer's states exist before the step (its
  steady state from the second step on), so they add to the forward and backward peak.
- Mixed precision (`fp16`, `bf16`) keeps fp32 master weights for what trains (the full denoiser, or
  the LoRA weights over a frozen half-precision base, as `cast_training_params` does) and frozen
  models in half precision; `bf16-pure` keeps everything, optimizer states included, in bfloat16.
- A CPU-only PyTorch cannot create fake CUDA tensors (autograd asks the CUDA device guard), so the
  trace runs on fake CPU tensors with CPU autocast. CPU autocast leaves norms and softmax in half
  precision where CUDA's autocast runs them in float32; `_cuda_autocast_policy` upcasts them as CUDA
  does. Attention goes through `scaled_dot_product_attention`, whose fused kernels (flash on CPU,
  memory-efficient on a T4) keep only the output and its log-sum-exp, never the score matrix.
- Denoisers other than the UNets' and FLUX.1's (Z-Image, FLUX.2 [klein]) run through their family
  adapter's own training code (`latent_normalizer`, `denoise`), as nbkit's trainer runs them, from
  cached caption features of `TEXT_TOKENS` tokens (their families encode each caption once and
  offload the text encoder): the prompt length their pipelines pad to, so a longer caption is not
  assumed away. Their text phase runs the Qwen3 encoder as the pipelines do (`output_hidden_states`).
- 8-bit Adam is not traced through bitsandbytes (it needs CUDA); `Adam8bitStates` allocates exactly
  the states bitsandbytes 0.50's `Optimizer2State.init_state` does: two uint8 tensors per parameter
  of at least 4096 elements plus one float32 absmax per 256-element block for each, float32 states
  for smaller ones; its fused kernel updates in place, so it needs no temporaries.
- With `cuda_rounding` each allocation is rounded up to the CUDA caching allocator's 512-byte
  granule. Allocator fragmentation, the CUDA context (~0.3-0.5 GiB) and cuBLAS/cuDNN workspaces are
  not in the figure: `nbkit.models.memory_figures.OVERHEAD_FACTOR` is the stated correction the planner
  applies on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nbkit.realsize.random_models import build_component, model_components, real_config_folder

if TYPE_CHECKING:
    import torch

    from nbkit.families.base import Family

Precision = Literal["fp16", "bf16", "bf16-pure", "fp32"]
Optimizer = Literal["adamw", "adamw8bit"]

GiB = 1024**3
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' DreamBooth LoRA examples
TEXT_TOKENS = 512  # the prompt length T5 and the Qwen3 encoders pad to (the pipelines' max_sequence_length)
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "inputs",
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training step's settings.

    Args:
        resolution: square image size in pixels.
        batch: images per step.
        precision: `fp16`/`bf16` mixed precision (fp32 master weights), `bf16-pure` or `fp32`.
        optimizer: `adamw` (torch's fused AdamW) or `adamw8bit` (bitsandbytes' states, modelled).
        gradient_checkpointing: recompute the denoiser's (and a trained text encoder's) activations.
        lora_rank: a peft LoRA of this rank on the denoiser's attention; 0 trains the full denoiser.
        lora_targets: the peft target modules (default: diffusers' attention projections).
        stage: nbkit's stage 1 (`text_encoder`: the CLIP text encoders train, the denoiser is frozen
            in half precision but still backpropagated through) or stage 2 (`denoiser`).
        text_cached: the prompts are encoded once before training and their encoders wait on the
            CPU (FLUX.1's T5-XXL, the Qwen3 encoders): the step reads the embeddings. A denoiser its
            family adapter runs always reads cached features.
        vae_upcast: the VAE runs in float32 under fp16 (SDXL's VAE overflows in float16).
    """

    resolution: int
    batch: int = 1
    precision: Precision = "fp16"
    optimizer: Optimizer = "adamw"
    gradient_checkpointing: bool = True
    lora_rank: int = 0
    lora_targets: tuple[str, ...] | str = DEFAULT_LORA_TARGETS
    stage: Literal["denoiser", "text_encoder"] = "denoiser"
    text_cached: bool = False
    vae_upcast: bool = False


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """One generation's settings: text encoding, one denoising step, VAE decode; everything resident.

    Args:
        resolution: square image size in pixels.
        batch: images at once.
        precision: the weights' dtype (`fp16`, `bf16`, `fp32`).
        vae_upcast: the VAE decodes in float32 (SDXL's pipeline does under fp16).
    """

    resolution: int
    batch: int = 1
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    vae_upcast: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryFigure:
    """A traced peak and what it was made of at that moment (bytes)."""

    peak_bytes: int
    breakdown: dict[str, int]
    seconds: float

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.breakdown.items() if value)
        return f"{self.peak_gib:.2f} GiB ({parts})"


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16-pure": torch.bfloat16}.get(
        precision, torch.float32
    )


@contextlib.contextmanager
def _cuda_autocast_policy() -> Iterator[None]:
    """Run norms and softmax in float32 while CPU autocast is on, as CUDA's autocast does.

    The functions themselves are patched (not a `TorchFunctionMode`): gradient checkpointing
    recomputes in the autograd engine, where modes entered by the caller are not active.
    """
    import torch
    import torch.nn.functional as F

    def upcasting(original):
        def run(input, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and input.dtype in (torch.float16, torch.bfloat16):
                with torch.autocast("cpu", enabled=False):
                    args = [
                        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                        for a in args
                    ]
                    return original(input.float(), *args, **kwargs)
            return original(input, *args, **kwargs)

        return run

    names = ("group_norm", "layer_norm", "softmax")
    originals = {name: getattr(F, name) for name in names}
    try:
        for name, original in originals.items():
            setattr(F, name, upcasting(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


class Adam8bitStates:
    """bitsandbytes' 8-bit AdamW states as a torch optimizer (module docstring); the update is a no-op."""

    def __new__(cls, params, min_8bit_size: int = 4096, blocksize: int = 256):
        import torch

        class Adam8bit(torch.optim.Optimizer):
            def __init__(self, params):
                super().__init__(params, {})

            @torch.no_grad()
            def step(self, closure=None):
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is None or self.state[p]:
                            continue
                        state = self.state[p]
                        if p.numel() < min_8bit_size:
                            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                            continue
                        blocks = -(-p.numel() // blocksize)
                        for index in (1, 2):
                            state[f"state{index}"] = torch.zeros_like(p, dtype=torch.uint8)
                            state[f"absmax{index}"] = torch.zeros(
                                blocks, dtype=torch.float32, device=p.device
                            )

        return Adam8bit(params)


def fake_models(family: str, fake_mode, folder: Path | None = None) -> dict[str, torch.nn.Module]:
    """Every model component of `family` at full width, built inside `fake_mode` (no storage).

    Args:
        family: a family name with shipped real configs.
        fake_mode: the `FakeTensorMode` to build in.
        folder: another config folder of the family (FLUX.2 [klein] 9B) instead of its shipped one.
    """
    folder = folder or real_config_folder(family)
    with fake_mode:
        return {
            name: build_component(folder, name)
            for name, (_, class_name) in model_components(folder).items()
            if "Tokenizer" not in class_name and "Scheduler" not in class_name
        }


def _denoiser(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    return models["transformer"] if "transformer" in models else models["unet"]


def _text_encoders(models: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    return [models[name] for name in sorted(models) if name.startswith("text_encoder")]


def _is_clip(module: torch.nn.Module) -> bool:
    return type(module).__name__.startswith("CLIPText")


def _is_qwen(module: torch.nn.Module) -> bool:
    return str(getattr(module.config, "model_type", "")).startswith("qwen")


def _encode(encoders: list[torch.nn.Module], batch: int) -> list:
    import torch

    outputs = []
    for encoder in encoders:
        device = next(encoder.parameters()).device
        length = encoder.config.max_position_embeddings if _is_clip(encoder) else TEXT_TOKENS
        ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        if _is_qwen(encoder):  # the pipelines read hidden layers of the chat model, with its padding mask
            mask = torch.ones_like(ids)
            outputs.append(
                encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            )
            continue
        outputs.append(encoder(ids, output_hidden_states=_is_clip(encoder)))
    return outputs


def _runs_through_adapter(denoiser: torch.nn.Module) -> bool:
    """Whether `denoiser` is conditioned by its family adapter's code (not the UNets' or FLUX.1's)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    return not isinstance(denoiser, (UNet2DConditionModel, FluxTransformer2DModel))


def _cached_conditioning(denoiser: torch.nn.Module, batch: int, dtype: torch.dtype) -> tuple:
    """The caption features an adapter-run denoiser reads, as its family caches them: (embeds, pooled).

    Z-Image's transformer (`cap_feat_dim`) takes each caption's features unpadded, picked by the token
    mask its family caches as `pooled`; a boolean mask picks a data-dependent length, which fake tensors
    cannot know, so the trace passes what the full-length caption's all-true mask picks: every row
    (`slice(None)`). FLUX.2's (`joint_attention_dim`) takes the padded features and no pooled ones.
    """
    import torch

    config = denoiser.config
    width = config.cap_feat_dim if "cap_feat_dim" in config else config.joint_attention_dim
    embeds = torch.zeros(batch, TEXT_TOKENS, width, dtype=dtype)
    pooled = [slice(None)] * batch if "cap_feat_dim" in config else None
    return embeds, pooled


def _adapter_denoise(
    family: Family, denoiser: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor, pooled
) -> torch.Tensor:
    """One call of `family`'s training `denoise` on (already normalised) `latents` at mid-schedule.

    The adapters of these families read neither the pipeline nor the run's settings.
    """
    import torch

    from nbkit.families._training import NoisyLatents

    timesteps = torch.full((latents.shape[0],), 500.0)  # flow matching: 1000 * sigma, on the CPU
    batch = NoisyLatents(latents, timesteps, latents, None)
    return family.denoise(None, denoiser, batch, embeds, pooled, None, None)


def _denoise(denoiser: torch.nn.Module, latents: torch.Tensor, texts: list, cfg: bool) -> torch.Tensor:
    """One denoiser call on `latents`, conditioned as its pipeline conditions it."""
    import torch
    from diffusers import UNet2DConditionModel

    batch = latents.shape[0]
    if isinstance(denoiser, UNet2DConditionModel):
        hidden = [out.hidden_states[-2] if len(texts) > 1 else out.last_hidden_state for out in texts]
        context = torch.cat(hidden, dim=-1)
        added = None
        if denoiser.config.addition_embed_type == "text_time":
            added = {"text_embeds": texts[-1].text_embeds, "time_ids": latents.new_zeros(batch, 6)}
        if cfg:
            latents, context = torch.cat([latents] * 2), torch.cat([context] * 2)
            added = added and {key: torch.cat([value] * 2) for key, value in added.items()}
        timestep = torch.full((latents.shape[0],), 500, device=latents.device)
        return denoiser(latents, timestep, context, added_cond_kwargs=added, return_dict=False)[0]
    clip, t5 = texts
    _, channels, height, width = latents.shape
    packed = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
    image_ids = latents.new_zeros((height // 2) * (width // 2), 3)
    text_ids = latents.new_zeros(t5.last_hidden_state.shape[1], 3)
    timestep = latents.new_full((batch,), 0.5)
    guidance = latents.new_full((batch,), 3.5) if denoiser.config.guidance_embeds else None
    return denoiser(
        hidden_states=packed,
        timestep=timestep,
        guidance=guidance,
        pooled_projections=clip.pooler_output,
        encoder_hidden_states=t5.last_hidden_state,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # `Module.to` swaps fake parameters (which fails on their weak references); setting `.data` works
    # on fake and real tensors alike.
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[key] = buffer.to(dtype)


@contextlib.contextmanager
def _fake_module_to() -> Iterator[None]:
    """Let `Module.to` convert fake parameters (peft moves its new layers with it).

    `Module._apply` swaps fake parameters with `torch.utils.swap_tensors`, which refuses tensors with
    weak references, and every fake tensor has one (its mode's); `.data =` does the same job.
    """
    import torch.utils
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor):
            t1.data = t2.data
        else:
            original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _add_lora(model: torch.nn.Module, rank: int, targets) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    with _fake_module_to():
        model.add_adapter(config)


def prepare_training(
    models: dict[str, torch.nn.Module], settings: TrainSettings, family: Family | None = None
) -> Callable[[], None]:
    """Cast, adapt and wire `models` as diffusers' DreamBooth scripts do; return one training step.

    The optimizer's states are created here (a step on zero gradients), so the step that is returned
    is a steady-state step.

    Args:
        models: the pipeline's model components by name (fake or real tensors).
        settings: the step's settings.
        family: the models' family; needed for a denoiser its adapter runs (module docstring), which
            always reads cached caption features.
    """
    import torch

    weight_dtype = _dtype(settings.precision)
    mixed = settings.precision in ("fp16", "bf16")
    master = torch.float32 if mixed else weight_dtype
    denoiser = _denoiser(models)
    trained_encoders = [
        te for te in _text_encoders(models) if settings.stage == "text_encoder" and _is_clip(te)
    ]
    trained = trained_encoders or [denoiser]
    for name, model in models.items():
        model.requires_grad_(False)
        full = model in trained and not settings.lora_rank
        upcast_vae = name == "vae" and settings.vae_upcast and settings.precision == "fp16"
        _cast(model, master if full or upcast_vae else weight_dtype)
    for model in trained:
        if settings.lora_rank:
            targets = (
                settings.lora_targets if model is denoiser else ["q_proj", "k_proj", "v_proj", "out_proj"]
            )
            _add_lora(model, settings.lora_rank, list(targets) if isinstance(targets, tuple) else targets)
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(master)
        else:
            model.requires_grad_(True)
        if settings.gradient_checkpointing and model is not denoiser:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if settings.gradient_checkpointing:  # as `nbkit.train.components.enable_memory_savers`: in both stages
        denoiser.enable_gradient_checkpointing()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw8bit":
        optimizer = Adam8bitStates(params)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for parameter in params:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    vae = models["vae"]
    autocast = torch.autocast("cpu", dtype=weight_dtype, enabled=mixed)

    size = settings.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    if _runs_through_adapter(denoiser):
        return _adapter_training_step(family, denoiser, vae, settings, size, optimizer, autocast)
    cached = None
    if settings.text_cached:
        with torch.no_grad(), autocast:
            cached = _encode(_text_encoders(models), settings.batch)

    def step() -> None:
        # nbkit encodes every photo once before training (`LatentCache`): the step reads latents.
        latents = torch.randn(
            settings.batch,
            vae.config.latent_channels,
            size,
            size,
            dtype=torch.float32 if mixed else weight_dtype,
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast)
            if not trained_encoders:
                stack.enter_context(torch.no_grad())
            texts = cached if cached is not None else _encode(_text_encoders(models), settings.batch)
        noise = torch.randn_like(latents)
        with autocast:
            prediction = _denoise(denoiser, latents + noise, texts, cfg=False)
        target = torch.randn_like(prediction)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        del prediction, texts, latents, noise, target
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # its states are alive through the step: `track_peak` counts them
    return step


def _adapter_training_step(family, denoiser, vae, settings: TrainSettings, size: int, optimizer, autocast):
    """`prepare_training`'s step for a denoiser its family adapter runs: the trainer's cached latents
    (normalised by the family) and cached caption features, the adapter's `denoise`, the MSE loss."""
    import torch

    if family is None:
        raise ValueError(f"{type(denoiser).__name__} is traced through its family adapter: pass `family`")
    normalize = family.latent_normalizer(vae)
    mixed = settings.precision in ("fp16", "bf16")
    embeds, pooled = _cached_conditioning(denoiser, settings.batch, _dtype(settings.precision))

    def step() -> None:
        shape = (settings.batch, vae.config.latent_channels, size, size)
        latents = normalize(torch.randn(shape, dtype=torch.float32 if mixed else _dtype(settings.precision)))
        noise = torch.randn_like(latents)
        with autocast:
            prediction = _adapter_denoise(family, denoiser, latents + noise, embeds, pooled)
        target = torch.randn_like(prediction)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        del prediction, latents, noise, target
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer
    return step


def prepare_generation(
    models: dict[str, torch.nn.Module], settings: GenerateSettings, family: Family | None = None
) -> Callable[[], None]:
    """Cast `models` for inference; return one generation (text, one denoising step, VAE decode).

    Args:
        models: the pipeline's model components by name (fake or real tensors).
        settings: the generation's settings.
        family: the models' family; needed for a denoiser its adapter runs (module docstring).
    """
    import torch

    dtype = _dtype(settings.precision)
    for name, model in models.items():
        model.requires_grad_(False).eval()
        _cast(model, torch.float32 if name == "vae" and settings.vae_upcast else dtype)
    denoiser, vae = _denoiser(models), models["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    cfg = "unet" in models  # guidance-distilled transformers embed the guidance scale instead

    @torch.no_grad()
    def step() -> None:
        size = settings.resolution // factor
        latents = torch.randn(settings.batch, channels, size, size, dtype=dtype)
        texts = _encode(_text_encoders(models), settings.batch)
        if _runs_through_adapter(denoiser):
            del texts  # the pipeline keeps only the caption features
            prediction = _generation_denoise(family, denoiser, vae, latents)
        else:
            prediction = _denoise(denoiser, latents, texts, cfg=cfg)
            del texts
        del prediction
        vae.decode(latents.to(vae.dtype), return_dict=False)

    return step


def _generation_denoise(family, denoiser, vae, latents: torch.Tensor) -> torch.Tensor:
    """One unguided denoiser call (Z-Image-Turbo and the distilled FLUX.2 [klein] run without CFG)
    through `family`'s adapter, on its caption features and its normalised latents."""
    if family is None:
        raise ValueError(f"{type(denoiser).__name__} is traced through its family adapter: pass `family`")
    embeds, pooled = _cached_conditioning(denoiser, latents.shape[0], latents.dtype)
    return _adapter_denoise(family, denoiser, family.latent_normalizer(vae)(latents), embeds, pooled)


def generation_phases(
    models: dict[str, torch.nn.Module], settings: GenerateSettings, family: Family | None = None
) -> dict[str, tuple[tuple[str, ...], Callable[[], None]]]:
    """The phases of one generation, each with the components it needs on the GPU (model CPU offload
    keeps only those there): `text` (the text encoders), `denoise` (one denoiser call; the prompt is
    encoded again in it, by text encoders not counted as resident, or for a denoiser its adapter runs
    read as caption features) and `decode` (the VAE).

    Args:
        models: the pipeline's model components, cast as `prepare_generation` casts them.
        settings: the generation's settings.
        family: the models' family; needed for a denoiser its adapter runs (module docstring).
    """
    import torch

    dtype = _dtype(settings.precision)
    denoiser, vae = _denoiser(models), models["vae"]
    size = settings.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    encoders = _text_encoders(models)
    denoiser_name = "transformer" if "transformer" in models else "unet"

    def latents() -> torch.Tensor:
        return torch.randn(settings.batch, channels, size, size, dtype=dtype)

    @torch.no_grad()
    def text() -> None:
        _encode(encoders, settings.batch)

    @torch.no_grad()
    def denoise() -> None:
        if _runs_through_adapter(denoiser):
            _generation_denoise(family, denoiser, vae, latents())
            return
        _denoise(denoiser, latents(), _encode(encoders, settings.batch), cfg="unet" in models)

    @torch.no_grad()
    def decode() -> None:
        vae.decode(latents().to(vae.dtype), return_dict=False)

    text_names = tuple(name for name in models if name.startswith("text_encoder"))
    return {"text": (text_names, text), "denoise": ((denoiser_name,), denoise), "decode": (("vae",), decode)}


def _tracker():
    """A `MemTracker` that hooks gradients only of parameters that take them (it hooks all, and a
    frozen parameter refuses a hook)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class Tracker(MemTracker):
        def _update_peak_stats(self, peak_state):
            # Only the step's peak is wanted: MemTracker's own version also walks every tracked module
            # after every op, which makes a trace quadratic in the model's size.
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            result = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if not install_grad_hooks:
                return result
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:

                    def hook(grad):
                        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(hook),
                        param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)),
                    )
            return result

    return Tracker()


@contextlib.contextmanager
def _cuda_rounding(enabled: bool) -> Iterator[None]:
    from torch.distributed._tools import mem_tracker

    original = mem_tracker._WeakRefInfo._calculate_mem_consumed
    if enabled:
        granule = 512  # the CUDA caching allocator's minimum block (mem_tracker._PYTORCH_MIN_ALLOCATE)
        mem_tracker._WeakRefInfo._calculate_mem_consumed = lambda self: (
            -(-self.size * self.element_size // granule) * granule
        )
    try:
        yield
    finally:
        mem_tracker._WeakRefInfo._calculate_mem_consumed = original


@contextlib.contextmanager
def _unbuffered_module_hooks() -> Iterator[None]:
    """Make `ModTracker`'s backward markers fire on a module's first input gradient.

    Its "all"-mode multi-grad hook on each module's inputs holds every input's gradient until the last
    one arrives; an input shared by many modules (the UNet's `temb`, a trained text encoder's states)
    gets its gradient only at the end of backward, so each such module's input gradient stayed alive
    through the whole backward pass and the traced peak exceeded the real step's.
    """
    from torch.distributed._tools import mod_tracker

    original = mod_tracker.register_multi_grad_hook
    mod_tracker.register_multi_grad_hook = lambda tensors, fn, mode="all": original(tensors, fn, mode="any")
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = original


def track_peak(
    step: Callable[[], None],
    models: dict[str, torch.nn.Module],
    *,
    fake_mode=None,
    cuda_rounding: bool = False,
) -> MemoryFigure:
    """Run `step` once under `MemTracker` (inside `fake_mode` when given) and return its peak.

    Args:
        step: a prepared training step or generation.
        models: the models it uses; their parameters, buffers, gradients and optimizer states count.
        fake_mode: the `FakeTensorMode` the models were built in, or None for real tensors.
        cuda_rounding: round each allocation up to the CUDA allocator's 512-byte granule.
    """
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(_cuda_rounding(cuda_rounding))
        stack.enter_context(_unbuffered_module_hooks())
        tracker = _tracker()
        tracker.track_external(*models.values())
        if getattr(step, "optimizer", None) is not None:
            tracker.track_external(step.optimizer)
        for model in models.values():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    tracker.track_external(parameter.grad)
        stack.enter_context(_cuda_autocast_policy())
        with tracker:
            step()
        snapshot = tracker.get_tracker_snapshot("peak")
    device_snapshot = max(snapshot.values(), key=lambda snap: snap["Total"]) if snapshot else {"Total": 0}
    breakdown = dict.fromkeys(dict.fromkeys(CATEGORIES.values()), 0)
    for kind, value in device_snapshot.items():
        if kind != "Total":
            breakdown[CATEGORIES[str(kind.value if hasattr(kind, "value") else kind)]] += value
    return MemoryFigure(device_snapshot["Total"], breakdown, time.perf_counter() - start)


def _trace_models(family: str, folder: Path | None = None):
    """`family`'s real-width models (from `folder`, default its shipped configs) built in a new
    `FakeTensorMode`, and the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    return fake_models(family, fake_mode, folder), fake_mode


def _trace(family: str, prepare, settings) -> MemoryFigure:
    from nbkit.families import get_family

    models, fake_mode = _trace_models(family)
    with fake_mode:
        step = prepare(models, settings, get_family(family))
    if getattr(settings, "text_cached", False):  # the text encoders wait on the CPU
        models = {name: model for name, model in models.items() if not name.startswith("text_encoder")}
    return track_peak(step, models, fake_mode=fake_mode, cuda_rounding=True)


def trace_training(family: str, settings: TrainSettings) -> MemoryFigure:
    """The computed peak GPU memory of one steady-state training step of `family`'s real-width model.

    Args:
        family: a family name with shipped real configs.
        settings: the step's settings.
    """
    return _trace(family, prepare_training, settings)


def trace_generation(family: str, settings: GenerateSettings) -> MemoryFigure:
    """The computed peak GPU memory of one generation (all components resident) of `family`.

    Args:
        family: a family name with shipped real configs.
        settings: the generation's settings.
    """
    return _trace(family, prepare_generation, settings)
