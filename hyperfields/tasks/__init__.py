"""Tasks: what a field predicts. `build_task` picks one from the config."""

from __future__ import annotations

import torch

from hyperfields.config import Config
from hyperfields.tasks.base import Task


def build_task(config: Config, device: torch.device, weight_dtype: torch.dtype) -> Task:
    """The task named by `config.model.task`, its frozen models on `device` in `weight_dtype`."""
    if config.model.task == "lora":
        from hyperfields.models import load_pipeline_components
        from hyperfields.tasks.lora_diffusion import LoraDiffusionTask

        parts = load_pipeline_components(config.model.base_model, weight_dtype)
        parts.to(device)
        return LoraDiffusionTask(parts, config.lora, config.train.gradient_checkpointing)
    if config.model.task == "inr":
        from hyperfields.tasks.inr import InrTask

        return InrTask(config.inr, config.model.resolution, device)
    raise ValueError(f"unknown task {config.model.task!r}")
