"""The models and cached inputs scripts/bench_speed.py times: the task a gradient-matching step trains through, a
second module tree over the same denoiser weights for the plain peft LoRA step, and that step's loss.

tiny: the built-in tiny pipeline. sd15, sdxl: the real UNet. flux, sd35: the FLUX.1-dev and SD 3.5 Medium
transformers. The real ones are built from their public configs with random weights (nothing downloaded), fed random
latents and text embeddings of the real shapes in place of the VAE and text encoders.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import Config
from hyperfields.models import PipelineParts, load_encoder, load_pipeline_components
from hyperfields.models.architectures import (
    UNETS,
    Conditioning,
    build_dinov2_base,
    build_transformer_pipeline,
    build_unet,
)
from hyperfields.tasks.lora_diffusion import DiffusionInputs, LoraDiffusionTask
from hyperfields.tasks.lora_flow import FlowInputs, LoraFlowTask, flow_matching_loss

# The preset of each transformer benchmark: its architecture in hyperfields.models.architectures and config file.
TRANSFORMER_PRESETS = {"flux": "flux-dev", "sd35": "sd35-medium"}
# What the text encoders feed each transformer: FLUX's 512 T5 states and CLIP pooled output; SD 3.5's 77 CLIP
# states padded to T5's width and joined to 256 T5 states, and both CLIP projections side by side.
TRANSFORMER_TEXT = {"flux": Conditioning(512, 4096, pooled=768), "sd35": Conditioning(333, 4096, pooled=2048)}
# --quick: the blocks and the width cut for a CPU, every kind of block kept (FLUX's double- and single-stream
# blocks; SD 3.5's dual-attention and plain joint blocks, the last without its text output).
TRANSFORMER_QUICK = {
    "flux": dict(num_layers=2, num_single_layers=4, num_attention_heads=6),
    "sd35": dict(num_layers=4, dual_attention_layers=[0, 1], num_attention_heads=12, caption_projection_dim=768),
}


@dataclass
class Bench:
    """What both steps run on."""

    task: LoraDiffusionTask | LoraFlowTask  # the per-sample LoRA task the matching step trains through
    plain: torch.nn.Module  # the denoiser's twin for peft: its own modules, the same weight tensors
    encoder: tuple[Any, Any]  # the field's image encoder and its input norm
    inputs: DiffusionInputs | FlowInputs  # cached conditions
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]: the field's condition images
    plain_loss: Callable[[torch.Generator], torch.Tensor]  # the plain LoRA step's loss on `plain`


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same weight tensors, so the denoiser fits in memory once for both steps."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def unet_loss(unet: torch.nn.Module, scheduler: Any, inputs: DiffusionInputs, dtype: torch.dtype) -> Callable:
    """diffusers' LoRA scripts' noise-prediction loss of `unet` on one noise draw per sample."""
    added = None
    if inputs.pooled_text_embeddings is not None:
        added = {"text_embeds": inputs.pooled_text_embeddings.to(dtype), "time_ids": inputs.time_ids.to(dtype)}

    def loss(generator: torch.Generator) -> torch.Tensor:
        latents = inputs.latents
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy.to(dtype), timesteps, inputs.text_embeddings.to(dtype), added_cond_kwargs=added).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise)

    return loss


def build_tiny(config: Config, batch: int, resolution: int, dtype: torch.dtype, device: torch.device) -> Bench:
    parts = load_pipeline_components(config.model.base_model, dtype)
    parts.to(device)
    images = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    plain = twin(parts.unet)
    task = LoraDiffusionTask(parts, config.lora, gradient_checkpointing=config.train.gradient_checkpointing)
    inputs = task.prepare(images, ["a photo of sks"] * batch)
    loss = unet_loss(plain, parts.noise_scheduler, inputs, dtype)
    return Bench(task, plain, load_encoder(config.model.encoder, dtype), inputs, images, loss)


def build_unet_bench(
    preset: str, config: Config, batch: int, resolution: int, dtype: torch.dtype, device: torch.device
) -> Bench:
    """The real-size UNet of `preset` ("sd15", "sdxl") and random cached inputs of the right shapes."""
    from diffusers import DDPMScheduler

    unet = build_unet(preset, dtype=dtype, device=device)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    parts = PipelineParts(unet=unet, vae=None, text_encoder=None, tokenizer=None, noise_scheduler=scheduler)
    _, text = UNETS[preset]
    g = torch.Generator().manual_seed(0)
    inputs = DiffusionInputs(
        latents=torch.randn(batch, 4, resolution // 8, resolution // 8, generator=g).to(device),
        text_embeddings=torch.randn(batch, text.length, text.width, generator=g).to(device, dtype),
    )
    if text.pooled is not None:
        inputs.pooled_text_embeddings = torch.randn(batch, text.pooled, generator=g).to(device, dtype)
        inputs.time_ids = (
            torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device).float().expand(batch, 6)
        )
    plain = twin(unet)
    task = LoraDiffusionTask(parts, config.lora, gradient_checkpointing=config.train.gradient_checkpointing)
    images = torch.rand(batch, 3, resolution, resolution, generator=g).to(device) * 2 - 1
    return Bench(task, plain, build_dinov2_base(dtype), inputs, images, unet_loss(plain, scheduler, inputs, dtype))


def build_transformer_bench(
    preset: str, config: Config, batch: int, resolution: int, dtype: torch.dtype, device: torch.device, quick: bool
) -> Bench:
    """The FLUX.1-dev ("flux") or SD 3.5 Medium ("sd35") transformer, reduced with `quick`, and random cached inputs:
    16-channel latents and the text states the pipelines' encoders give."""
    changes = TRANSFORMER_QUICK[preset] if quick else {}
    pipeline = build_transformer_pipeline(TRANSFORMER_PRESETS[preset], dtype, device, **changes)
    text = TRANSFORMER_TEXT[preset]
    g = torch.Generator().manual_seed(0)
    inputs = FlowInputs(
        latents=torch.randn(batch, 16, resolution // 8, resolution // 8, generator=g).to(device),
        text_embeddings=torch.randn(batch, text.length, text.width, generator=g).to(device, dtype),
        pooled_text_embeddings=torch.randn(batch, text.pooled, generator=g).to(device, dtype),
    )
    plain = twin(pipeline.transformer)
    task = LoraFlowTask(
        pipeline, config.lora, config.train.gradient_checkpointing, name=config.model.base_model + " (random weights)"
    )

    def loss(generator: torch.Generator) -> torch.Tensor:
        # The same flow-matching loss as the task's, on one draw per sample, with whatever LoRA `plain` holds.
        return flow_matching_loss(
            plain, task.family, task.scheduler, inputs, 1, generator, pipeline.vae_scale_factor
        ).mean()

    images = torch.rand(batch, 3, resolution, resolution, generator=g).to(device) * 2 - 1
    return Bench(task, plain, build_dinov2_base(dtype), inputs, images, loss)


def build_bench(
    preset: str, config: Config, batch: int, resolution: int, dtype: torch.dtype, device: torch.device, quick: bool
) -> Bench:
    if preset == "tiny":
        return build_tiny(config, batch, resolution, dtype, device)
    if preset in TRANSFORMER_PRESETS:
        return build_transformer_bench(preset, config, batch, resolution, dtype, device, quick)
    return build_unet_bench(preset, config, batch, resolution, dtype, device)
