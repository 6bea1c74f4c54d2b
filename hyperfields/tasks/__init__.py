"""Tasks: what a field predicts. `build_task` picks one from the config."""

from __future__ import annotations

import torch

from hyperfields.config import Config
from hyperfields.tasks.base import Task


def build_task(config: Config, device: torch.device, weight_dtype: torch.dtype) -> Task:
    """The task named by `config.model.task`, its frozen models on `device` in `weight_dtype`; a LoRA task of the base
    model's family: a UNet's noise-prediction loss, or a FLUX.1 / SD 3.x transformer's flow-matching loss."""
    if config.model.task == "lora":
        from hyperfields.models import load_pipeline_components, load_transformer_pipeline, pipeline_family

        base_model = config.model.base_model
        checkpointing = config.train.gradient_checkpointing
        if pipeline_family(base_model) != "unet":
            from hyperfields.tasks.lora_flow import LoraFlowTask

            pipeline = load_transformer_pipeline(base_model, weight_dtype).to(device)
            return LoraFlowTask(pipeline, config.lora, checkpointing, name=base_model)
        from hyperfields.tasks.lora_diffusion import LoraDiffusionTask

        parts = load_pipeline_components(base_model, weight_dtype)
        parts.to(device)
        return LoraDiffusionTask(parts, config.lora, checkpointing)
    if config.model.task == "inr":
        from hyperfields.tasks.inr import InrTask

        return InrTask(config.inr, config.model.resolution, device)
    raise ValueError(f"unknown task {config.model.task!r}")
