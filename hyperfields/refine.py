"""Refine a predicted LoRA: continue the real per-subject optimisation from Psi(photos, T) for a few steps.

The update is the field's own (its recorded rule u, step size eta and step cap), not a fresh optimiser: the field
models exactly that trajectory, so refining N steps continues it to step T + N with no new hyperparameters to
tune, and a stateless rule needs no warm-up from a non-zero start the way Adam's moment estimates would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import LoraConfig, ObjectiveConfig, config_from_dict
from hyperfields.field.model import HyperField
from hyperfields.field.record import FieldRecord
from hyperfields.lora.formats import LoraWeights
from hyperfields.lora.rank import with_rank
from hyperfields.predict import PhotoSet, check_base_model, lora_component, predict_lora, require_task
from hyperfields.streams import stream
from hyperfields.tasks import build_lora_task
from hyperfields.tasks.base import Task, Weights
from hyperfields.tasks.subject import PhotoSets, SubjectTask
from hyperfields.trajectory import real_trajectory


@dataclass
class Refinement:
    """The refined LoRA and the task loss before and after, on the same fixed evaluation draws."""

    lora: LoraWeights
    loss_predicted: float  # the field's prediction Psi(photos, T) at its own rank
    loss_refined: float


def _batched(tensors: dict[str, torch.Tensor], device: torch.device) -> Weights:
    return {name: w.unsqueeze(0).to(device) for name, w in tensors.items()}


def optimised(
    task: Task,
    start: dict[str, torch.Tensor],
    inputs: Any,
    objective: ObjectiveConfig,
    steps: int,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA tensors `start` (by layout name, no batch dimension) after `steps` real updates of the objective's
    rule on one subject's prepared `inputs`, on the CPU."""
    trajectory, _ = real_trajectory(task, _batched(start, task.device), inputs, objective, generator, steps, on_step)
    return {name: w[0].detach().cpu() for name, w in trajectory[-1].items()}


def subject_inputs(task: Task, photos: PhotoSet, caption: str) -> PhotoSets:
    """`task`'s prepared inputs of one subject's photos, each captioned `caption`: a SubjectTask's loss on them is the
    mean of the task's loss over all the photos."""
    count = len(photos.photos)
    return PhotoSets(task.prepare(photos.pixels, [caption] * count), count)


def refine(
    field: HyperField,
    record: FieldRecord,
    photos: PhotoSet,
    steps: int,
    base_model: str,
    rank: int | None = None,
    caption: str | None = None,
    eval_draws: int = 16,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Refinement:
    """Psi(photos, T) refined by `steps` real updates of the field's rule (at `rank` when given) on the loss over all
    the photos, with its losses."""
    require_task(record, "lora", "refining a LoRA")
    objective = config_from_dict(record.config, where="the field's config.json").objective
    device = next(field.parameters()).device
    lora_component(record, base_model)
    predicted = predict_lora(field, record, photos, float(field.steps))
    start = predicted if rank is None or rank == predicted.rank else with_rank(predicted, rank)
    # with_rank keeps the scale, so one task (one scale) scores the prediction and the refined LoRA alike.
    lora = LoraConfig(targets=start.targets, rank=start.rank, alpha=start.alpha)
    task = SubjectTask(build_lora_task(base_model, lora, device))
    check_base_model(field, record, task.denoiser, base_model)
    caption = caption if caption is not None else record.caption_template.format(token=record.token)
    inputs = subject_inputs(task, photos, caption)

    def evaluation_loss(weights: Weights) -> float:
        with torch.no_grad():
            return float(task.loss(weights, inputs, eval_draws, stream(seed, "evaluation", device=device)).mean())

    generator = stream(seed, "refine", device=device)
    refined = LoraWeights(
        tensors=optimised(task, start.tensors, inputs, objective, steps, generator, on_step),
        alpha=start.alpha,
        metadata={**predicted.metadata, "hyperfields.refine_steps": str(steps)},
        sdxl_layers_per_block=start.sdxl_layers_per_block,
        component=start.component,
    )
    return Refinement(
        lora=refined,
        loss_predicted=evaluation_loss(_batched(predicted.tensors, device)),
        loss_refined=evaluation_loss(_batched(refined.tensors, device)),
    )
