"""Images from a base model whose LoRA is held as tensors: the frozen models a task trains, as a diffusers pipeline.

The pipeline shares the task's models (no second UNet in memory) and its batched LoRA layers: weights set for one
subject apply to every row of the UNet's batch, the classifier-free-guidance rows included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hyperfields.lora.batched import BatchedLora
from hyperfields.models import PipelineParts


@dataclass
class Sampling:
    """How the base pipeline samples: the same values and seed give the same images."""

    num_images: int = 1  # images per prompt
    seed: int = 0  # every prompt starts from this seed, so rows of a contact sheet differ only by prompt
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None  # image size in pixels; None = the base model's own
    width: int | None = None


def pipeline_from_parts(parts: PipelineParts) -> Any:
    """A text-to-image pipeline on `parts`' own models, sampling with DPM-Solver++ as diffusers' DreamBooth scripts
    validate, its schedule read from the base model's."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config)
    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet)
    if parts.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            **common, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, scheduler=scheduler
        )
    else:
        pipeline = StableDiffusionPipeline(
            **common, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def sample_with_lora(
    pipeline: Any,
    lora: BatchedLora,
    weights: dict[str, torch.Tensor] | None,
    prompts: list[str],
    sampling: Sampling,
) -> list[list[Image.Image]]:
    """`sampling.num_images` images per prompt (a row per prompt) of the base model with the LoRA `weights`
    (unbatched tensors by layout name; None = the base model); image i of every prompt from seed `sampling.seed + i`."""
    device = pipeline.unet.device
    if weights is not None:
        lora.set_weights({name: w.unsqueeze(0).to(device) for name, w in weights.items()})
    rows = []
    try:
        for prompt in prompts:
            # CPU generators draw the same latents on every device, so a seed means the same image everywhere.
            generators = [torch.Generator().manual_seed(sampling.seed + i) for i in range(sampling.num_images)]
            result = pipeline(
                prompt,
                num_images_per_prompt=sampling.num_images,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                height=sampling.height,
                width=sampling.width,
                generator=generators,
            )
            rows.append(list(result.images))
    finally:
        lora.clear()
    return rows
