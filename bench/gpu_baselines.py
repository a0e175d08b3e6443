"""The GPU check's baselines (bench/gpu_check.py runs them): training loops written like diffusers' examples.

- SD 1.5: examples/dreambooth/train_dreambooth.py;
- SDXL: train_dreambooth_lora_sdxl.py;
- FLUX.1: train_dreambooth_lora_flux.py (the NF4 base as
  examples/research_projects/flux_lora_quantization/train_dreambooth_lora_flux_miniature.py loads it).

Every step encodes the images with the VAE (the examples' default, no --cache_latents); SD 1.5 encodes the
prompt every step (no --pre_compute_text_embeddings), SDXL and FLUX.1 encode the one instance prompt once.

"Same settings" as nbkit's side: resolution, batch 1, mixed precision, optimizer, gradient checkpointing,
attention kernel, LoRA rank and target modules (nbkit's, which for FLUX.1 differ from the example's
default list), timestep sampling (FLUX.1: logit-normal) and the quantization config (nbkit's NF4 config,
with double quantization). The SDXL and FLUX.1 baselines load their frozen weights in the mixed-precision
dtype directly, where the examples load float32 and cast: the same weights on the GPU, a shorter load.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from gpu_models import CAPTION, Case, StepClock, load_pixels, new_accelerator, weight_dtype_of

# --- the baselines, written like diffusers' example scripts ------------------------------------------


def update(accelerator, loss, parameters, optimizer, lr_scheduler) -> None:
    """The examples' update: backward, gradients clipped at 1.0 where they sync, step, schedule, zero."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def finish(accelerator, clock: StepClock, args) -> dict[str, Any]:
    """The loop's figures, its memory freed for the next measurement."""
    result = clock.figures(args.steps)
    accelerator.free_memory()
    return result


def make_optimizer_like_examples(parameters, case: Case, weight_decay: float):
    import torch

    if case.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters, lr=case.learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8
    )


def set_attention(model, attention: str) -> None:
    """The examples' attention: diffusers' default SDPA, or xformers with
    --enable_xformers_memory_efficient_attention (used when nbkit picked it)."""
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()


