"""Full-width random-weight models of a family, from configs nbkit ships (deterministic, no hub).

The configs are the real ones: `nbkit/configs/<folder>/` for the SD families (SD 1.5, SD 2.1 768-v,
SDXL) and `nbkit/configs/flux1-dev/` for FLUX.1 [dev]. Which folder belongs to which family
is not written down here: `nbkit.families.detect_family_from_config` reads each folder, as it reads a
user's model. Where FLUX.1 [dev]'s numbers come from (no comment can sit in a JSON file):

- transformer (19 double and 38 single blocks, 24 heads of 128, joint_attention_dim 4096,
  pooled_projection_dim 768, in_channels 64, patch_size 1, rope axes (16, 56, 56), guidance_embeds):
  the defaults of `FluxTransformer2DModel.__init__` in diffusers 0.42 (installed here), which match
  Black Forest Labs' own flux-dev parameters (hidden_size 3072 = 24 x 128, depth 19,
  depth_single_blocks 38, context_in_dim 4096, vec_in_dim 768, axes_dim [16, 56, 56],
  guidance_embed true) as vendored by hpcaitech/Open-Sora
  (`configs/diffusion/inference/plugins/t2i2v.py`); dev alone sets guidance_embeds.
- vae (AutoencoderKL, 16 latent channels, blocks 128/256/512/512, no quant convs, scaling 0.3611,
  shift 0.1159, force_upcast): the same Open-Sora file's `img_flux_ae` (ch 128, ch_mult 1,2,4,4,
  z_channels 16, scale_factor 0.3611, shift_factor 0.1159) and the diffusers-format VAE config
  that taproot (PyPI `taproot` 0.3.8, `tasks/generation/image/flux/pretrained/vae.py`) vendors.
- text_encoder: CLIP ViT-L/14's text tower, the same numbers as SD 1.5's shipped text encoder.
- text_encoder_2 (T5 v1.1 XXL encoder: d_model 4096, d_ff 10240, 64 heads of 64, 24 layers,
  gated-gelu, vocab 32128): Stability AI's SD 3.5 reference code (`sd3_infer.py`'s T5_CONFIG) and
  the T5 v1.1 configuration in transformers.
- scheduler (FlowMatchEulerDiscreteScheduler, shift 3.0, dynamic shifting from 256 to 4096 tokens
  between 0.5 and 1.15): taproot's `flux/pretrained/scheduler.py`.

Z-Image-Turbo (`nbkit/configs/zimage-turbo/`) and FLUX.2 [klein] 4B and 9B (`flux2-klein-4b/`,
`flux2-klein-9b/`) say where their numbers come from in each folder's SOURCES.md. Two folders detect
as FLUX.2 [klein]; the first in name order, the 4B (the family's default model), is the family's.

Tokenizers are nbkit's tiny offline ones (`nbkit.tokenizers`: CLIP, `make_t5_tokenizer`,
`make_qwen_tokenizer`): what costs memory is the text encoder's `vocab_size` (its embedding table),
which stays the real one; the tiny vocabularies only produce ids below it.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, detect_family_from_config

if TYPE_CHECKING:
    import torch

PACKAGE = Path(__file__).resolve().parents[1]
CONFIG_ROOTS = (PACKAGE / "configs",)
SHARD_BYTES = 2 * 1024**3  # bounds the host RAM one shard of random weights takes while it is written
WEIGHT_STD = 0.02  # small normal weights keep activations finite through dozens of blocks


def real_config_folders() -> dict[str, Path]:
    """Map each family's name to the shipped folder of its real configs (the first that detects as it)."""
    folders: dict[str, Path] = {}
    for root in CONFIG_ROOTS:
        for folder in sorted(path.parent for path in root.glob("*/model_index.json")):
            folders.setdefault(detect_family_from_config(folder).family, folder)
    return folders


def real_config_folder(family: str) -> Path:
    """The shipped config folder of `family`.

    Args:
        family: a family name (a key of `nbkit.families.FAMILIES`).

    Raises:
        NbkitError: when nbkit ships no real configs for the family.
    """
    folders = real_config_folders()
    if family not in folders:
        known = ", ".join(FAMILIES[name].title for name in folders)
        raise NbkitError(f"nbkit ships no real-size configs for {family!r}.", fix=f"Use one of: {known}.")
    return folders[family]


