"""A task over subjects of several photos: the loss of a subject's weights is the mean of the task's loss over its
photos, so the real update at every step is DreamBooth's on all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.tasks.base import Task, Weights


@dataclass
class PhotoSets:
    """A task's prepared inputs for N subjects of `photos` photos each, rows ordered (subject, photo)."""

    inputs: Any
    photos: int


class SubjectTask:
    """`task` whose loss also takes PhotoSets: one weight set per subject, its loss the mean over the subject's photos.

    Everything else (layout, prepare, record, ...) is the task's own; plain inputs are one photo per sample as before.
    """

    def __init__(self, task: Task) -> None:
        self.task = task

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (a copy being made): never look it up on itself
            raise AttributeError(name)
        return getattr(self.task, name)

    def loss(self, weights: Weights, inputs: Any, draws: int, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(inputs, PhotoSets):
            return self.task.loss(weights, inputs, draws, generator)
        repeated = {name: w.repeat_interleave(inputs.photos, dim=0) for name, w in weights.items()}
        per_photo = self.task.loss(repeated, inputs.inputs, draws, generator)  # (N * photos,)
        return per_photo.view(-1, inputs.photos).mean(dim=1)  # (N,)


def base_task(task: Task) -> Task:
    """The task a SubjectTask wraps, or `task` itself: what code asking for a task's kind should look at."""
    return task.task if isinstance(task, SubjectTask) else task