def baseline_sd1(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth.py without --train_text_encoder: the UNet trains in fp32
    under autocast, the VAE and text encoder run in the mixed-precision dtype every step."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    set_attention(unet, attention)
    unet.enable_gradient_checkpointing()
    if device.type == "cuda":  # --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = make_optimizer_like_examples(unet.parameters(), case, weight_decay=1e-2)

    class DreamBoothDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, index: int) -> dict:
            pixels, _, _ = load_pixels(images[index], case.resolution)
            tokens = tokenizer(
                CAPTION,
                truncation=True,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            return {"instance_images": pixels, "instance_prompt_ids": tokens.input_ids}

    def collate_fn(examples: list[dict]) -> dict:
        pixel_values = torch.stack([example["instance_images"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.cat([example["instance_prompt_ids"] for example in examples], dim=0)
        return {"input_ids": input_ids, "pixel_values": pixel_values}

    loader = torch.utils.data.DataLoader(
        DreamBoothDataset(), batch_size=1, shuffle=True, collate_fn=collate_fn
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    weight_dtype = weight_dtype_of(case.precision)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                model_input = model_input * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device
                ).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(
                    batch["input_ids"].to(text_encoder.device), return_dict=False
                )[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                update(accelerator, loss, unet.parameters(), optimizer, lr_scheduler)
            loss.detach().item()  # the example logs the loss every step
            clock.step_done()
            steps += 1
            if steps == total:
                break
    return finish(accelerator, clock, args)


def _precomputed_dataset(images: list[Path], resolution: int):
    """The SDXL and FLUX.1 examples' DreamBoothDataset: every image transformed once, up front."""
    import torch

    loaded = [load_pixels(path, resolution) for path in images]

    class DreamBoothDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(loaded)

        def __getitem__(self, index: int) -> dict:
            pixels, original, crop = loaded[index]
            return {"instance_images": pixels, "original_size": original, "crop_top_left": crop}

    def collate_fn(examples: list[dict]) -> dict:
        pixel_values = torch.stack([example["instance_images"] for example in examples])
        return {
            "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
            "original_sizes": [example["original_size"] for example in examples],
            "crop_top_lefts": [example["crop_top_left"] for example in examples],
        }

    return torch.utils.data.DataLoader(DreamBoothDataset(), batch_size=1, shuffle=True, collate_fn=collate_fn)


def _lora_config(case: Case):
    from peft import LoraConfig

    from nbkit.families import get_family

    family = get_family(case.family)
    return LoraConfig(
        r=case.lora_rank,
        lora_alpha=case.lora_rank,
        init_lora_weights="gaussian",
        target_modules=family.lora_target_modules(family.denoiser),
    )


def baseline_sdxl(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth_lora_sdxl.py: UNet and text encoders in the mixed-precision
    dtype, the VAE in float32 encoding every step, the instance prompt encoded once (the encoders stay on
    the GPU: the example deletes only the lists holding them), LoRA weights upcast to fp32 under fp16."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    weight_dtype = weight_dtype_of(case.precision)
    tokenizer_one = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_two = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=weight_dtype
    )
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(
        folder, subfolder="text_encoder_2", torch_dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=weight_dtype)
    for model in (vae, text_encoder_one, text_encoder_two, unet):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)  # "The VAE is always in float32 to avoid NaN losses."
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    set_attention(unet, attention)
    unet.enable_gradient_checkpointing()
    unet.add_adapter(_lora_config(case))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if case.precision == "fp16":
        cast_training_params([unet], dtype=torch.float32)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer_like_examples([{"params": parameters, "lr": case.learning_rate}], case, 1e-4)
    loader = _precomputed_dataset(images, case.resolution)

    def compute_time_ids(original_size, crops_coords_top_left):
        add_time_ids = list(original_size + crops_coords_top_left + (case.resolution, case.resolution))
        return torch.tensor([add_time_ids]).to(accelerator.device, dtype=weight_dtype)

    def encode_prompt(text_encoders, tokenizers, prompt):
        prompt_embeds_list = []
        for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = output[0]
            prompt_embeds_list.append(output[-1][-2])
        return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds.view(1, -1)

    tokenizers, text_encoders = [tokenizer_one, tokenizer_two], [text_encoder_one, text_encoder_two]
    with torch.no_grad():
        prompt_embeds, unet_add_text_embeds = encode_prompt(text_encoders, tokenizers, CAPTION)
    del tokenizers, text_encoders
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample()
                model_input = (model_input * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device
                ).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                add_time_ids = torch.cat(
                    [
                        compute_time_ids(original_size=s, crops_coords_top_left=c)
                        for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)
                    ]
                )
                unet_added_conditions = {
                    "time_ids": add_time_ids,
                    "text_embeds": unet_add_text_embeds.repeat(bsz, 1),
                }
                model_pred = unet(
                    noisy_model_input,
                    timesteps,
                    prompt_embeds.repeat(bsz, 1, 1),
                    added_cond_kwargs=unet_added_conditions,
                    return_dict=False,
                )[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                update(accelerator, loss, parameters, optimizer, lr_scheduler)
            loss.detach().item()
            clock.step_done()
            steps += 1
            if steps == total:
                break
    return finish(accelerator, clock, args)


def baseline_flux(case: Case, folder: Path, images: list[Path], args, attention: str) -> dict[str, Any]:
    """examples/dreambooth/train_dreambooth_lora_flux.py (the NF4 base loaded as the quantization research
    example does, then `prepare_model_for_kbit_training`): both prompts encoded once and the text encoders
    deleted, the VAE encoding every step, flow-matching loss with logit-normal timesteps."""
    import copy

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import (
        cast_training_params,
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
        free_memory,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    device = torch.device(args.device)
    total = args.warmup + args.steps
    clock = StepClock(device, args.warmup)
    accelerator = new_accelerator(case.precision, device)
    weight_dtype = weight_dtype_of(case.precision)
    tokenizer_one = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_two = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    text_encoder_one = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", torch_dtype=weight_dtype
    )
    text_encoder_two = T5EncoderModel.from_pretrained(
        folder, subfolder="text_encoder_2", torch_dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=weight_dtype)
    if case.quantization is not None:
        from peft import prepare_model_for_kbit_training

        from nbkit.models.quantization import choose_backend, component_config

        # nbkit's config for the same weights (NF4, bf16 compute, double quantization).
        quantization_config = component_config(
            "transformer", case.quantization, choose_backend(case.quantization)
        )
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=quantization_config, torch_dtype=weight_dtype
        )
        transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    else:
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=weight_dtype
        )
    for model in (transformer, vae, text_encoder_one, text_encoder_two):
        model.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    if case.quantization is None:
        transformer.to(accelerator.device, dtype=weight_dtype)
    elif device.type != "cuda":
        transformer.to(accelerator.device)  # bitsandbytes places its weights on the GPU as it loads
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    set_attention(transformer, attention)
    transformer.enable_gradient_checkpointing()
    transformer.add_adapter(_lora_config(case))
    if case.precision == "fp16":
        cast_training_params([transformer], dtype=torch.float32)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer_like_examples([{"params": parameters, "lr": case.learning_rate}], case, 1e-4)
    loader = _precomputed_dataset(images, case.resolution)

    # The example's encode_prompt: CLIP's pooled output and T5's sequence, once for the instance prompt.
    with torch.no_grad():
        ids = tokenizer_one(
            [CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        pooled_prompt_embeds = text_encoder_one(
            ids.to(accelerator.device), output_hidden_states=False
        ).pooler_output.to(dtype=text_encoder_one.dtype)
        ids = tokenizer_two(
            [CAPTION],
            padding="max_length",
            max_length=case.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        prompt_embeds = text_encoder_two(ids.to(accelerator.device))[0].to(dtype=text_encoder_two.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=accelerator.device, dtype=weight_dtype)
    del text_encoder_one, text_encoder_two, tokenizer_one, tokenizer_two
    free_memory()
    vae_shift, vae_scale = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, loader, lr_scheduler
    )

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        timesteps = timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds
    transformer.train()
    steps = 0
    while steps < total:
        for batch in loader:
            with accelerator.accumulate(transformer):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample()
                model_input = ((model_input - vae_shift) * vae_scale).to(dtype=weight_dtype)
                latent_image_ids = FluxPipeline._prepare_latent_image_ids(
                    model_input.shape[0],
                    model_input.shape[2] // 2,
                    model_input.shape[3] // 2,
                    accelerator.device,
                    weight_dtype,
                )
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(
                    weighting_scheme="logit_normal",
                    batch_size=bsz,
                    logit_mean=0.0,
                    logit_std=1.0,
                    mode_scale=1.29,
                )
                indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                packed_noisy_model_input = FluxPipeline._pack_latents(
                    noisy_model_input,
                    batch_size=model_input.shape[0],
                    num_channels_latents=model_input.shape[1],
                    height=model_input.shape[2],
                    width=model_input.shape[3],
                )
                guidance = None
                if guidance_embeds:
                    guidance = torch.tensor([args.flux_guidance], device=accelerator.device).expand(bsz)
                model_pred = transformer(
                    hidden_states=packed_noisy_model_input,
                    timestep=timesteps / 1000,
                    guidance=guidance,
                    pooled_projections=pooled_prompt_embeds,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=latent_image_ids,
                    return_dict=False,
                )[0]
                model_pred = FluxPipeline._unpack_latents(
                    model_pred,
                    height=model_input.shape[2] * vae_scale_factor,
                    width=model_input.shape[3] * vae_scale_factor,
                    vae_scale_factor=vae_scale_factor,
                )
                weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean(
                    (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                        target.shape[0], -1
                    ),
                    1,
                ).mean()
                update(accelerator, loss, parameters, optimizer, lr_scheduler)
            loss.detach().item()
            clock.step_done()
            steps += 1
            if steps == total:
                break
    return finish(accelerator, clock, args)


BASELINES = {"sd1": baseline_sd1, "sdxl": baseline_sdxl, "flux": baseline_flux}