def model_components(folder: Path) -> dict[str, tuple[str, str]]:
    """`model_index.json`'s components: name -> (library, class name), without the null ones."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    }


def _is_model(library: str, class_name: str) -> bool:
    return not ("Tokenizer" in class_name or "Scheduler" in class_name)


def build_component(folder: Path, name: str) -> torch.nn.Module:
    """Instantiate one model component of `folder` from its config, on the current default device.

    Call it under `torch.device("meta")` for shapes only, or under a `FakeTensorMode` for tracing;
    weights are the class's own initialisation.

    Args:
        folder: a config folder (`real_config_folder(...)`).
        name: the component (`unet`, `transformer`, `vae`, `text_encoder`, ...).
    """
    import diffusers
    import transformers

    library, class_name = model_components(folder)[name]
    if library == "diffusers":
        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(folder / name))
    cls = getattr(transformers, class_name)
    config = cls.config_class.from_json_file(folder / name / "config.json")
    return cls(config)


def build_meta_models(family: str) -> dict[str, torch.nn.Module]:
    """Every model component of `family` at full width on the `meta` device (no memory, no weights).

    Args:
        family: a family name with shipped real configs.
    """
    import torch

    folder = real_config_folder(family)
    with torch.device("meta"):
        return {
            name: build_component(folder, name)
            for name, (library, class_name) in model_components(folder).items()
            if _is_model(library, class_name)
        }


def parameter_count(module: torch.nn.Module) -> int:
    """The number of parameters of `module` (meta modules included)."""
    return sum(parameter.numel() for parameter in module.parameters())


def constant_tensor(key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor a random model holds at `key` when it is not random, else None: 1-D weights scale
    norms (ones); biases start at zero; a batch norm's statistics are those of a fresh one (mean 0,
    variance 1, no batches seen)."""
    import torch

    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if (len(shape) == 1 and key.endswith(("weight", "scale"))) or key.endswith("running_var"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(("bias", "running_mean")):
        return torch.zeros(shape, dtype=dtype)
    return None


def _random_tensor(key: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    import torch

    # Small normal weights, each tensor with its own generator seeded from its name, so shards can be
    # written in any order.
    constant = constant_tensor(key, shape, dtype)
    if constant is not None:
        return constant
    generator = torch.Generator().manual_seed(seed ^ zlib.crc32(key.encode()))
    return (torch.randn(shape, generator=generator) * WEIGHT_STD).to(dtype)


def weights_to_write(
    module: torch.nn.Module, dtype: torch.dtype
) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The tensors a random-weight `module` is saved with: name -> (shape, dtype).

    Floating-point tensors take `dtype`; integer buffers (a batch norm's `num_batches_tracked`) keep
    theirs. A tied weight (an LM head sharing the embedding table) is saved once, under its first
    name, as `save_pretrained` does: the model ties it again on load.

    Args:
        module: the component, built on `meta`.
        dtype: the floating-point dtype of the weights.

    Raises:
        NbkitError: for state that is not a tensor of numbers (random values cannot stand in).
    """
    import torch

    tensors: dict[str, tuple[torch.Size, torch.dtype]] = {}
    seen: set[int] = set()
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point():
            tensors[key] = (tensor.shape, dtype)
        elif tensor.dtype in (torch.int64, torch.int32) and tensor.numel() <= 1:
            tensors[key] = (tensor.shape, tensor.dtype)
        else:
            raise NbkitError(
                f"{type(module).__name__}'s {key} is {tensor.dtype}; random weights cannot stand in."
            )
    return tensors


def _shards(shapes: dict[str, tuple[torch.Size, int]]) -> Iterator[list[str]]:
    shard: list[str] = []
    size = 0
    for key, (_, nbytes) in shapes.items():
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = [], 0
        shard.append(key)
        size += nbytes
    if shard:
        yield shard


def _write_weights(module: torch.nn.Module, out: Path, *, stem: str, dtype: torch.dtype, seed: int) -> None:
    """Write `module`'s state dict as seeded random tensors, one shard in memory at a time."""
    from safetensors.torch import save_file

    written = weights_to_write(module, dtype)
    shapes = {key: (shape, shape.numel() * kind.itemsize) for key, (shape, kind) in written.items()}
    shards = list(_shards(shapes))
    weight_map: dict[str, str] = {}
    for number, keys in enumerate(shards, 1):
        filename = f"{stem}.safetensors"
        if len(shards) > 1:
            filename = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: _random_tensor(key, *written[key], seed) for key in keys}
        save_file(tensors, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, filename))
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes for _, nbytes in shapes.values())},
            "weight_map": weight_map,
        }
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_tokenizer(folder: Path, out: Path, name: str, class_name: str) -> None:
    from nbkit.tokenizers import (
        EOS_TOKEN,
        make_clip_tokenizer,
        make_qwen_tokenizer,
        make_t5_tokenizer,
        write_clip_vocab_files,
    )

    if class_name.startswith("T5"):
        make_t5_tokenizer().save_pretrained(out / name)
        return
    if class_name.startswith("Qwen"):  # Z-Image's and FLUX.2's Qwen3 encoders (chat template included)
        make_qwen_tokenizer().save_pretrained(out / name)
        return
    # OpenCLIP text encoders (gelu) pad with "!", OpenAI's CLIP (quick_gelu) with its end token.
    encoder = "text_encoder" + name.removeprefix("tokenizer")
    hidden_act = json.loads((folder / encoder / "config.json").read_text(encoding="utf-8"))["hidden_act"]
    tokenizer = make_clip_tokenizer(pad_token="!" if hidden_act == "gelu" else EOS_TOKEN)
    tokenizer.save_pretrained(out / name)
    write_clip_vocab_files(out / name)


