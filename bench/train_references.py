"""Reference LoRA loops for `bench/train.py --family zimage|flux2`, written the way diffusers' own
DreamBooth LoRA examples train these families (examples/dreambooth/train_dreambooth_lora_z_image.py and
train_dreambooth_lora_flux2_klein.py): each step loads and transforms the images, encodes them with the
VAE and the prompt with the Qwen3 encoder, draws the timesteps and takes the flow-matching loss.
Rank-16 LoRA on the attention projections (the examples' default targets), AdamW, no mixed precision.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CAPTION = "a photo of zwx dog"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the examples' default `--lora_layers`


def instance_batches(image_paths: list[Path], args: argparse.Namespace) -> Iterator[dict]:
    """Endless shuffled batches of `{"pixel_values", "prompts"}`, loaded and cropped per step as diffusers'
    examples' DreamBooth dataset does."""
    import numpy as np
    import torch
    from PIL import Image

    def load(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        scale = args.resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    class InstanceDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(image_paths)

        def __getitem__(self, index: int) -> dict:
            return {"pixel_values": load(image_paths[index]), "prompt": CAPTION}

    def collate(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous(),
            "prompts": [example["prompt"] for example in examples],
        }

    loader = torch.utils.data.DataLoader(
        InstanceDataset(), batch_size=args.batch_size, shuffle=True, collate_fn=collate
    )
    while True:
        yield from loader


def _train(
    pipeline: Any,
    image_paths: list[Path],
    args: argparse.Namespace,
    loss_of: Callable[[dict, Any], Any],
    sampler: Any,
) -> list[float]:
    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    accelerator = Accelerator(mixed_precision="no")
    transformer = pipeline.transformer
    for model in (pipeline.vae, transformer, pipeline.text_encoder):
        model.requires_grad_(False)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(
        LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    transformer.train()
    step_times: list[float] = []
    with sampler:
        for batch in instance_batches(image_paths, args):
            loss = loss_of(batch, transformer)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss)
            step_times.append(time.time())
            if len(step_times) == args.warmup + args.steps:
                return step_times
    return step_times


def _noised(latents: Any, scheduler: Any) -> tuple[Any, Any, Any]:
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    return (1.0 - sigmas) * latents + sigmas * noise, noise, timesteps


def reference_zimage_lora(
    model_dir: Path, image_paths: list[Path], args: argparse.Namespace, sampler: Any
) -> list[float]:
    """A Z-Image LoRA loop as diffusers' train_dreambooth_lora_z_image.py runs it."""
    import torch
    from diffusers import ZImagePipeline

    torch.manual_seed(0)
    pipeline = ZImagePipeline.from_pretrained(model_dir)
    vae, scheduler = pipeline.vae, copy.deepcopy(pipeline.scheduler)

    def loss_of(batch: dict, transformer: Any) -> Any:
        with torch.no_grad():
            captions, _ = pipeline.encode_prompt(
                batch["prompts"],
                do_classifier_free_guidance=False,
                max_sequence_length=args.max_sequence_length,
            )
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noisy, noise, timesteps = _noised(latents, scheduler)
        prediction = transformer(
            list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False
        )[0]
        prediction = -torch.stack(prediction).squeeze(2)
        return torch.mean(
            ((prediction.float() - (noise - latents).float()) ** 2).reshape(len(latents), -1), 1
        ).mean()

    return _train(pipeline, image_paths, args, loss_of, sampler)


def reference_flux2_lora(
    model_dir: Path, image_paths: list[Path], args: argparse.Namespace, sampler: Any
) -> list[float]:
    """A FLUX.2 [klein] LoRA loop as diffusers' train_dreambooth_lora_flux2_klein.py runs it."""
    import torch
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(0)
    pipeline = Flux2KleinPipeline.from_pretrained(model_dir)
    vae, scheduler = pipeline.vae, copy.deepcopy(pipeline.scheduler)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)

    def loss_of(batch: dict, transformer: Any) -> Any:
        with torch.no_grad():
            embeds, text_ids = pipeline.encode_prompt(
                batch["prompts"], max_sequence_length=args.max_sequence_length
            )
        latents = vae.encode(batch["pixel_values"]).latent_dist.mode()
        latents = (Flux2KleinPipeline._patchify_latents(latents) - bn_mean) / bn_std
        ids = Flux2KleinPipeline._prepare_latent_ids(latents)
        noisy, noise, timesteps = _noised(latents, scheduler)
        packed = Flux2KleinPipeline._pack_latents(noisy)
        prediction = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        prediction = Flux2KleinPipeline._unpack_latents_with_ids(prediction[:, : packed.size(1)], ids)
        return torch.mean(
            ((prediction.float() - (noise - latents).float()) ** 2).reshape(len(latents), -1), 1
        ).mean()

    return _train(pipeline, image_paths, args, loss_of, sampler)
