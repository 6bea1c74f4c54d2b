"""How a base pipeline samples, and images from a base model whose LoRA is held as tensors: the frozen models a
task trains, as a diffusers pipeline.

The pipeline shares the task's models (no second UNet in memory) and its batched LoRA layers: weights set for one
subject apply to every row of the UNet's batch, the classifier-free-guidance rows included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hyperfields.errors import UserError
from hyperfields.lora.batched import BatchedLora
from hyperfields.models import PipelineParts
from hyperfields.schedulers import check_sampler, use_sampler


@dataclass
class Sampling:
    """How the base pipeline samples: the same values and seeds give the same images."""

    num_images: int = 1  # images per prompt
    # Image i of every prompt starts from seed + i (as A1111 numbers a batch), so rows of a contact sheet differ only
    # by prompt and any one image comes back alone from its own seed.
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None  # image size in pixels; None = the base model's own
    width: int | None = None
    negative_prompt: str = ""  # what classifier-free guidance steers away from; "" = the empty prompt, as diffusers
    scheduler: str | None = None  # a name in schedulers.SAMPLERS; None = the base model's own scheduler
    lora_scale: float = 1.0  # the predicted LoRA's weight: 0 = the base model, 1 = as predicted

    def __post_init__(self) -> None:
        check_sampler(self.scheduler)
        for side, pixels in (("height", self.height), ("width", self.width)):
            if pixels is not None and pixels % 8:  # what Stable Diffusion pipelines take; they raise otherwise
                raise UserError(f"image {side} {pixels} pixels: Stable Diffusion takes multiples of 8")
        if not math.isfinite(self.lora_scale):
            raise UserError(f"LoRA scale {self.lora_scale}: expected a finite number")

    @property
    def seeds(self) -> list[int]:
        """The seed of each image of a prompt."""
        return [self.seed + i for i in range(self.num_images)]


def pipeline_from_parts(parts: PipelineParts, scheduler: str | None = None) -> Any:
    """A text-to-image pipeline on `parts`' own models, sampling with `scheduler` (a name in schedulers.SAMPLERS;
    None = DPM-Solver++, as diffusers' DreamBooth scripts validate), its schedule read from the base model's."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    # A copy: sampling sets the scheduler's timesteps, and the task keeps training with its own.
    own = DDPMScheduler.from_config(parts.noise_scheduler.config)
    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet)
    if parts.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            **common, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, scheduler=own
        )
    else:
        pipeline = StableDiffusionPipeline(
            **common, scheduler=own, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    use_sampler(pipeline, scheduler or "dpm++")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def task_pipeline(task: Any, scheduler: str | None = None) -> Any:
    """A text-to-image pipeline on a LoRA task's own frozen models: `pipeline_from_parts` for a UNet base; a FLUX.1 or
    SD 3.x base's own pipeline, which samples with its own flow-matching scheduler (`scheduler` must be None)."""
    from hyperfields.tasks.lora_flow import LoraFlowTask

    if not isinstance(task, LoraFlowTask):
        return pipeline_from_parts(task.parts, scheduler)
    if scheduler is not None:
        raise UserError(f"scheduler '{scheduler}' is for UNet bases; FLUX.1 and SD 3.x sample with their own")
    return task.pipeline


@torch.no_grad()
def sample_with_lora(
    pipeline: Any,
    lora: BatchedLora,
    weights: dict[str, torch.Tensor] | None,
    prompts: list[str],
    sampling: Sampling,
) -> list[list[Image.Image]]:
    """`sampling.num_images` images per prompt (a row per prompt) of the base model with the LoRA `weights`
    (unbatched tensors by layout name; None = the base model) at `sampling.lora_scale`; image i of every prompt from
    seed `sampling.seed + i`, with the scheduler the pipeline was built with."""
    device = pipeline.device
    if weights is not None:
        # B scaled: the LoRA's update scale * B A grows linearly with it, as diffusers' adapter weight does.
        scaled = {name: w * sampling.lora_scale if name.endswith(".lora_B") else w for name, w in weights.items()}
        lora.set_weights({name: w.unsqueeze(0).to(device) for name, w in scaled.items()})
    rows = []
    try:
        for prompt in prompts:
            # CPU generators draw the same latents on every device, so a seed means the same image everywhere.
            generators = [torch.Generator().manual_seed(seed) for seed in sampling.seeds]
            result = pipeline(
                prompt,
                negative_prompt=sampling.negative_prompt or None,
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