def save_random_model(family: str, out_dir: str | Path, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Write a full-size random-weight model of `family` as a diffusers folder.

    Each component is built on `meta` for its tensor names and shapes, then its weights are drawn
    (seeded per tensor) and saved shard by shard, so host RAM stays near one shard (2 GiB) even for
    FLUX.1's 12-billion-parameter transformer. Disk: about 2 GB for SD 1.5, 7 GB for SDXL, 33 GB
    for FLUX.1, 20 GB for Z-Image and 16 GB for FLUX.2 [klein] 4B in half precision.

    Args:
        family: a family name with shipped real configs.
        out_dir: a new or empty folder.
        seed: the seed every tensor's generator derives from.
        dtype: `float16` or `bfloat16`; default bfloat16 for families that need it, else float16.
    """
    import torch

    folder = real_config_folder(family)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise NbkitError("The folder is not empty.", path=out, fix="Choose a new or empty folder.")
    torch_dtype = getattr(torch, dtype or ("bfloat16" if FAMILIES[family].needs_bf16 else "float16"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "model_index.json", out / "model_index.json")
    for name, (_, class_name) in model_components(folder).items():
        if "Tokenizer" in class_name:
            _write_tokenizer(folder, out, name, class_name)
        else:
            write_component(folder, name, out, dtype=torch_dtype, seed=seed)
    return out


def write_component(folder: Path, name: str, out: Path, *, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write one model component (or scheduler) of config folder `folder` into `out / name`: its
    config, and for a model its seeded random weights (`save_random_model`).

    Args:
        folder: a config folder (`real_config_folder(...)`).
        name: the component (`transformer`, `vae`, `text_encoder`, `scheduler`, ...).
        out: the model folder being written.
        dtype: the floating-point dtype of the weights.
        seed: the seed every tensor's generator derives from.
    """
    import torch

    library, class_name = model_components(folder)[name]
    shutil.copytree(folder / name, out / name)
    if "Scheduler" not in class_name:
        with torch.device("meta"):
            module = build_component(folder, name)
        stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
        _write_weights(module, out / name, stem=stem, dtype=dtype, seed=seed)
    return out / name


def describe(family: str) -> dict[str, Any]:
    """Parameter counts (millions) of each model component of `family`, from a meta build."""
    return {
        name: round(parameter_count(module) / 1e6, 1) for name, module in build_meta_models(family).items()
    }
