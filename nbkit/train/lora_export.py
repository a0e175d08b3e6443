"""Write a trained LoRA in diffusers format and in the kohya format A1111 and ComfyUI load.

The models come in with peft adapters added by `add_adapter(LoraConfig(...))`, as in diffusers'
DreamBooth LoRA example. The diffusers file is what `pipeline.load_lora_weights(folder)` reads; the
kohya file (`lora_unet_*`, `lora_te_*` or `lora_te1_*`/`lora_te2_*`, `.lora_down`/`.lora_up`/`.alpha`)
is what A1111's `<lora:name:1>` and ComfyUI's LoRA loader read. Kohya files carry the scale as
`alpha / rank`; it is taken from each peft layer's own scaling, so `lora_alpha != rank`,
`rank_pattern` and rsLoRA all export correctly. Its header carries the SAI model spec keys, built by
`nbkit.convert.metadata` from the registry's family facts as a full model's are, with the LoRA's own
training resolution and `modelspec.hash_sha256` of its tensors.

The key layout of the second file is the family's (`Family.lora_file_layout`): `kohya` names the
diffusers modules (the SD families); `original` names the fused modules of the family's original
transformer layout (`Family.transformer_layout`: Black Forest Labs' code for FLUX.1 and FLUX.2, Tongyi's
for Z-Image), which ComfyUI and Forge patch, converted by `nbkit.convert.lora_layout.save_original_lora`
from the diffusers file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nbkit.convert.hashes import MODELSPEC_HASH_KEY, with_modelspec_hash
from nbkit.convert.metadata import modelspec_metadata
from nbkit.families import FAMILIES
from nbkit.fsio import atomic_path, atomic_write_bytes

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def check_inputs(
    unet: Any,
    text_encoders: list,
    out_dir: Path | None,
    family: str,
    adapter_name: str,
    resolution: int | None = None,
) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if out_dir is None:
        raise ValueError("out_dir is required")
    if resolution is not None and (
        isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0
    ):
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
    limit = FAMILIES[family].text_encoder_count
    if len(text_encoders) > limit:
        raise ValueError(f"family {family!r} has {limit} text encoder(s), got {len(text_encoders)}")
    models = [("unet", unet)] + [(f"text_encoders[{i}]", model) for i, model in enumerate(text_encoders)]
    if all(model is None for _, model in models):
        raise ValueError("nothing to save: give a LoRA-adapted unet and/or text encoder")
    for name, model in models:
        if model is not None and adapter_name not in (getattr(model, "peft_config", None) or {}):
            raise ValueError(f"{name} ({type(model).__name__}) has no LoRA adapter named {adapter_name!r}")


def _kohya_root(model: Any, prefix: str) -> str:
    # Kohya names text encoder modules as transformers 4 did (`text_model.encoder.layers...`);
    # transformers 5 dropped the `text_model.` level from CLIPTextModel (not from ...WithProjection).
    return "text_model." if prefix.startswith("lora_te") and not hasattr(model, "text_model") else ""


def kohya_alphas(model: Any, prefix: str, adapter_name: str = "default") -> dict[str, float]:
    """The kohya `alpha` of every LoRA layer of `model`, keyed by its kohya module name.

    Kohya applies `alpha / rank`; peft applies `scaling`, so alpha is `scaling * rank`.

    Args:
        model: a peft-adapted model.
        prefix: `lora_unet`, `lora_te`, `lora_te1` or `lora_te2`.
        adapter_name: the peft adapter to read.
    """
    from peft.tuners.lora import LoraLayer

    alphas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            key = f"{prefix}_{(_kohya_root(model, prefix) + name).replace('.', '_')}"
            alphas[key] = float(module.scaling[adapter_name] * module.r[adapter_name])
    return alphas


def kohya_state_dict(model: Any, component: str, prefix: str, adapter_name: str = "default") -> dict:
    """The LoRA weights of `model` in kohya layout, `alpha`s included.

    Args:
        model: a peft-adapted UNet or text encoder.
        component: `unet`, `text_encoder` or `text_encoder_2` (diffusers' names).
        prefix: the kohya prefix for it (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`).
        adapter_name: the peft adapter to export.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # diffusers' converter names components by their pipeline prefix and always says `lora_te1`
    # for the first text encoder; single-encoder families use kohya's `lora_te`.
    root = f"{component}.{_kohya_root(model, prefix)}"
    converted = convert_state_dict_to_kohya({root + key: value for key, value in peft_state.items()})
    diffusers_prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[
        component
    ]
    alphas = kohya_alphas(model, prefix, adapter_name)
    state = {}
    for key, value in converted.items():
        key = prefix + key[len(diffusers_prefix) :]
        module, _, suffix = key.partition(".")
        if suffix == "alpha":
            # The converter writes alpha = rank; the real one comes from the layer's scaling.
            value = torch.tensor(alphas[module], dtype=torch.float32)
        state[key] = value
    return state


def save_lora(
    unet: Any = None,
    text_encoders: list | None = None,
    out_dir: Path | None = None,
    *,
    family: str,
    metadata: dict[str, Any],
    name: str | None = None,
    adapter_name: str = "default",
    dtype: Any = "float32",
    resolution: int | None = None,
    description: str | None = None,
    author: str | None = None,
) -> dict[str, Path]:
    """Save LoRA adapters as a diffusers LoRA file and a kohya/A1111 `.safetensors`.

    Pass the models themselves, not accelerate's wrappers; a wrapper (DistributedDataParallel,
    torch.compile) is taken off with accelerate's own `extract_model_from_parallel`.

    Args:
        unet: the UNet (FLUX.1: the transformer) with a LoRA adapter, or None when only text
            encoders were trained.
        text_encoders: the text encoder(s) in pipeline order (`[text_encoder, text_encoder_2]` for
            SDXL); an entry may be None when that encoder was not trained.
        out_dir: the folder to write into (created if missing); both files are written atomically.
        family: the model family's name; its `lora_file_layout` says how the second file is written.
        metadata: extra header metadata for the kohya file; non-string values are JSON-encoded and
            `modelspec.*` keys override the defaults (e.g. `modelspec.title`), except
            `modelspec.hash_sha256`, which is always the hash of the tensors written.
        name: the kohya file's stem, which A1111 shows as the LoRA's name; defaults to the folder name.
        adapter_name: the peft adapter to export.
        dtype: the dtype both files store ("float32", "float16" or "bfloat16"); LoRA files are
            small, so fp32 by default keeps them exactly as trained.
        resolution: the square size the LoRA trained at, its `modelspec.resolution`; None says the
            family's native size.
        description: `modelspec.description` (default: a line naming the family and resolution).
        author: `modelspec.author` (default: none).

    Returns:
        `{"diffusers": <folder>/pytorch_lora_weights.safetensors, "kohya": <folder>/<name>.safetensors}`.
    """
    import diffusers
    import torch
    from accelerate.utils import extract_model_from_parallel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    def unwrap(model: Any) -> Any:
        return None if model is None else extract_model_from_parallel(model, keep_torch_compile=False)

    text_encoders = [unwrap(model) for model in (text_encoders or [])]
    unet = unwrap(unet)
    check_inputs(unet, text_encoders, out_dir, family, adapter_name, resolution)
    facts = FAMILIES[family]
    if not facts.trains_text_encoders and any(model is not None for model in text_encoders):
        raise ValueError(
            f"a {facts.title} LoRA is its {facts.denoiser}'s only: nbkit does not train its text encoders"
        )
    if MODELSPEC_HASH_KEY in metadata:
        raise ValueError(f"metadata may not set {MODELSPEC_HASH_KEY}: it is the hash of the tensors written")
    out_dir = Path(out_dir)
    name = name or out_dir.name
    torch_dtype = getattr(torch, str(dtype).removeprefix("torch."))
    resolution = resolution or facts.native_resolution

    def cast(state: dict) -> dict:
        return {key: value.detach().to("cpu", torch_dtype).contiguous() for key, value in state.items()}

    # (a) diffusers format, through the pipeline class's own writer, with each adapter's LoraConfig
    # so that loading restores lora_alpha (and with it the scale) exactly.
    components = [(facts.denoiser, unet), *zip(facts.text_encoder_roles, text_encoders, strict=False)]
    layers, adapter_metadata = {}, {}
    for component, model in components:
        if model is None:
            continue
        layers[f"{component}_lora_layers"] = cast(get_peft_model_state_dict(model, adapter_name=adapter_name))
        adapter_metadata[f"{component}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    pipeline_class = getattr(diffusers, facts.pipeline_class)
    diffusers_path = out_dir / DIFFUSERS_WEIGHT_NAME
    with atomic_path(diffusers_path) as tmp:
        pipeline_class.save_lora_weights(tmp.parent, weight_name=tmp.name, **layers, **adapter_metadata)

    if facts.lora_file_layout == "original":
        from nbkit.convert.lora_layout import save_original_lora

        header = _header(
            family,
            name,
            resolution,
            description,
            author,
            metadata,
            unet.peft_config[adapter_name],
            facts.lora_network_module,
        )
        # The converter writes the file, so the hash of its tensors is its to add; no placeholder here.
        header.pop(MODELSPEC_HASH_KEY, None)
        header.pop("modelspec.prediction_type", None)  # SAI's spec knows epsilon and v, not flow
        header.pop("modelspec.architecture", None)  # the variant's (dev or schnell): the converter derives it
        # The peft-adapted model keeps its class and config; its sizes place the zero blocks of fused
        # modules the LoRA covers only in part.
        config = {**dict(unet.config), "_class_name": type(unet).__name__}
        rows = {
            key.removesuffix(".weight").replace(".base_layer", ""): tensor.shape[0]
            for key, tensor in unet.state_dict().items()
            if key.endswith(".weight") and "lora_" not in key
        }
        comfy_path = save_original_lora(
            diffusers_path,
            out_dir / f"{name}.safetensors",
            family=facts,
            config=config,
            metadata=header,
            rows=rows.__getitem__,
        )
        return {"diffusers": diffusers_path, "kohya": Path(comfy_path)}

    # (b) kohya format with modelspec metadata.
    kohya = {}
    for component, model in components:
        if model is None:
            continue
        kohya.update(kohya_state_dict(model, component, facts.kohya_lora_prefix(component), adapter_name))
    first_config = next(model for _, model in components if model is not None).peft_config[adapter_name]
    header = _header(family, name, resolution, description, author, metadata, first_config, "networks.lora")
    kohya_path = out_dir / f"{name}.safetensors"
    # In memory: LoRA files are small, and the modelspec hash goes into the header before the data.
    atomic_write_bytes(kohya_path, with_modelspec_hash(save(cast(kohya), metadata=header)))
    return {"diffusers": diffusers_path, "kohya": kohya_path}


def _header(
    family: str,
    name: str,
    resolution: int,
    description: str | None,
    author: str | None,
    metadata: dict,
    config: Any,
    network_module: str,
) -> dict[str, str]:
    """The kohya-format file's header: SAI model spec, kohya's network keys, then the caller's metadata."""
    facts = FAMILIES[family]
    header = {
        **modelspec_metadata(
            family=family,
            title=name,
            resolution=resolution,
            prediction_type=facts.prediction_type,
            description=description
            or f"LoRA for {facts.title} models, trained at {resolution} px with nbkit",
            author=author,
            lora=True,
        ),
        "ss_network_module": network_module,
        "ss_network_dim": str(config.r),
        "ss_network_alpha": _format_number(config.lora_alpha),
    }
    header.update(
        {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    )
    return header


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
