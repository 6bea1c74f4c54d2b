"""Tasks: what a field predicts. `build_task` picks one from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hyperfields.config import Config, LoraConfig
from hyperfields.tasks.base import Task

if TYPE_CHECKING:
    from hyperfields.tasks.lora_diffusion import LoraDiffusionTask
    from hyperfields.tasks.lora_flow import LoraFlowTask


def build_lora_task(
    base_model: str,
    lora: LoraConfig,
    device: torch.device,
    weight_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> LoraDiffusionTask | LoraFlowTask:
    """The LoRA task of `base_model`'s family, its frozen models on `device` in `weight_dtype`: a UNet's
    noise-prediction loss, or a FLUX.1 / SD 3.x transformer's flow-matching loss."""
    from hyperfields.models import load_pipeline_components, load_transformer_pipeline, pipeline_family

    if pipeline_family(base_model) != "unet":
        from hyperfields.tasks.lora_flow import LoraFlowTask

        pipeline = load_transformer_pipeline(base_model, weight_dtype).to(device)
        return LoraFlowTask(pipeline, lora, gradient_checkpointing, name=base_model)
    from hyperfields.tasks.lora_diffusion import LoraDiffusionTask

    parts = load_pipeline_components(base_model, weight_dtype)
    parts.to(device)
    return LoraDiffusionTask(parts, lora, gradient_checkpointing)


def build_task(config: Config, device: torch.device, weight_dtype: torch.dtype) -> Task:
    """The task named by `config.model.task`, its frozen models on `device` in `weight_dtype`."""
    if config.model.task == "lora":
        return build_lora_task(
            config.model.base_model, config.lora, device, weight_dtype, config.train.gradient_checkpointing
        )
    if config.model.task == "inr":
        from hyperfields.tasks.inr import InrTask

        return InrTask(config.inr, config.model.resolution, device)
    raise ValueError(f"unknown task {config.model.task!r}")
