"""The plain facts the family interface speaks in: what a folder's configs say, a hub model, a way of
running a model in memory, a single file's key layout. Data only; `nbkit.families.base` has the behaviour."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

# "flow": a rectified-flow model that predicts the velocity (noise - image), as FLUX.1 does.
PredictionType = Literal["epsilon", "v_prediction", "flow"]
RESOLUTION_STEP = 64  # VAE downsamples by 8, the UNet by 8 more: sizes must divide by 64
Task = Literal["generate", "train"]  # what a model is run for (memory figures differ)


class DetectedFamily(NamedTuple):
    """What a model folder's configs say it is.

    Args:
        family: a key of `nbkit.families.FAMILIES`.
        prediction_type: `epsilon` or `v_prediction` (from the scheduler); `flow` for FLUX.1.
        native_resolution: the denoiser's default image size in pixels.
    """

    family: str
    prediction_type: str
    native_resolution: int


@dataclasses.dataclass(frozen=True)
class FolderConfigs:
    """The JSON configs of a diffusers pipeline folder that tell its family (missing files are `{}`).

    Args:
        folder: the pipeline folder.
        index: `model_index.json`.
        denoiser: `unet/config.json`, or `transformer/config.json` when the folder has a transformer.
        text_encoder: `text_encoder/config.json`.
        scheduler: `scheduler/scheduler_config.json`.
        vae: `vae/config.json`.
    """

    folder: Path
    index: Mapping[str, Any]
    denoiser: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    vae: Mapping[str, Any]

    @property
    def has_transformer(self) -> bool:
        return "transformer" in self.index


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A model of the family on the Hugging Face hub that the notebooks and the CLI offer by key.

    Args:
        key: the short name (`sd15`, `sdxl`, ...).
        repo_id: the hub repository.
        title: a one-line description for menus.
        aliases: other names that mean this model (renamed hub repositories).
        variant: the weight variant to download by default (`fp16` halves the download).
        gated: the hub repository asks users to accept a licence (and so needs a token) first.
    """

    key: str
    repo_id: str
    title: str
    aliases: tuple[str, ...] = ()
    variant: str | None = "fp16"
    gated: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryOption:
    """One way of running a model, and what it needs (`Family.memory_options`).

    Args:
        name: a short name (`bf16`, `bf16-offload`, `8bit-offload`, `4bit-offload`).
        description: what it does, for messages.
        peak_gib: the peak GPU memory in GiB, computed by the planner (`nbkit.models.memory`) from the
            family's traced figures; None in the family's own list.
        quantization: `8bit`, `4bit` or None; quantized weights need bitsandbytes or torchao.
        offload: the text encoders (and, for generation, idle components) live on the CPU.
        quantized: the components loaded with `quantization` weights.
        stays: under offload, the components that stay on the GPU anyway (bitsandbytes' 8-bit modules
            cannot move between devices).
    """

    name: str
    description: str
    peak_gib: float | None = None
    quantization: Literal["8bit", "4bit"] | None = None
    offload: bool = False
    quantized: tuple[str, ...] = ()
    stays: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SingleFileComponent:
    """Where one diffusers component lives in a family's original (LDM) single file.

    Args:
        name: the diffusers component (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
        prefix: its key prefix in the original layout.
        keymap: how its keys map: `unet`, `vae`, `clip` (OpenAI CLIP, Hugging Face names) or
            `open_clip` (OpenCLIP's own names, fused attention).
        trailing_blocks: residual blocks the original text tower has after the diffusers model's last
            layer: 1 for SD 2.x, whose diffusers text encoder stops at the penultimate block it uses.
    """

    name: str
    prefix: str
    keymap: Literal["unet", "vae", "clip", "open_clip"]
    trailing_blocks: int = 0


@dataclasses.dataclass(frozen=True)
class SingleFileLayout:
    """A family's original single-file checkpoint layout (the one A1111, ComfyUI and Forge read).

    Families whose layouts are equal (SD 2.x 512 and 768-v) have files with the same keys and shapes:
    only metadata or the prediction type tells them apart.

    Args:
        components: the components, in the order they are written.
        signature: a key prefix only this layout's files have; families are asked most specific first.
        evidence: what the signature means, in words (for messages).

    A file without a text encoder is told by the width its UNet attends to (`Family.cross_attention_dim`).
    """

    components: tuple[SingleFileComponent, ...]
    signature: str
    evidence: str


# A linear module's parameters, named the same in both layouts: (original, diffusers).
LINEAR_PARAMS: tuple[tuple[str, str], ...] = (("weight", "weight"), ("bias", "bias"))


@dataclasses.dataclass(frozen=True)
class FusedModule:
    """One module of a transformer's original (single-file) layout and the diffusers modules it is made of.

    The original layouts (Black Forest Labs' FLUX code, Tongyi's Z-Image code) fuse what diffusers keeps
    apart (q, k and v are one `qkv`); the rest is renames. A family's `transformer_layout` lists its
    modules; the transformer file and the ComfyUI LoRA file are both written from that list.

    Args:
        original: its name in the original layout, e.g. `double_blocks.0.img_attn.qkv`.
        parts: the diffusers modules, concatenated along the output dimension, in that order.
        params: (original parameter, diffusers parameter) names: a FLUX norm's `scale` is diffusers'
            `weight`; an empty name is a bare parameter (Z-Image's `x_pad_token`), not a module's.
        swap_halves: the output's two halves are swapped (FLUX's final (shift, scale) modulation, which
            diffusers keeps as (scale, shift)).
    """

    original: str
    parts: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = LINEAR_PARAMS
    swap_halves: bool = False

    @property
    def is_linear(self) -> bool:
        """A linear module (weight, optional bias): one a LoRA may patch."""
        return self.params == LINEAR_PARAMS

    def key(self, param: str) -> str:
        """The original layout's tensor name of parameter `param` (an original parameter name)."""
        return f"{self.original}.{param}" if param else self.original

    @staticmethod
    def part_key(part: str, param: str) -> str:
        """The diffusers tensor name of parameter `param` (a diffusers parameter name) of `part`."""
        return f"{part}.{param}" if param else part
