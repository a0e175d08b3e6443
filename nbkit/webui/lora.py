"""A1111's `<lora:NAME:WEIGHT>` prompt syntax, and applying those LoRAs for one request.

A1111 reads extra networks out of the prompt: `<lora:name>`, `<lora:name:0.8>`, or
`<lora:name:TE:UNET>` (text encoder and UNet weights; the UNet's defaults to the text encoder's), with
`te=`, `unet=` as named forms; `lyco` is an old alias of `lora`. The tags are taken out of the prompt
the model sees. `applied_loras` loads the kohya files into the pipeline as peft adapters
(`load_lora_weights` + `set_adapters`) and unloads them all when the request ends, so the next request
runs on the bare weights again. A1111 names the LoRAs it used in the infotext's `Lora hashes`, with the
first 12 hex of each file's "addnet" hash (sha256 of the tensors after the safetensors header).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError

LORA_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)
LORA_HASH_LENGTH = 12  # A1111's LoRA short hash


@dataclasses.dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag of a prompt.

    Args:
        name: the LoRA's name (a file stem or alias).
        te_weight: the text encoders' weight.
        unet_weight: the UNet's weight.
    """

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise NbkitError(
            f"the prompt's {tag} has the weight {text!r}, which is not a number",
            fix="write it as <lora:NAME:0.8>",
        ) from None


def parse_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """Take the `<lora:...>` tags out of a prompt.

    Args:
        prompt: a prompt with A1111 LoRA tags.

    Returns:
        The prompt without the tags, and the tags in order (a name given twice: the last one counts).
    """
    tags: dict[str, LoraTag] = {}
    for match in LORA_TAG.finditer(prompt):
        name, *args = match.group(2).split(":")
        positional = [arg for arg in args if "=" not in arg]
        named = dict(arg.split("=", 1) for arg in args if "=" in arg)
        te = _number(named.get("te", positional[0] if positional else "1"), match.group(0))
        unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), match.group(0))
        if not name.strip():
            raise NbkitError(f"the prompt's {match.group(0)} names no LoRA", fix="write <lora:NAME:0.8>")
        tags.pop(name.strip(), None)
        tags[name.strip()] = LoraTag(name.strip(), te, unet)
    # A1111 removes the tags and leaves the text around them as it was; the ends are stripped too, which
    # changes nothing for CLIP and T5 (their tokenizers strip) but keeps a Qwen prompt (Z-Image,
    # FLUX.2) from ending in the space a trailing tag leaves.
    return LORA_TAG.sub("", prompt).strip(), list(tags.values())


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash: the addnet hash (sha256 of the tensors) of a .safetensors, else the file's."""
    from nbkit.convert.hashes import model_hashes, modelspec_hash

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return modelspec_hash(path).removeprefix("0x")
    return model_hashes(path)[0]


def lora_hashes_text(entries: list[tuple[str, str | None]]) -> str | None:
    """The infotext's `Lora hashes` value: `name: hash12, ...` (None when no LoRA had a hash)."""
    parts = [f"{name}: {digest[:LORA_HASH_LENGTH]}" for name, digest in entries if digest]
    return ", ".join(parts) or None


@contextlib.contextmanager
def applied_loras(pipeline: Any, loras: list[tuple[LoraTag, Path]]) -> Iterator[list[str]]:
    """Load LoRAs into `pipeline` with their weights for the `with` block, then unload them all.

    Args:
        pipeline: a diffusers pipeline of any family (its components may be shared with other
            pipelines, which see the LoRAs too).
        loras: each tag with its kohya (or diffusers) `.safetensors`; a Flux LoRA may be in diffusers'
            format or kohya's/ComfyUI's (`lora_unet_double_blocks_...`), both read by `load_lora_weights`;
            a session's LoRA of a family with `session_lora_from_diffusers` is its diffusers file.

    Yields:
        The peft adapter names.
    """
    if not loras:
        yield []
        return
    names = []
    try:
        for index, (tag, path) in enumerate(loras):
            name = f"webui_{index}"  # peft keys modules by adapter name: no dots or spaces allowed
            elsewhere = NbkitError(
                f"LoRA {tag.name!r} has no weights this model takes: none of its modules is in this model, "
                "so it was made for another model family",
                path=path,
                fix="pick a LoRA trained for this model's family",
            )
            try:
                pipeline.load_lora_weights(str(path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as error:
                if "not found in the base model" in str(error):  # peft: no target module is there
                    raise elsewhere from error
                raise NbkitError(
                    f"LoRA {tag.name!r} does not fit this model: {error}",
                    path=path,
                    fix="pick a LoRA trained for this model's family",
                ) from error
            names.append(name)
            # diffusers loads a file whose keys fit none of the model's modules as an empty adapter
            # (quietly, for some families), which set_adapters then refuses in peft's words.
            if not any(name in adapters for adapters in pipeline.get_list_adapters().values()):
                raise elsewhere
        components = pipeline.get_list_adapters()
        weights = []
        for name, (tag, _) in zip(names, loras, strict=True):
            weights.append(
                {
                    # The denoiser (an SD UNet or a flow model's transformer) takes the UNet weight.
                    component: tag.unet_weight if component in ("unet", "transformer") else tag.te_weight
                    for component, adapters in components.items()
                    if name in adapters
                }
            )
        pipeline.set_adapters(names, weights)
        yield names
    finally:
        if names:
            pipeline.unload_lora_weights()
